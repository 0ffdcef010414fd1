"""`weavelm bench throughput`: serve a seeded synthetic workload through the engine and report
throughput, latency and the roofline bound of the same work.

Workload (seeded, `--seed`): `--num-requests` requests, all arriving at once (offline
throughput, as vLLM's benchmark). Prompt lengths log-normal with median `--input-median` (1024)
and sigma 0.8, capped at `--input-max` (8192); output lengths log-normal with median 128 and
sigma 0.8, capped at 512; token ids uniform over the vocabulary; greedy, EOS ignored.
`--input-len/--output-len` give every request the same lengths instead; `--dataset-shape
sharegpt` draws them as ShareGPT's are (`sharegpt_lengths`, no download). `--compare hf` also
times transformers on the same requests (static batches of 16, padded, eager; TP 1).

Roofline bound of the same workload, from rates measured in the same run: prefill = the
workload's prefill FLOPs per rank (2 x weights x prompt tokens + causal attention) at the bf16
GEMM rate of one large matmul (with `--quantization fp8`, the decoder layers' weights at the rate
of one large FP8 `_scaled_mm`); decode = the decode steps a perfect batcher needs (output tokens /
max_num_seqs, at least the longest output) each reading this rank's weights, plus every decode
token's KV read, at the device-to-device copy rate, or the decode tokens' FLOPs at the GEMM rate
where that takes longer (large batches: 1,024 sequences of Llama-3-8B need 19.7 ms of GEMMs a
step on an H100 where reading the weights takes 5.4). Reported as bound / measured.

Every rank runs this; rank 0 prints.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time

import torch


# ShareGPT-like lengths (`--dataset-shape sharegpt`), without the data: log-normal with the
# means the vLLM paper reports for ShareGPT (Kwon et al. 2023, Fig. 11: 161.31 input and 337.99
# output tokens), a spread of our choosing (sigma 1.0: the paper shows the histograms, not a
# fit), and vLLM's benchmark pruning (prompt and output at least 4 tokens, prompt at most 1,024,
# both together at most 2,048).
SHAREGPT = dict(input_mean=161.31, output_mean=337.99, sigma=1.0, min_len=4, input_max=1024,
                total_max=2048)
DATASET_SHAPES = ("synthetic", "sharegpt")


def sharegpt_lengths(n: int, g: torch.Generator) -> list[tuple[int, int]]:
    """n (input, output) length pairs drawn as SHAREGPT says (rejected pairs drawn again)."""
    c = SHAREGPT
    out: list[tuple[int, int]] = []
    while len(out) < n:
        m = 2 * (n - len(out)) + 16
        ins = torch.empty(m).log_normal_(math.log(c["input_mean"]) - c["sigma"] ** 2 / 2,
                                         c["sigma"], generator=g)
        outs = torch.empty(m).log_normal_(math.log(c["output_mean"]) - c["sigma"] ** 2 / 2,
                                          c["sigma"], generator=g)
        for i, o in zip(ins.long().tolist(), outs.long().tolist()):
            if min(i, o) >= c["min_len"] and i <= c["input_max"] and i + o <= c["total_max"]:
                out.append((i, o))
    return out[:n]


def workload(n: int, vocab: int, seed: int, input_len=None, output_len=None,
             input_median=1024, input_max=8192, output_median=128, output_max=512,
             prefix_len: int = 0, num_prefixes: int = 1, dataset_shape: str = "synthetic"):
    """[(prompt token ids, output length)] for n requests; with `prefix_len`, request i's
    prompt starts with shared prefix i mod `num_prefixes` (a system prompt, few-shot
    examples) of that many tokens, then its own tokens. `dataset_shape="sharegpt"`: lengths
    as `sharegpt_lengths` draws them."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(0, vocab, (prefix_len,), generator=g).tolist()
                for _ in range(num_prefixes)] if prefix_len else [[]]

    def lengths(median, cap, fixed):
        if fixed:
            return [fixed] * n
        x = torch.empty(n).log_normal_(math.log(median), 0.8, generator=g)
        return [max(1, min(cap, int(v))) for v in x.tolist()]
    if dataset_shape == "sharegpt":
        ins, outs = zip(*sharegpt_lengths(n, g))
    else:
        ins = lengths(input_median, input_max, input_len)
        outs = lengths(output_median, output_max, output_len)
    return [(prefixes[k % len(prefixes)] + torch.randint(0, vocab, (i,), generator=g).tolist(), o)
            for k, (i, o) in enumerate(zip(ins, outs))]


