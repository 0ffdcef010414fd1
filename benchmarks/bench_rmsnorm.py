"""Fused residual-add + RMSNorm on one GPU: correctness first, then every timing, one table last.

    WEAVELM_DISABLE_MULTICAST=1 python3 benchmarks/bench_rmsnorm.py --tokens 16384 --hidden 8192

What it measures (T = tokens, D = hidden, bf16 unless --dtype):
* kernel time (CUDA events, median of --iters after --warmup) of our fused kernel, torch eager of
  the reference, and torch.compile of the same math;
* bandwidth: bytes moved / time. The fused kernel reads x and residual and writes residual and
  out: 4 * T * D * itemsize bytes (the D-element weight is negligible). The yardstick is a
  device-to-device `dst.copy_(src)` moving the same bytes (src of 2 * T * D elements: read once,
  written once), i.e. what the memory system delivers to a pure streaming kernel;
* host launch overhead (median of --launch-iters calls, `time.perf_counter_ns` around each call)
  of our launcher on the cuda.core path and on numba's launch path, of the raw Kernel.launch,
  and of torch's own `y.add_(x)` beside them; all on a 1-token problem so the GPU keeps up;
* a CUDA graph of 100 launches: replays bit-identical to the eager chain, and its time per launch.
Each section is fenced: one failing variant prints its error and the script goes on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# Single-GPU script; multicast is never touched, the guard variables are set for policy anyway.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1"), ("WEAVELM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cuda_timing import cuda_time_us  # noqa: E402
from weavelm.kernels import launcher  # noqa: E402
from weavelm.kernels import rmsnorm as R  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}
EPS = 1e-6
rows: list[tuple[str, str, str]] = []  # (what, value, note) for the final table
failures: list[str] = []


def section(name):
    """Run the decorated function now; print and record its exception instead of dying."""
    def run(fn):
        print(f"\n== {name}", flush=True)
        try:
            fn()
        except Exception:  # noqa: BLE001 - one shot on a scarce GPU: keep going
            traceback.print_exc()
            failures.append(name)
            rows.append((name, "FAILED", "see traceback above"))
        return fn
    return run


def host_time_us(fn, iters) -> float:
    """Median host time per call in us; synchronizes every 256 calls so the queue never fills."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
        if i % 256 == 255:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(times) / 1e3


