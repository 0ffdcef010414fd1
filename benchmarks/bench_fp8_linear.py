"""FP8 linear layers on one GPU against bf16, Llama-3-8B's four GEMM shapes, side by side:

    python3 benchmarks/bench_fp8_linear.py [--tokens 1,16,64,256,2048] [--gemv-sweep]

Columns, µs per call (CUDA graph of 20 calls, median of 5 replays): bf16 `F.linear`;
`fp8_linear` (per-token activation rounding + `torch._scaled_mm` with row-wise scales: what the
layers run); `_scaled_mm` alone on activations already in FP8 (the GEMM's share); and the
weight-read bound of each (weight bytes / the copy rate measured here). At a few tokens a
linear layer is bound by reading its weights, so FP8 can be at most 2x bf16 there.
`--gemv-sweep` adds the FP8 GEMV alone at 1 and 4 tokens for each split of K (warps per row
group), beside the activation rounding alone and the GEMV that rounds its input itself (what
`fp8_linear` runs at 1 token), as fractions of the copy rate. `--mma-sweep` times the FP8
tensor-core kernel (`kernels/fp8_mma.py`, 5-64 tokens) against `_scaled_mm` at 8-64 tokens, at
its default split of K and at each of 1, 2, 4, 8 slices; `--wgmma-sweep` the same for the
warpgroup kernel (`kernels/fp8_wgmma.py`, Hopper) at 8-64 tokens, `fp8_mma` beside it.
`--knob MODULE.NAME=VALUE` sets a module constant first (benchmarks/knobs.py), e.g.
kernels.fp8_mma.UNROLL=2.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cuda_timing import graph_us  # noqa: E402  (this folder is on sys.path)
import knobs  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def copy_rate() -> float:
    x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (graph_us(lambda: y.copy_(x), calls=5) * 1e-6)


def main():
    knobs.apply([sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--knob"])
    from weavelm.parallel.fp8 import fp8_linear, quantize_rows
    tokens = [int(t) for t in (sys.argv[sys.argv.index("--tokens") + 1]
                               if "--tokens" in sys.argv else "1,16,64,256,2048").split(",")]
    rate = copy_rate()
    if "--mma-sweep" in sys.argv or "--wgmma-sweep" in sys.argv:
        mma_sweep(rate, "fp8_wgmma" if "--wgmma-sweep" in sys.argv else "fp8_mma")
        return
    print(f"## FP8 linear vs bf16, {torch.cuda.get_device_name()}, copy {rate / 1e12:.2f} TB/s; "
          f"µs per call (CUDA graph)\n")
    print("| GEMM | tokens | bf16 | fp8_linear | _scaled_mm only | bf16 bound | fp8 bound | "
          "bf16 / fp8_linear | rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
        codes, scale = quantize_rows(w)
        for m in tokens:
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            xq, xs = quantize_rows(x)
            t_bf = graph_us(lambda: torch.nn.functional.linear(x, w))
            t_fp8 = graph_us(lambda: fp8_linear(x, codes, scale))
            t_mm = graph_us(lambda: torch._scaled_mm(xq, codes.t(), scale_a=xs[:, None],
                                                     scale_b=scale[None, :],
                                                     out_dtype=torch.bfloat16))
            ref = torch.nn.functional.linear(x.float(), w.float())
            err = ((fp8_linear(x, codes, scale).float() - ref).norm() / ref.norm()).item()
            print(f"| {name} {n}x{k} | {m} | {t_bf:.1f} | {t_fp8:.1f} | {t_mm:.1f} | "
                  f"{2 * n * k / rate * 1e6:.1f} | {n * k / rate * 1e6:.1f} | "
                  f"{t_bf / t_fp8:.2f}x | {err:.4f} |", flush=True)
    if "--gemv-sweep" in sys.argv:
        gemv_sweep(rate)
        fast_accum(tokens)


def fast_accum(tokens):
    """`_scaled_mm` with and without `use_fast_accum` (Hopper's FP8 accumulation promoted less
    often), µs and relative error against the float32 product of the rounded operands."""
    from weavelm.parallel.fp8 import dequantize_rows, quantize_rows
    print("\n## _scaled_mm: exact vs fast accumulation, µs (rel. error)\n")
    print("| GEMM | tokens | exact | fast |")
    print("| --- | --- | --- | --- |")
    g = torch.Generator(device="cuda").manual_seed(2)
    for name, (n, k) in SHAPES.items():
        codes, scale = quantize_rows((torch.randn(n, k, device="cuda", generator=g) * 0.02)
                                     .bfloat16())
        for m in [t for t in tokens if t >= 16]:
            xq, xs = quantize_rows(torch.randn(m, k, device="cuda", generator=g).bfloat16())
            ref = dequantize_rows(xq, xs) @ dequantize_rows(codes, scale).t()
            cells = []
            for fast in (False, True):
                def mm():
                    return torch._scaled_mm(xq, codes.t(), scale_a=xs[:, None],
                                            scale_b=scale[None, :], out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)
                err = ((mm().float() - ref).norm() / ref.norm()).item()
                cells.append(f"{graph_us(mm):.1f} ({err:.1e})")
            print(f"| {name} | {m} | " + " | ".join(cells) + " |", flush=True)


def mma_sweep(rate: float, kernel: str):
    """`kernel` ("fp8_mma" or "fp8_wgmma") against `_scaled_mm` at 8-64 tokens, per split."""
    import importlib

    from weavelm.kernels import fp8_mma
    from weavelm.parallel.fp8 import quantize_rows
    mod = importlib.import_module(f"weavelm.kernels.{kernel}")
    run = getattr(mod, f"{kernel}_cuda")
    wg = kernel == "fp8_wgmma"
    splits = [1, 2, 4, 8]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"## {kernel} against `_scaled_mm`, µs (fraction of the copy rate)\n")
    print("| GEMM | tokens | _scaled_mm | " + ("fp8_mma (default split) | " if wg else "")
          + f"{kernel} (default split) | " + " | ".join(f"split {s}" for s in splits)
          + " | max rel. diff |")
    print("| --- | --- | --- | " + ("--- | " if wg else "") + "--- | "
          + " | ".join("---" for _ in splits) + " | --- |")
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, (n, k) in SHAPES.items():
        codes, scale = quantize_rows((torch.randn(n, k, device="cuda", generator=g) * 0.02)
                                     .bfloat16())
        # copies of the weights cycled through, more bytes than L2 holds (reads from memory)
        copies = [codes] + [codes.clone() for _ in range(-(-150_000_000 // (n * k)) - 1)]
        for m in ((8, 16, 24, 32, 48, 64) if wg else (8, 16, 32, 64)):
            xq, xs = quantize_rows(torch.randn(m, k, device="cuda", generator=g).bfloat16())

            def frac(t):
                return f"{t:.1f} ({n * k / rate / (t * 1e-6):.2f})"

            def cycled(f):
                it = itertools.cycle(copies)
                return graph_us(lambda: f(next(it)))

            def mm(c):
                return torch._scaled_mm(xq, c.t(), scale_a=xs[:, None],
                                        scale_b=scale[None, :], out_dtype=torch.bfloat16)
            ref = mm(codes).float()
            got = run(xq, xs, codes, scale, torch.bfloat16).float()
            diff = ((got - ref).norm() / ref.norm()).item()
            cells = [frac(cycled(mm))]
            if wg:
                cells.append(frac(cycled(lambda c: fp8_mma.fp8_mma_cuda(
                    xq, xs, c, scale, torch.bfloat16))))
            cells.append(frac(cycled(lambda c: run(xq, xs, c, scale, torch.bfloat16)))
                         + f" S={mod.split_k(n, k, sms)}")
            for sp in splits:
                cells.append(frac(cycled(lambda c: run(xq, xs, c, scale, torch.bfloat16,
                                                       splits=sp))))
            print(f"| {name} | {m} | " + " | ".join(cells) + f" | {diff:.1e} |", flush=True)


def gemv_sweep(rate: float):
    from weavelm.kernels import fp8_gemv, fp8_quant
    from weavelm.parallel.fp8 import quantize_rows
    kws = [1, 2, 4, 8]
    print("\n## FP8 GEMV alone, µs (fraction of the copy rate) per split of K; rounding alone\n")
    print("| GEMM | tokens | " + " | ".join(f"kw {k}" for k in kws) +
          " | default kw | rounding | rounding + GEMV fused |")
    print("| --- | --- | " + " | ".join("---" for _ in kws) + " | --- | --- | --- |")
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, (n, k) in SHAPES.items():
        codes, scale = quantize_rows((torch.randn(n, k, device="cuda", generator=g) * 0.02)
                                     .bfloat16())
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            xq, xs = quantize_rows(x)
            cells = []
            for kw in kws:
                t = graph_us(lambda: fp8_gemv.fp8_gemv_cuda(xq, xs, codes, scale, x.dtype, kw=kw))
                cells.append(f"{t:.1f} ({n * k / rate / (t * 1e-6):.2f})")
            t_q = graph_us(lambda: fp8_quant.quantize_rows_cuda(x))
            fused = "-"                                   # (one token only)
            if fp8_gemv.fused_supported(x, codes):
                t_f = graph_us(lambda: fp8_gemv.fp8_gemv_fused(x, codes, scale))
                fused = f"{t_f:.1f} ({n * k / rate / (t_f * 1e-6):.2f})"
            print(f"| {name} | {m} | " + " | ".join(cells) +
                  f" | {fp8_gemv.split_k(n, k)} | {t_q:.1f} | {fused} |", flush=True)


if __name__ == "__main__":
    main()