def workload_from(work: dict, vocab: int, seed: int):
    """`workload` for a command's workload options (cli/options.py `workload`; the lengths'
    defaults where a key is missing)."""
    return workload(work["num_requests"], vocab, seed, work.get("input_len"),
                    work.get("output_len"), input_max=work.get("input_max", 8192),
                    prefix_len=work.get("prefix_len", 0),
                    num_prefixes=work.get("num_prefixes", 1),
                    dataset_shape=work.get("dataset_shape", "synthetic"))


def measure_rates(device, fp8: bool = False) -> tuple[float, float, float]:
    """(GEMM FLOP/s of a large matmul, copy bytes/s read + written, FLOP/s of the FP8 linear
    layers' large GEMM: with `fp8`, `fp8_linear` on FP8 codes, else the matmul's) on
    `device`."""
    big = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(big, big, device=device, dtype=dtype)
    b = torch.randn(big, big, device=device, dtype=dtype)
    x = torch.empty((1 << 30) if device.type == "cuda" else (1 << 26), dtype=torch.uint8,
                    device=device)
    y = torch.empty_like(x)

    def best(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)
    flops = 2 * big ** 3 / best(lambda: a @ b)
    copy = 2 * x.numel() / best(lambda: y.copy_(x))
    fp8_flops = flops
    if fp8:
        from weavelm.parallel.fp8 import fp8_linear, quantize_rows
        codes, scale = quantize_rows(b)
        fp8_flops = 2 * big ** 3 / best(lambda: fp8_linear(a, codes, scale))
    return flops, copy, fp8_flops


def roofline_seconds(cfg, tp: int, requests, max_num_seqs: int, flops: float, copy: float,
                     weight_bytes: float, kv_bytes_per_token: float,
                     layer_flops: float | None = None) -> dict:
    """The bound of the workload (see the module doc), per rank. `tp`: the ranks that share
    the prefill FLOPs (TP x PP); `weight_bytes` and `kv_bytes_per_token`: one rank's (its
    stage's layers). `layer_flops`: the rate of the decoder layers' GEMMs where it is not
    `flops` (FP8 weights)."""
    d_attn = cfg.num_heads * cfg.head_dim
    prompt_tokens = sum(len(p) for p, _ in requests)
    layer_params = (cfg.hidden_size * (d_attn + 2 * cfg.num_kv_heads * cfg.head_dim)
                    + d_attn * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    attn = sum(2 * cfg.num_layers * d_attn * len(p) ** 2 for p, _ in requests)  # QK + PV, causal
    prefill = (2 * cfg.num_layers * layer_params * prompt_tokens / (layer_flops or flops)
               + (2 * cfg.vocab_size * cfg.hidden_size * prompt_tokens + attn) / flops) / tp
    outputs = [o for _, o in requests]
    steps = max(math.ceil(sum(outputs) / max_num_seqs), max(outputs))
    keys = sum(o * len(p) + o * (o - 1) / 2 for p, o in requests)   # keys the decode reads
    decode_reads = (steps * weight_bytes + keys * kv_bytes_per_token) / copy
    decode_flops = (2 * cfg.num_layers * layer_params * sum(outputs) / (layer_flops or flops)
                    + (2 * cfg.vocab_size * cfg.hidden_size * sum(outputs)
                       + 4 * cfg.num_layers * d_attn * keys) / flops) / tp
    decode = max(decode_reads, decode_flops)
    return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode,
            "decode_steps": steps, "decode_reads_s": decode_reads,
            "decode_flops_s": decode_flops}


