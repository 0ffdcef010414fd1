"""Decode throughput on one GPU, side by side in one run: weavelm (paged KV cache, CUDA-graph
decode), transformers eager, transformers with `cache_implementation="static"` (it compiles
itself), and the weight-read roofline (weight bytes / the copy rate measured in this run).

    python3 benchmarks/bench_decode.py --shape llama3-8b --batches 1,16,64 --prompt 128 --new 128
    python3 benchmarks/bench_decode.py --engines weavelm,weavelm-fp8      # FP8 weights beside bf16

`weavelm-fp8` is the same weights quantized at load (`quantization="fp8"`), with its own
roofline (the FP8 model's weight bytes / the copy rate).

Every engine gets the same random weights (weavelm loads transformers' state dict through its
own weight loaders), the same prompts and greedy decoding with EOS ignored. Decode tokens/s =
B * (new - 1) / (time(new tokens) - time(1 token)), so prefill is excluded; medians of
--repeats. Host time per decode step: the median wall time of the runner's `step()` call for a
batch (preparing inputs, copying them, launching the graph), the GPU left idle before each. GPU
time per decode step: back-to-back replays of the captured graph, CUDA events around them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import knobs  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_rate() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = min(timed(lambda: y.copy_(x), 5) for _ in range(4))
    return 2 * (2 << 30) / t


def host_step_ms(llm, batch: int, prompt: int, repeats: int = 50) -> float:
    """Median host time of one graph decode step of `batch` sequences at position `prompt`."""
    from weavelm.engine.model_runner import StepPiece
    runner = llm.runner
    tables = [runner.blocks.allocate(runner.blocks.blocks_for(prompt + 1)) for _ in range(batch)]
    try:
        pieces = [StepPiece([1], prompt, t) for t in tables]
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runner.step(pieces)
            times.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    finally:
        for t in tables:
            runner.blocks.free(t)
    return statistics.median(times) * 1e3


def replay_gpu_ms(llm, batch: int, repeats: int = 20) -> float:
    """GPU time of one decode step: back-to-back replays of the captured graph for `batch`,
    CUDA events around them (no host work between)."""
    graph = llm.runner.graphs[min(g for g in llm.runner.graphs if g >= batch)]
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(repeats):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="weavelm,transformers,transformers-static",
                    help="which to run (weavelm, weavelm-fp8, transformers, "
                         "transformers-static); transformers-static runs at batch 1 only (it "
                         "compiles per batch size)")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="auto or fp8: the weavelm engines' KV cache")
    ap.add_argument("--json", default=None)
    ap.add_argument("--knob", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="set a weavelm module constant before the models are built "
                         "(benchmarks/knobs.py), e.g. kernels.fp8_gemv.EARLY_STEPS=1")
    args = ap.parse_args()
    knobs.apply(args.knob)

    import transformers as tf

    from weavelm import LLM, SamplingParams
    from weavelm.bench.shapes import shape_config

    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    cfg = shape_config(args.shape, args.layers)
    cfg["max_position_embeddings"] = 8192
    cfg.pop("rope_scaling", None)          # keep both engines on the plain RoPE table
    hf_cfg = tf.AutoConfig.for_model("llama" if "Llama" in cfg["architectures"][0] else "qwen2",
                                     **{k: v for k, v in cfg.items() if k != "architectures"})
    hf_cfg.architectures = cfg["architectures"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        hf = tf.AutoModelForCausalLM.from_config(hf_cfg).eval()
        torch.set_default_dtype(torch.float32)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    gpu = torch.cuda.get_device_name()
    t = time.perf_counter()
    length = args.prompt + args.new + 8
    # a fixed cache, so that a second engine (FP8) fits beside the first
    blocks = max(batches) * -(-length // 16) + 64
    ours = LLM.from_weights(hf_cfg.to_dict(), hf.state_dict().items(), tp=1, device="cuda",
                            dtype="bfloat16", max_model_len=length, max_num_seqs=max(batches),
                            num_kv_blocks=blocks, kv_cache_dtype=args.kv_cache_dtype)
    start_s = time.perf_counter() - t
    ours8 = fp8_bytes = None
    if "weavelm-fp8" in engines:
        ours8 = LLM.from_weights(hf_cfg.to_dict(), hf.state_dict().items(), tp=1,
                                 device="cuda", dtype="bfloat16", max_model_len=length,
                                 max_num_seqs=max(batches), num_kv_blocks=blocks,
                                 quantization="fp8", kv_cache_dtype=args.kv_cache_dtype)
        fp8_bytes = sum(p.numel() * p.element_size() for p in ours8.engine.runner.model
                        .parameters())
    rate = copy_rate()
    print(f"weavelm: start-up {start_s:.1f} s (graph capture {ours.runner.capture_seconds:.1f} s,"
          f" {len(ours.runner.graphs)} batch sizes), KV cache {ours.runner.kv_tokens} tokens; "
          f"copy rate {rate / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB", flush=True)

    def run_ours(prompts, n, llm=ours):
        return llm.generate_from_ids(prompts.tolist(), SamplingParams(max_new_tokens=n,
                                                                      ignore_eos=True))

    def run_hf(prompts, n, **kw):
        ids = prompts.cuda()
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

    runs = {"weavelm": run_ours, "weavelm-fp8": lambda p, n: run_ours(p, n, ours8),
            "transformers": run_hf,
            "transformers-static": lambda p, n: run_hf(p, n, cache_implementation="static")}
    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, cfg["vocab_size"], (B, args.prompt), generator=g)
        roofline = B * rate / weight_bytes
        row = {"batch": B, "roofline": roofline,
               "roofline-fp8": B * rate / fp8_bytes if fp8_bytes else None}
        for name in engines:
            if name == "transformers-static" and B != 1:
                continue
            fn = runs[name]
            fn(prompts, 4)                              # warm-up (compiles, caches)
            t1 = timed(lambda: fn(prompts, 1), args.repeats)
            tn = timed(lambda: fn(prompts, args.new), args.repeats)
            row[name] = B * (args.new - 1) / (tn - t1)
            print(f"batch {B} {name}: {row[name]:.1f} tok/s", flush=True)
        if "weavelm" in engines:
            row["host_ms"] = host_step_ms(ours, B, args.prompt)
            row["gpu_ms"] = replay_gpu_ms(ours, B)
        if ours8 is not None:
            row["gpu_ms_fp8"] = replay_gpu_ms(ours8, B)
        rows.append(row)

    print(f"\n## decode, {args.shape} ({cfg['num_hidden_layers']} layers), random weights, bf16, "
          f"{gpu}, prompt {args.prompt}, new {args.new}; tok/s (all sequences), medians of "
          f"{args.repeats}; roofline = batch x copy rate / weight bytes ({rate / 1e12:.2f} TB/s, "
          f"{weight_bytes / 1e9:.2f} GB)\n")
    names = [n for n in engines]
    print("| batch | " + " | ".join(names) + " | roofline | weavelm / roofline | weavelm / "
          "transformers | weavelm / transformers-static | host ms per step | GPU ms per step |")
    print("| --- " * (len(names) + 7) + "|")

    def fmt(v, spec=".1f"):
        return "—" if v is None else format(v, spec)
    for r in rows:
        w = r.get("weavelm")
        ratio = (lambda a, b: None if a is None or b is None else a / b)
        print(f"| {r['batch']} | " + " | ".join(fmt(r.get(n)) for n in names)
              + f" | {fmt(r['roofline'])} | {fmt(ratio(w, r['roofline']), '.2f')} | "
              f"{fmt(ratio(w, r.get('transformers')), '.2f')} | "
              f"{fmt(ratio(w, r.get('transformers-static')), '.2f')} | "
              f"{fmt(r.get('host_ms'), '.3f')} | {fmt(r.get('gpu_ms'), '.3f')} |")
    if ours8 is not None:
        print(f"\n## FP8 weights (quantization=\"fp8\"): {fp8_bytes / 1e9:.2f} GB of weights\n")
        print("| batch | weavelm-fp8 tok/s | FP8 roofline | / FP8 roofline | / weavelm bf16 | "
              "GPU ms per step fp8 | bf16 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            f8, bf = r.get("weavelm-fp8"), r.get("weavelm")
            print(f"| {r['batch']} | {fmt(f8)} | {fmt(r['roofline-fp8'])} | "
                  f"{fmt(f8 / r['roofline-fp8'] if f8 else None, '.2f')} | "
                  f"{fmt(f8 / bf if f8 and bf else None, '.2f')} | "
                  f"{fmt(r.get('gpu_ms_fp8'), '.3f')} | {fmt(r.get('gpu_ms'), '.3f')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "args": vars(args), "copy_rate": rate,
                       "weight_bytes": weight_bytes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
