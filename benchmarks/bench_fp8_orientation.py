"""FP8 GEMMs of Llama-3-8B's four projections at 1-128 tokens, µs (CUDA events, mean of 50):
bf16 `mm`; `_scaled_mm` as `fp8_linear` asks it (x W^T), with and without fast accumulation;
asked for (W x^T)^T (fp8.SWAP_TOKENS), with the transposing copy and without; the GEMV with
the rounding kernel (1-4 tokens). Then `fp8_linear` at 1 and 4 tokens per count of vectors the
GEMV prefetches to L2 (fp8_gemv.PREFETCH_STEPS), its outputs equal across them.

    python3 benchmarks/bench_fp8_orientation.py
"""
import torch

from weavelm.kernels import fp8_gemv
from weavelm.parallel import fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
NAN = float("nan")


def timed(fn, n=50):
    for _ in range(5):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n * 1e3


def scaled(xq, xs, codes, ws, fast=False):
    return torch._scaled_mm(xq, codes.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                            out_dtype=torch.bfloat16, use_fast_accum=fast)


def swapped(xq, xs, codes, ws, fast=False):
    return torch._scaled_mm(codes, xq.t(), scale_a=ws[:, None], scale_b=xs[None, :],
                            out_dtype=torch.bfloat16, use_fast_accum=fast)


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, µs a GEMM\n")
    print("| layer | tokens | bf16 mm | xW^T | xW^T fast | (Wx^T)^T + copy | same, fast | "
          "Wx^T alone | GEMV + rounding |")
    print("| --- " * 9 + "|")
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", generator=g).bfloat16() * 0.02
        codes, ws = fp8.quantize_rows(w)
        for T in (1, 4, 8, 16, 32, 64, 128):
            x = torch.randn(T, K, device="cuda", generator=g).bfloat16()
            xq, xs = fp8.quantize_rows(x)
            ok = T % 16 == 0
            r = [timed(lambda: x @ w.t()),
                 timed(lambda: scaled(xq, xs, codes, ws)),
                 timed(lambda: scaled(xq, xs, codes, ws, True))]
            for fast in (False, True):
                r.append(timed(lambda: swapped(xq, xs, codes, ws, fast).t().contiguous())
                         if ok else NAN)
            r.append(timed(lambda: swapped(xq, xs, codes, ws, True)) if ok else NAN)
            r.append(timed(lambda: fp8_gemv.fp8_gemv_cuda(*fp8.quantize_rows(x), codes, ws,
                                                          torch.bfloat16)) if T <= 4 else NAN)
            if ok:
                a = scaled(xq, xs, codes, ws).float()
                b = swapped(xq, xs, codes, ws).t().float()
                assert ((a - b).norm() / a.norm()).item() < 1e-2, (name, T)
            print(f"| {name} | {T} | " + " | ".join(f"{v:.1f}" for v in r) + " |", flush=True)

    print("\n| layer | tokens | prefetch 0 | 2 | 4 | 8 | (µs, fp8_linear) |")
    print("| --- " * 7 + "|")
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", generator=g).bfloat16() * 0.02
        codes, ws = fp8.quantize_rows(w)
        for T in (1, 4):
            x = torch.randn(T, K, device="cuda", generator=g).bfloat16()
            r, ref = [], None
            for pf in (0, 2, 4, 8):
                fp8_gemv.PREFETCH_STEPS = pf
                r.append(timed(lambda: fp8.fp8_linear(x, codes, ws), 200))
                y = fp8.fp8_linear(x, codes, ws)
                ref = y if ref is None else ref
                assert torch.equal(y, ref), (name, T, pf)
            print(f"| {name} | {T} | " + " | ".join(f"{v:.2f}" for v in r) + " |", flush=True)


if __name__ == "__main__":
    main()