def _percentiles(xs):
    if not xs:
        return None, None
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def serve(llm, requests, progress: bool = False) -> dict:
    """Run the requests through the engine; timings per request and KV use."""
    from tqdm.auto import tqdm

    from weavelm.engine.sampler import SamplingParams
    engine, blocks = llm.engine, llm.runner.blocks
    engine.stop_ids = set()
    for i, (prompt, out_len) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=out_len,
                                                          ignore_eos=True))
    first, done, peak = {}, {}, 0
    bar = tqdm(total=len(requests), desc="weavelm", unit=" requests", disable=not progress)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - t0
        peak = max(peak, blocks.capacity - blocks.num_free)
        for out in outs:
            if out.finish_reason and out.finish_reason.startswith("error"):
                raise RuntimeError(f"request {out.request_id}: {out.finish_reason}")
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = (now, len(out.token_ids))
                bar.update()
    elapsed = time.perf_counter() - t0
    bar.close()
    ttft = [first[r] for r in done]
    tpot = [(t - first[r]) / (n - 1) for r, (t, n) in done.items() if n > 1]
    out_tokens = sum(n for _, n in done.values())
    return dict(elapsed_s=elapsed, requests=len(done), output_tokens=out_tokens,
                ttft=_percentiles(ttft), tpot=_percentiles(tpot), peak_kv_blocks=peak,
                kv_blocks=blocks.capacity, preempted=engine.scheduler.num_preempted,
                ttft_s=sorted(ttft), tpot_s=sorted(tpot))


