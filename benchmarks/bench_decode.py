"""Decode throughput, weavelm vs transformers `generate`, same random-weight model, one GPU.

    python3 benchmarks/bench_decode.py --shape llama3-8b --batch 1 --prompt 128 --new 128

Both engines get the same weights (weavelm loads transformers' state dict through its own
weight loaders), the same prompt and greedy decoding with EOS ignored. Decode tokens/s is
(new - 1) / (time(new tokens) - time(1 token)) per sequence, so prefill is excluded.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import transformers as tf

    from weavelm import LLM, SamplingParams
    from weavelm.bench.shapes import shape_config

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
    gpu = torch.cuda.get_device_name()
    ours = LLM.from_weights(hf_cfg.to_dict(), hf.state_dict().items(), tp=1, device="cuda",
                            dtype="bfloat16", max_model_len=args.prompt + args.new + 8)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg["vocab_size"], (args.batch, args.prompt), generator=g)

    def run_ours(n):
        return ours.generate_from_ids(prompts.tolist(), SamplingParams(max_new_tokens=n,
                                                                       ignore_eos=True))

    def run_hf(n):
        ids = prompts.cuda()
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)

    rows = []
    agree = None
    for name, fn in (("transformers", run_hf), ("weavelm", run_ours)):
        fn(4)                                            # warm-up (kernels compile, caches)
        t1 = timed(lambda: fn(1), args.repeats)
        tn = timed(lambda: fn(args.new), args.repeats)
        rows.append((name, t1, tn, (args.new - 1) * args.batch / (tn - t1)))
    hf_tokens = run_hf(args.new)[:, args.prompt:].tolist()
    our_tokens = [o.token_ids for o in run_ours(args.new)]
    agree = sum(a == b for x, y in zip(hf_tokens, our_tokens) for a, b in zip(x, y))

    base = rows[0][3]
    print(f"\n## decode, {args.shape} ({cfg['num_hidden_layers']} layers), random weights, bf16, "
          f"{gpu}, batch {args.batch}, prompt {args.prompt}, new {args.new}\n")
    print("| engine | time 1 token (s) | time {} tokens (s) | decode tok/s | vs transformers |"
          .format(args.new))
    print("| --- | --- | --- | --- | --- |")
    for name, t1, tn, tps in rows:
        print(f"| {name} | {t1:.3f} | {tn:.3f} | {tps:.1f} | {tps / base:.2f}x |")
    print(f"\ngreedy tokens equal to transformers': {agree} of {args.batch * args.new}")


if __name__ == "__main__":
    main()