def ref64(x, res, w):
    h = x.double() + res.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--launch-iters", type=int, default=3000)
    args = p.parse_args()
    T, D, dtype = args.tokens, args.hidden, DTYPES[args.dtype]
    dev = torch.cuda.current_device()
    gpu = torch.cuda.get_device_name(dev)
    print(f"GPU {gpu}; torch {torch.__version__}; T={T} D={D} {args.dtype}; "
          f"launch path default: {launcher.default_path()}")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    res0 = torch.randn(T, D, device="cuda", generator=g).to(dtype)
    w = torch.randn(D, device="cuda", generator=g).to(dtype)
    nbytes = 4 * T * D * x.element_size()

    @section("correctness")
    def _():
        checks = [(t, d, dt) for dt in DTYPES.values()
                  for t, d in ((1, 576), (7, 4096), (4099, 8192))]
        checks.append((T, D, dtype))
        for t, d, dt in checks:
            xx = torch.randn(t, d, device="cuda").to(dt)
            rr = torch.randn(t, d, device="cuda").to(dt)
            ww = torch.randn(d, device="cuda").to(dt)
            for inplace in (True, False):
                out = torch.full_like(xx, float("nan"))
                r_in = rr.clone()
                y, nr = R.fused_add_rms_norm(xx, r_in, ww, EPS, out=out, inplace_residual=inplace)
                _, want_r = R.fused_add_rms_norm_ref(xx, rr, ww, EPS, inplace_residual=False)
                want_y = ref64(xx, rr, ww)
                err = (y.double() - want_y).abs().max().item()
                ok = (torch.allclose(y.double(), want_y, rtol=TOL[dt], atol=TOL[dt])
                      and torch.equal(nr, want_r)
                      and not torch.isnan(y).any().item() and (nr is r_in) == inplace)
                yp = R.rms_norm(xx, ww, EPS)
                want_p = R.rms_norm_ref(xx.double(), ww.double(), EPS)
                ok = ok and torch.allclose(yp.double(), want_p, rtol=TOL[dt], atol=TOL[dt])
                print(f"  {str(dt):15s} T={t:5d} D={d:5d} inplace={inplace!s:5s} "
                      f"max|y-ref64|={err:.3g} {'PASS' if ok else 'FAIL'}")
                if not ok:
                    raise AssertionError(f"mismatch at {dt} T={t} D={d} inplace={inplace}")
        fell_back = [k.name for k in launcher._kernels.values() if k.path == "numba"]
        rows.append(("correctness vs float64 (3 dtypes, inplace and not)", "PASS",
                     f"cuda.core fell back for: {fell_back}" if fell_back else "cuda.core path"))

    def time_row(name, fn, bytes_moved=nbytes):
        us = cuda_time_us(fn, args.iters, args.warmup)
        gbs = bytes_moved / us / 1e3
        print(f"  {name}: {us:.1f} us, {gbs:.0f} GB/s")
        rows.append((name, f"{us:.1f} us", f"{gbs:.0f} GB/s"))
        return us

    timings = {}

    @section("device-to-device copy (same bytes)")
    def _():
        src = torch.empty(2 * T * D, dtype=dtype, device="cuda")
        dst = torch.empty_like(src)
        timings["copy"] = time_row("D2D copy_ (2*T*D elems)", lambda: dst.copy_(src))

    @section("fused kernel")
    def _():
        res, out = res0.clone(), torch.empty_like(x)
        timings["ours"] = time_row(f"weavelm fused add+RMSNorm [{T}x{D}]",
                                   lambda: R.fused_add_rms_norm(x, res, w, EPS, out=out))
        if "copy" in timings:
            ratio = timings["copy"] / timings["ours"]
            rows.append(("  fused bandwidth / copy bandwidth", f"{ratio:.0%}", ""))

    @section("torch eager reference")
    def _():
        res, out = res0.clone(), torch.empty_like(x)
        timings["eager"] = time_row("torch eager reference",
                                    lambda: R.fused_add_rms_norm_ref(x, res, w, EPS, out=out))

    @section("torch.compile")
    def _():
        def f(x, res, w):
            h = x.float() + res.float()
            y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.float()
            return y.to(x.dtype), h.to(x.dtype)
        cf = torch.compile(f)
        t0 = time.time()
        cf(x, res0, w)
        torch.cuda.synchronize()
        print(f"  compiled in {time.time() - t0:.1f} s")
        y, r = cf(x, res0, w)
        err = (y.double() - ref64(x, res0, w)).abs().max().item()
        print(f"  max|y-ref64| = {err:.3g}")
        timings["compile"] = time_row("torch.compile (functional, allocates outputs)",
                                      lambda: cf(x, res0, w))

    @section("host launch overhead")
    def _():
        x1, r1, w1 = x[:1].clone(), res0[:1].clone(), w
        o1 = torch.empty_like(x1)
        call = lambda: R.fused_add_rms_norm(x1, r1, w1, EPS, out=o1)  # noqa: E731
        call()
        torch.cuda.synchronize()
        kern, grid, block = R._plan_for(R.DTYPES[dtype], True, D * x1.element_size() // 16, 1,
                                        dev)
        kargs = (x1.data_ptr(), r1.data_ptr(), w1.data_ptr(), o1.data_ptr(), r1.data_ptr(), 1,
                 D * x1.element_size() // 16, EPS)
        res = {}
        for path in ("core", "numba"):
            kern.path = path
            res[f"launcher {path}: fused_add_rms_norm(...) full call"] = host_time_us(
                call, args.launch_iters)
            res[f"launcher {path}: Kernel.launch(...) only"] = host_time_us(
                lambda: kern.launch(grid, block, dev, *kargs), args.launch_iters)
        kern.path = None
        a = torch.randn(1, D, device="cuda").to(dtype)
        b = torch.randn(1, D, device="cuda").to(dtype)
        res["torch y.add_(x)"] = host_time_us(lambda: a.add_(b), args.launch_iters)
        for k, v in res.items():
            print(f"  {k}: {v:.2f} us/call (host, median of {args.launch_iters})")
            rows.append((f"host: {k}", f"{v:.2f} us", f"median of {args.launch_iters}"))

    @section("CUDA graph of 100 launches")
    def _():
        n = 100
        res, out = res0.clone(), torch.empty_like(x)
        R.fused_add_rms_norm(x, res, w, EPS, out=out)
        torch.cuda.synchronize()
        res.copy_(res0)
        for _ in range(n):
            R.fused_add_rms_norm(x, res, w, EPS, out=out)
        want_res, want_out = res.clone(), out.clone()
        graph, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(graph, stream=s):
            for _ in range(n):
                R.fused_add_rms_norm(x, res, w, EPS, out=out)
        torch.cuda.current_stream().wait_stream(s)
        res.copy_(res0)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ok = torch.equal(res, want_res) and torch.equal(out, want_out)
        print(f"  replay bit-identical to eager chain: {ok}")
        us = cuda_time_us(graph.replay, max(5, args.iters // 10), 2)
        rows.append(("CUDA graph, 100 launches", "PASS" if ok else "FAIL",
                     f"{us / n:.1f} us per launch in replay"))
        if not ok:
            raise AssertionError("graph replay differs from the eager chain")

    print(f"\n### RMSNorm on {gpu} — T={T}, D={D}, {args.dtype} "
          f"(torch {torch.__version__}, {time.strftime('%Y-%m-%d')})\n")
    print("| what | value | note |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"\nbytes moved per fused call: {nbytes / 1e6:.1f} MB (x, residual read; residual, out "
          f"written). Failed sections: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