def transformers_seconds(hf_cfg: dict, requests, device, dtype, batch: int = 16,
                         progress: bool = False) -> float:
    """Seconds for transformers to serve the same requests in static batches of `batch`
    (prompts left-padded to the batch's longest, every request run to the batch's longest
    output, eager `generate`, greedy), random weights of the same shape."""
    import transformers as tf
    from tqdm.auto import tqdm
    cfg = {k: v for k, v in hf_cfg.items() if k != "architectures"}
    kind = "llama" if "Llama" in hf_cfg["architectures"][0] else "qwen2"
    config = tf.AutoConfig.for_model(kind, **cfg)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        for i in tqdm(range(0, len(requests), batch), desc="transformers", unit=" batches",
                      disable=not progress):
            chunk = requests[i:i + batch]
            width = max(len(p) for p, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for r, (p, _) in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            new = max(o for _, o in chunk)
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    del model
    return seconds


def throughput_rank(opts: dict) -> dict | None:
    from weavelm.bench.prefill import fill_random
    from weavelm.bench.shapes import shape_config
    from weavelm.engine.llm import LLM
    from weavelm.parallel.state import init_parallel
    config = opts["config"]
    state = init_parallel(config.tp, config.device, pp=config.pp)
    hf_cfg = shape_config(opts["shape"], opts["layers"])
    requests = workload_from(opts, hf_cfg["vocab_size"], opts["seed"])
    longest = max(len(p) + o for p, o in requests)
    config = dataclasses.replace(config, max_model_len=min(hf_cfg["max_position_embeddings"],
                                                           longest + 1))
    llm = LLM.from_config(config, hf_cfg, lambda model: fill_random(model, opts["seed"]),
                          progress=False)
    flops, copy, layer_flops = measure_rates(state.device, fp8=config.quantization == "fp8")
    layers, kv_heads, head_dim = llm.model.kv_cache_shape()
    kv_token = 2 * layers * kv_heads * head_dim * llm.runner.kv.k[0].element_size()  # FP8: 1
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    bound = roofline_seconds(llm.config, config.tp * config.pp, requests,
                             llm.runner.config.max_num_seqs, flops, copy, weight_bytes, kv_token,
                             layer_flops)
    result = serve(llm, requests, progress=state.is_first)
    blocks = llm.runner.blocks
    result["prefix_caching"] = blocks.caching
    result["prefix_hit_rate"] = blocks.hits / blocks.queries if blocks.queries else 0.0
    model_config, dtype = llm.config, llm.dtype
    del llm  # transformers needs the memory the KV cache held
    gc.collect()
    if state.device.type == "cuda":
        torch.cuda.empty_cache()
    if not state.is_first:
        return None
    in_tokens = sum(len(p) for p, _ in requests)
    e = result["elapsed_s"]
    compare = None
    if opts.get("compare") == "hf":
        hf_s = transformers_seconds(hf_cfg, requests, state.device, dtype, progress=True)
        compare = dict(transformers_s=hf_s, speedup=hf_s / e,
                       transformers_output_tok_s=result["output_tokens"] / hf_s)
    return dict(meta=dict(shape=opts["shape"], layers=model_config.num_layers, tp=config.tp,
                          pp=config.pp, mode=config.mode, device=torch.cuda.get_device_name()
                          if state.device.type == "cuda" else "cpu",
                          requests=len(requests), seed=opts["seed"],
                          dataset_shape=opts.get("dataset_shape", "synthetic"),
                          mean_input=in_tokens / len(requests),
                          mean_output=sum(o for _, o in requests) / len(requests),
                          gemm_tflops=flops / 1e12, copy_tbs=copy / 1e12,
                          quantization=config.quantization,
                          fp8_gemm_tflops=layer_flops / 1e12 if config.quantization else None),
                result=result, bound=bound,
                rates=dict(requests_s=len(requests) / e, input_tok_s=in_tokens / e,
                           output_tok_s=result["output_tokens"] / e,
                           fraction_of_bound=bound["total_s"] / e), compare=compare)


def format_result(r: dict) -> str:
    m, res, b, rates = r["meta"], r["result"], r["bound"], r["rates"]

    def ms(pair):
        return "—" if pair[0] is None else f"{pair[0] * 1e3:.1f} / {pair[1] * 1e3:.1f}"
    return "\n".join([
        f"throughput, {m['shape']} ({m['layers']} layers), TP={m['tp']}"
        + (f" x PP={m['pp']}" if m.get("pp", 1) > 1 else "") + f", mode {m['mode']}, "
        f"{m['device']}, {m['requests']} requests (seed {m['seed']}"
        + (f"; ShareGPT-like lengths, mean {m['mean_input']:.0f} in / {m['mean_output']:.0f} "
           f"out" if m.get("dataset_shape") == "sharegpt" else "") + "); GEMM "
        f"{m['gemm_tflops']:.1f} TFLOP/s, copy {m['copy_tbs']:.2f} TB/s measured in this run"
        + (f"; FP8 weights, FP8 GEMM {m['fp8_gemm_tflops']:.1f} TFLOP/s"
           if m.get("quantization") else ""),
        "",
        "| requests/s | input tok/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
        "peak KV | preempted | seconds | roofline bound s | bound / measured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {rates['requests_s']:.2f} | {rates['input_tok_s']:.0f} | {rates['output_tok_s']:.0f} "
        f"| {ms(res['ttft'])} | {ms(res['tpot'])} | "
        f"{res['peak_kv_blocks']}/{res['kv_blocks']} blocks | {res['preempted']} | "
        f"{res['elapsed_s']:.2f} | {b['total_s']:.2f} (prefill {b['prefill_s']:.2f}, decode "
        f"{b['decode_s']:.2f}) | {rates['fraction_of_bound']:.2f} |", "",
        f"prefix caching {'on' if res.get('prefix_caching') else 'off'}: hit rate "
        f"{res.get('prefix_hit_rate', 0):.3f} of the prompts' full blocks (the bound counts "
        f"every prompt token as computed)"]
        + ([] if not r.get("compare") else [
            "", f"transformers (static batches of 16, padded, eager) on the same requests: "
                f"{r['compare']['transformers_s']:.2f} s ({r['compare']['transformers_output_tok_s']:.0f}"
                f" output tok/s); weavelm {r['compare']['speedup']:.2f}x"]))


def plot(r: dict, path: str) -> None:
    """Output tokens/s of weavelm, its roofline bound (and transformers), and the TTFT / TPOT
    distributions, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m, res = r["meta"], r["result"]
    out = res["output_tokens"]
    bars = {"weavelm": out / res["elapsed_s"], "roofline bound": out / r["bound"]["total_s"]}
    if r.get("compare"):
        bars["transformers"] = r["compare"]["transformers_output_tok_s"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    a1.bar(list(bars), list(bars.values()), color=["C0", "C7", "C1"][:len(bars)])
    a1.set_ylabel("output tokens/s")
    for ax, key, label in ((a2, "ttft_s", "TTFT (s)"), (a3, "tpot_s", "TPOT (ms)")):
        xs = res[key] if key == "ttft_s" else [t * 1e3 for t in res[key]]
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    pp = f" x PP {m['pp']}" if m.get("pp", 1) > 1 else ""
    fig.suptitle(f"{m['shape']} ({m['layers']} layers), TP {m['tp']}{pp}, mode {m['mode']}, "
                 f"{m['device']}, {m['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
