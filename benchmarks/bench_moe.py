"""Mixture-of-experts on one GPU, side by side in one run, random weights (transformers' own
initialisation: its N(0, 0.02) router routes about uniformly, T * top_k / E tokens per expert;
the run prints the routed counts it saw):

1. the MoE blocks of `--layers` layers at `--tokens` tokens: TFLOP/s (expert GEMM FLOPs
   2 * T * k * 3 * I * D per layer) against one dense GEMM of the same FLOPs ([T k, D] x
   [D, 3 I]) timed in the same run;
2. the whole `--layers`-layer prefill (one sequence of `--tokens`, all logits) against
   transformers' forward of the same model on the same weights (weavelm loads transformers'
   state dict through its own weight loaders; the max logit difference is printed);
3. batch-1 decode of the MoE blocks (CUDA graph of the `--layers` blocks, one token): the rate
   at which it reads the active experts' weights (k of E per layer, 3 I D each, and the
   router) against the device-to-device copy rate (bytes read + written per second) measured
   in this run, for the decode GEMV kernels (`weavelm/kernels/moe_gemv.py`, what `auto` runs)
   and the grouped-GEMM path side by side, and each path's experts alone for one layer.
   Predicted for mixtral-8x7b on an H200 (moe_gemv's docstring says why): gemv 0.80-0.90 of
   the copy rate, its experts alone 0.9-1.0; grouped 0.50 (measured before the kernels).

    python3 benchmarks/bench_moe.py --shape mixtral-8x7b --layers 4 --tokens 8192

`--device cpu --dtype float32` runs the same logic (no graph) for tests with tiny shapes.
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


def timeit(fn, device, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_rate(device, nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy (best of 4 medians)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / min(timeit(lambda: y.copy_(x), device, 5) for _ in range(4))


def checkpoint_items(hf, arch: str):
    """transformers' in-memory state dict as checkpoint tensors (one per expert and
    projection), the names weavelm's loaders take."""
    for name, t in hf.state_dict().items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            if arch == "MixtralForCausalLM" and ".mlp.gate." in name:
                name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            yield name, t
            continue
        prefix = name.rsplit(".", 1)[0]                       # model.layers.i.mlp.experts
        if arch == "MixtralForCausalLM":
            prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
            gate, up, down = "w1", "w3", "w2"
        else:
            gate, up, down = "gate_proj", "up_proj", "down_proj"
        for e in range(t.shape[0]):
            if name.endswith("gate_up_proj"):
                g, u = t[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.{gate}.weight", g
                yield f"{prefix}.{e}.{up}.weight", u
            else:
                yield f"{prefix}.{e}.{down}.weight", t[e]


def build(cfg_dict: dict, device, dtype, tokens: int):
    """(transformers model, weavelm LLM) with the same random weights."""
    import transformers as tf

    from weavelm import LLM
    hf_cfg = tf.AutoConfig.for_model(
        {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}[
            cfg_dict["architectures"][0]], **cfg_dict)
    torch.manual_seed(0)
    with torch.device(device):
        hf = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    llm = LLM.from_weights(cfg_dict, checkpoint_items(hf, cfg_dict["architectures"][0]), tp=1,
                           device=str(device), dtype=dtype, max_model_len=tokens + 16,
                           enforce_eager=True, num_kv_blocks=tokens // 16 + 8)
    return hf, llm


def graphed(fn, device):
    """fn captured in a CUDA graph (after a warm-up on a side stream); fn itself on CPU."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def decode_impls(block, x1, device) -> list[str]:
    """The expert paths to compare at batch 1: the GEMV kernels where they take the layer's
    operands (a GPU), then the grouped GEMMs."""
    from weavelm.kernels import moe_gemv
    from weavelm.kernels.moe import route
    w, i = route(block.gate(x1), block.top_k, block.renormalize)
    ok = device.type == "cuda" and moe_gemv.unsupported(
        x1, block.experts.w13.weight, block.experts.w2.weight, w, i) is None
    return ["gemv", "grouped"] if ok else ["grouped"]


# Launch-plan variants of the GEMV kernels (`--decode-variants`): more loads in flight per lane,
# wider units, fewer registers (more CTAs). The default plan is moe_gemv.GATE_UP[1] / DOWN[1], 4 warps. "auto"
# times them when the run so far took under VARIANTS_BUDGET_S (6 compiles, ~1 minute).
VARIANTS = {"default": {},
            "gate P1 U8, down R2 U8": dict(gate_up=dict(pairs=1, unroll=8),
                                          down=dict(rows=2, unroll=8)),
            "gate P2 U2, down R4 U2": dict(gate_up=dict(pairs=2, unroll=2),
                                          down=dict(rows=4, unroll=2)),
            "gate P1 U2, down R2 U2": dict(gate_up=dict(pairs=1, unroll=2),
                                          down=dict(rows=2, unroll=2))}


VARIANTS_BUDGET_S = 200


def gemv_variants(x1, w13, w2, w, i, device, nbytes: int, copy: float) -> dict:
    """Experts alone for one layer and token under each plan of VARIANTS: fraction of copy."""
    from weavelm.kernels import moe_gemv
    res = {}
    for name, params in VARIANTS.items():
        t = timeit(graphed(lambda: moe_gemv.moe_gemv(x1, w13, w2, w, i, params=params),
                           device), device, 50)
        res[name] = dict(us=t * 1e6, vs_copy=nbytes / t / copy)
    return res


def run(shape: str, layers: int, tokens: int, device: str, dtype, repeats: int,
        variants: str = "off") -> dict:
    from weavelm.bench.shapes import shape_config
    from weavelm.kernels.moe import group_by_expert, moe_experts, route
    from weavelm.models.moe import SparseMoeBlock
    start = time.perf_counter()
    device = torch.device(device)
    cfg_dict = shape_config(shape, layers)
    hf, llm = build(cfg_dict, device, dtype, tokens)
    cfg = llm.config
    blocks = [layer.mlp for layer in llm.model.layers if isinstance(layer.mlp, SparseMoeBlock)]
    D, E, K, inter = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, \
        cfg.moe_intermediate_size
    g = torch.Generator(device=device).manual_seed(1)
    out: dict = dict(shape=shape, layers=layers, moe_layers=len(blocks), tokens=tokens,
                     dtype=str(dtype).replace("torch.", ""), experts=E, top_k=K,
                     device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     hf_experts_implementation=getattr(hf.config, "_experts_implementation",
                                                       None))
    with torch.no_grad():
        # 1. MoE blocks vs a dense GEMM of the same FLOPs
        x = torch.randn(tokens, D, device=device, generator=g).to(dtype)
        _, offsets = group_by_expert(route(blocks[0].gate(x), K, blocks[0].renormalize)[1], E)
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        out["routed_per_expert"] = dict(min=min(counts), max=max(counts),
                                        uniform=tokens * K / E)
        t_moe = timeit(lambda: [b(x) for b in blocks], device, repeats)
        flops = len(blocks) * 2 * tokens * K * 3 * inter * D
        a = torch.randn(tokens * K, D, device=device, generator=g).to(dtype)
        w = torch.randn(3 * inter, D, device=device, generator=g).to(dtype)
        t_dense = timeit(lambda: [a @ w.t() for _ in blocks], device, repeats)
        out.update(moe_ms=t_moe * 1e3, moe_tflops=flops / t_moe / 1e12,
                   dense_ms=t_dense * 1e3, dense_tflops=flops / t_dense / 1e12)
        # 2. prefill vs transformers' forward
        ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=torch.Generator()
                            .manual_seed(2)).tolist()
        ids_t = torch.tensor([ids], device=device)
        ours = llm.logits([ids])
        theirs = hf(ids_t, use_cache=False).logits[0]
        diff = ours.float() - theirs.float()
        # bf16 logits of random weights are large; the scale and a relative L2 say what the
        # largest difference means
        out.update(max_logit_diff=diff.abs().max().item(),
                   logit_scale=theirs.float().abs().max().item(),
                   logit_rel_l2=(diff.norm() / theirs.float().norm()).item())
        del ours, theirs, diff
        t_ours = timeit(lambda: llm.logits([ids]), device, repeats)
        t_hf = timeit(lambda: hf(ids_t, use_cache=False), device, repeats)
        out.update(prefill_ms=t_ours * 1e3, hf_prefill_ms=t_hf * 1e3, prefill_speedup=t_hf / t_ours)
        # transformers' per-expert loop ("eager"), its default before grouped_mm
        if out["hf_experts_implementation"] not in (None, "eager") and hasattr(
                hf, "set_experts_implementation"):
            hf.set_experts_implementation("eager")
            t_eager = timeit(lambda: hf(ids_t, use_cache=False), device, repeats)
            out.update(hf_eager_prefill_ms=t_eager * 1e3, prefill_speedup_eager=t_eager / t_ours)
        # 3. batch-1 decode: the active experts' weights read vs the copy rate, for the decode
        #    GEMV kernels ("gemv", what "auto" runs for 1..8 tokens on a GPU) and the grouped
        #    path ("grouped": sort, gather, grouped GEMMs), each as a CUDA graph of the blocks
        #    (router and top-k included), and each path's experts alone for one layer
        x1 = torch.randn(1, D, device=device, generator=g).to(dtype)
        nbytes = len(blocks) * (K * 3 * inter * D + E * D) * x1.element_size()
        copy = copy_rate(device, (2 << 30) if device.type == "cuda" else (64 << 20))
        out.update(copy_gbs=copy / 1e9, decode={})
        for impl in decode_impls(blocks[0], x1, device):
            for b in blocks:
                b.impl = impl
            t_dec = timeit(graphed(lambda: [b(x1) for b in blocks], device), device,
                           max(repeats, 50))
            w, i = route(blocks[0].gate(x1), K, blocks[0].renormalize)
            w13, w2 = blocks[0].experts.w13.weight, blocks[0].experts.w2.weight
            t_exp = timeit(graphed(lambda: moe_experts(x1, w13, w2, w, i, impl=impl), device),
                           device, max(repeats, 50))
            exp_bytes = K * 3 * inter * D * x1.element_size()
            out["decode"][impl] = dict(us=t_dec * 1e6, read_gbs=nbytes / t_dec / 1e9,
                                       vs_copy=nbytes / t_dec / copy, experts_us=t_exp * 1e6,
                                       experts_vs_copy=exp_bytes / t_exp / copy)
        for b in blocks:
            b.impl = "auto"
        first = next(iter(out["decode"].values()))               # gemv on a GPU
        out.update(decode_us=first["us"], decode_read_gbs=first["read_gbs"],
                   decode_vs_copy=first["vs_copy"])
        if device.type == "cuda" and "gemv" in out["decode"] and (variants == "on" or (
                variants == "auto" and time.perf_counter() - start < VARIANTS_BUDGET_S)):
            out["gemv_variants"] = gemv_variants(x1, w13, w2, w, i, device, exp_bytes, copy)
    return out


def format_result(r: dict) -> str:
    return "\n".join([
        f"MoE, {r['shape']} ({r['layers']} layers, {r['moe_layers']} MoE), {r['dtype']}, "
        f"{r['device']}, random weights; routed tokens per expert at T={r['tokens']}: "
        f"{r['routed_per_expert']['min']}..{r['routed_per_expert']['max']} "
        f"(uniform {r['routed_per_expert']['uniform']:.0f})",
        f"1. MoE blocks at {r['tokens']} tokens: {r['moe_ms']:.2f} ms, {r['moe_tflops']:.0f} "
        f"TFLOP/s; dense GEMM of the same FLOPs: {r['dense_ms']:.2f} ms, "
        f"{r['dense_tflops']:.0f} TFLOP/s; ratio {r['moe_tflops'] / r['dense_tflops']:.2f}",
        f"2. prefill ({r['layers']} layers, {r['tokens']} tokens): weavelm {r['prefill_ms']:.2f} ms,"
        f" transformers ({r['hf_experts_implementation']}) {r['hf_prefill_ms']:.2f} ms; "
        f"{r['prefill_speedup']:.2f}x (max |logit diff| {r['max_logit_diff']:.3g} of logits up "
        f"to {r['logit_scale']:.3g}, relative L2 {r['logit_rel_l2']:.3g})"
        + (f"; transformers (eager expert loop) {r['hf_eager_prefill_ms']:.2f} ms, "
           f"{r['prefill_speedup_eager']:.2f}x" if "hf_eager_prefill_ms" in r else ""),
        f"3. batch-1 decode of the MoE blocks (CUDA graph, router included), active experts' "
        f"weights read vs copy {r['copy_gbs']:.0f} GB/s (bytes read + written):",
        *[f"   {impl:8s} {d['us']:8.1f} us  {d['read_gbs']:5.0f} GB/s  ratio {d['vs_copy']:.2f}"
          f"   (experts alone, one layer: {d['experts_us']:.1f} us, ratio "
          f"{d['experts_vs_copy']:.2f})" for impl, d in r["decode"].items()],
        *[f"   gemv plan {name:24s} experts alone {d['us']:7.1f} us, ratio {d['vs_copy']:.2f}"
          for name, d in r.get("gemv_variants", {}).items()]])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--decode-variants", default="auto", choices=["auto", "on", "off"],
                   help="also time the GEMV kernels' launch-plan variants (6 compiles); auto: "
                        f"when the run so far took under {VARIANTS_BUDGET_S} s")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = run(args.shape, args.layers, args.tokens, args.device,
                 getattr(torch, args.dtype), args.repeats, args.decode_variants)
    print(format_result(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
