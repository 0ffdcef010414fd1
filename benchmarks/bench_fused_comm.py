"""Fused all-reduce + residual + RMSNorm (p2p) against the unfused baselines, on N GPUs.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    WEAVELM_DISABLE_MULTICAST=1 torchrun --nproc-per-node N benchmarks/bench_fused_comm.py \\
        --hidden 8192 --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32

Per token count T (bf16, hidden D), after a correctness check against NCCL + RMSNorm:
* fused p2p: `reduce_scatter_add_rms_norm_all_gather` on the staging buffer (zero-copy input),
  at every CTA count of --ctas (the sweep) and at the best one;
* NCCL all-reduce + weavelm's fused add+RMSNorm kernel (the unfused path);
* torch SymmetricMemory `two_shot_all_reduce_` + the same RMSNorm (if the op exists);
* for T <= --graph-max-tokens: NCCL + RMSNorm captured in a CUDA graph, and the fused op in a
  CUDA graph (eager timings include each path's host launch cost, graph timings do not);
* plain all-reduce alone: NCCL vs ours (one-shot up to 512 KiB, else two-shot).
Timing: CUDA events around each call, median of --iters after --warmup, a barrier before each
variant. Bytes = T * D * 2; bus bandwidth = bytes / time * 2 (N - 1) / N (NCCL's convention).
Every variant runs in try/except: a failing one prints its error and the rest go on.
Rank 0 prints a markdown table and the CTA sweep last; --plot out.png draws them (matplotlib).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1"), ("WEAVELM_DISABLE_MULTICAST", "1")):
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from cuda_timing import cuda_time_us  # noqa: E402

EPS = 1e-5
TOL = 1e-1  # vs NCCL + RMSNorm: NCCL rounds the sum to bf16, we sum in fp32


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def graphed(fn):
    """fn captured in a CUDA graph (warmed up on a side stream); returns graph.replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--tokens", default="1,128,512,1024,2048,4096,8192,16384")
    p.add_argument("--ctas", default="2,4,8,16,32")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--graph-max-tokens", type=int, default=512)
    p.add_argument("--compare-kernels", action="store_true",
                   help="also check and sweep the other p2p kernel: scatter (stores only) "
                        "beside the default pull kernel, or pull with WEAVELM_P2P_SCATTER=1")
    p.add_argument("--plot", default=None, help="write a latency plot (needs matplotlib)")
    p.add_argument("--json", default=None, help="write every timing here (for plotting later)")
    args = p.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    ctas_list = [int(c) for c in args.ctas.split(",")]
    D, dtype = args.hidden, torch.bfloat16

    from weavelm.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref
    from weavelm.parallel.communicator import row_range
    from weavelm.parallel.fused_communicator import P2PCommunicator
    from weavelm.parallel.state import init_parallel

    state = init_parallel(device="cuda", timeout_s=180)
    rank, N = state.rank, state.world_size
    gpu = torch.cuda.get_device_name()
    log0(f"# fused comm benchmark: {N} x {gpu}, torch {torch.__version__}, D={D} bf16, "
         f"{time.strftime('%Y-%m-%d %H:%M')}\n# command: {' '.join(sys.argv)}")
    comm = P2PCommunicator(state, ctas=max(ctas_list))
    comm.reserve(max(tokens), D, dtype)
    group_name = dist.group.WORLD.group_name
    two_shot = getattr(getattr(torch.ops, "symm_mem", None), "two_shot_all_reduce_", None)
    if two_shot is None:
        log0("torch.ops.symm_mem.two_shot_all_reduce_ not found: that baseline is skipped")

    res = {}    # (variant, T) -> us
    notes = {}  # T -> correctness note
    sweep = {}  # (T, ctas) -> us
    sweep_other = {}  # (T, ctas) -> us, the other p2p kernel (--compare-kernels)
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)
    w = torch.randn(D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7)
                    ).to(dtype)

    def variant(name, T, fn):
        """Time fn as `name` at T; failures are printed, recorded and do not stop the run."""
        failed = False
        try:
            res[(name, T)] = cuda_time_us(fn, args.iters, args.warmup, ranks="once")
            log0(f"  {name:34s} T={T:6d}: {res[(name, T)]:9.1f} us")
        except Exception:  # noqa: BLE001
            failed = True
            print(f"[rank {rank}] {name} T={T} failed:\n{traceback.format_exc()}", flush=True)
        if any_rank(failed):
            res[(name, T)] = float("nan")
            try:
                comm.reset()
            except Exception:  # noqa: BLE001
                traceback.print_exc()

    def check_and_sweep(T, x, part, res_full, res_rows, s, e, sweep_out, label):
        """Correctness against NCCL + RMSNorm, then the CTA sweep, of the current kernel."""
        # correctness: fused vs NCCL all-reduce + RMSNorm (then one collective: all agree)
        ok, msg = False, "ERROR"
        res_rows.copy_(res_full[s:e])   # an earlier sweep updated it in place
        try:
            ref_x = part.clone()
            dist.all_reduce(ref_x)
            ref_y, ref_res = fused_add_rms_norm_ref(ref_x, res_full.clone(), w, EPS)
            x.copy_(part)
            y = comm.reduce_scatter_add_rms_norm_all_gather(x, res_rows, w, EPS)
            comm.check_errors()
            err = (y.float() - ref_y.float()).abs().max().item()
            rerr = (res_rows.float() - ref_res[s:e].float()).abs().max().item() \
                if e > s else 0.
            ok = err <= TOL * (1 + ref_y.float().abs().max().item()) and rerr <= TOL * 4
            msg = f"max|dy| {err:.3g}, max|dres| {rerr:.3g}"
        except Exception:  # noqa: BLE001
            print(f"[rank {rank}] correctness T={T} failed:\n{traceback.format_exc()}",
                  flush=True)
        bad = any_rank(not ok)
        kernel = "scatter" if comm.scatter else "pull"
        notes[T] = notes.get(T, "") + \
            f"{kernel}: {'FAIL' if bad else 'PASS'} ({msg} on rank 0) "
        log0(f"  correctness vs NCCL+RMSNorm: {notes[T]}")
        if bad:
            comm.reset()

        x.copy_(part)
        for c in ctas_list:
            variant(f"fused p2p{label}, {c} CTAs", T,
                    lambda c=c: comm.reduce_scatter_add_rms_norm_all_gather(x, res_rows, w, EPS,
                                                                            ctas=c))
            sweep_out[(T, c)] = res[(f"fused p2p{label}, {c} CTAs", T)]

    for T in tokens:
        log0(f"\n== T={T} ({T * D * 2 / 1e6:.2f} MB)")
        s, e = row_range(T, rank, N)
        part = torch.randn(T, D, device="cuda", generator=g).to(dtype)
        res_full = torch.randn(T, D, device="cuda",
                               generator=torch.Generator(device="cuda").manual_seed(T)).to(dtype)
        x = comm.staging(T, D, dtype)
        res_rows = res_full[s:e].clone()

        default_scatter = comm.scatter
        for other in [False] + ([True] if args.compare_kernels else []):
            comm.scatter = default_scatter != other
            check_and_sweep(T, x, part, res_full, res_rows, s, e,
                            sweep_other if other else sweep,
                            f" {'scatter' if comm.scatter else 'pull'}" if other else "")
        comm.scatter = default_scatter

        xn, yn, rn = part.clone(), torch.empty_like(part), res_full.clone()

        def nccl_norm():
            dist.all_reduce(xn)
            fused_add_rms_norm(xn, rn, w, EPS, out=yn)
        variant("NCCL all-reduce + RMSNorm", T, nccl_norm)
        variant("NCCL all-reduce only", T, lambda: dist.all_reduce(xn))

        if two_shot is not None:
            try:
                import torch.distributed._symmetric_memory as symm
                sb = symm.empty((T, D), dtype=dtype, device=f"cuda:{torch.cuda.current_device()}")
                symm.rendezvous(sb, group_name)
                sb.copy_(part)
                ys, rs = torch.empty_like(part), res_full.clone()

                def symm_norm():
                    two_shot(sb, "sum", group_name)
                    fused_add_rms_norm(sb, rs, w, EPS, out=ys)
                variant("torch symm two-shot + RMSNorm", T, symm_norm)
            except Exception:  # noqa: BLE001
                print(f"[rank {rank}] symm two-shot setup T={T} failed:\n"
                      f"{traceback.format_exc()}", flush=True)
                any_rank(True)

        xa = comm.staging(T, D, dtype)
        variant("weavelm all-reduce only", T, lambda: comm.all_reduce(xa))

        if T <= args.graph_max_tokens:
            best_c = min(ctas_list, key=lambda c: sweep.get((T, c), float("inf")))
            for name, fn in (("NCCL + RMSNorm, CUDA graph", nccl_norm),
                             ("fused p2p, CUDA graph",
                              lambda: comm.reduce_scatter_add_rms_norm_all_gather(
                                  x, res_rows, w, EPS, ctas=best_c))):
                try:
                    replay = graphed(fn)
                    failed = False
                except Exception:  # noqa: BLE001
                    print(f"[rank {rank}] capture of {name} T={T} failed:\n"
                          f"{traceback.format_exc()}", flush=True)
                    failed = True
                if any_rank(failed):
                    res[(name, T)] = float("nan")
                    continue
                variant(name, T, replay)
        try:
            comm.check_errors()
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    report(args, tokens, ctas_list, res, sweep, notes, N, gpu, D, sweep_other)


def report(args, tokens, ctas_list, res, sweep, notes, N, gpu, D, sweep_other=None):
    if dist.get_rank() != 0:
        return
    nan = float("nan")

    def best(T):
        vals = [(sweep.get((T, c), nan), c) for c in ctas_list]
        vals = [v for v in vals if v[0] == v[0]]
        return min(vals) if vals else (nan, None)

    def busbw(us, T):
        return T * D * 2 / (us * 1e-6) * 2 * (N - 1) / N / 1e9 if us == us and us > 0 else nan

    cols = ["NCCL all-reduce + RMSNorm", "torch symm two-shot + RMSNorm",
            "NCCL + RMSNorm, CUDA graph", "fused p2p, CUDA graph", "NCCL all-reduce only",
            "weavelm all-reduce only"]
    print(f"\n### Fused all-reduce + residual + RMSNorm, {N} x {gpu}, hidden {D}, bf16 "
          f"(torch {torch.__version__}, {time.strftime('%Y-%m-%d')}); us, median of "
          f"{args.iters}; bus bandwidth = bytes / t * 2(N-1)/N\n")
    print("| tokens | MB | fused p2p best (CTAs) | busbw GB/s | " + " | ".join(cols)
          + " | fused vs NCCL+norm | check |")
    print("|" + " --- |" * (len(cols) + 6))
    for T in tokens:
        b, c = best(T)
        base = res.get(("NCCL all-reduce + RMSNorm", T), nan)
        speed = f"{base / b:.2f}x" if b == b and base == base else "-"
        cells = [f"{res[(k, T)]:.1f}" if res.get((k, T), nan) == res.get((k, T), nan) else "-"
                 for k in cols]
        print(f"| {T} | {T * D * 2 / 1e6:.2f} | {b:.1f} ({c}) | {busbw(b, T):.0f} | "
              + " | ".join(cells) + f" | {speed} | {notes.get(T, '-')} |")
    default = "scatter" if os.environ.get("WEAVELM_P2P_SCATTER", "0") == "1" else "pull"
    other = "pull" if default == "scatter" else "scatter"
    for title, sw in ((f"fused p2p, {default} kernel (default)", sweep),
                      (f"fused p2p, {other} kernel", sweep_other)):
        if not sw:
            continue
        print(f"\n### CTA sweep: {title}, us\n")
        print("| tokens | " + " | ".join(f"{c} CTAs" for c in ctas_list) + " |")
        print("|" + " --- |" * (len(ctas_list) + 1))
        for T in tokens:
            print(f"| {T} | " + " | ".join(f"{sw.get((T, c), nan):.1f}" for c in ctas_list)
                  + " |")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "world": N, "hidden": D, "tokens": tokens, "ctas": ctas_list,
                       "res": {f"{k}|{T}": v for (k, T), v in res.items()},
                       "sweep": {f"{T}|{c}": v for (T, c), v in sweep.items()},
                       "sweep_other": {f"{T}|{c}": v for (T, c), v in (sweep_other or {}).items()},
                       "default_kernel": default}, f, indent=1)
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
            a1.plot(tokens, [best(T)[0] for T in tokens], "o-", label="fused p2p (best CTAs)")
            for k in cols:
                ys = [res.get((k, T), nan) for T in tokens]
                if any(y == y for y in ys):
                    a1.plot(tokens, ys, ".--", label=k)
            a1.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us",
                   title=f"{N} x {gpu}, hidden {D}")
            a1.legend(fontsize=7)
            for T in tokens:
                a2.plot(ctas_list, [sweep.get((T, c), nan) for c in ctas_list], "o-",
                        label=f"T={T}")
            a2.set(xscale="log", yscale="log", xlabel="CTAs", ylabel="us", title="CTA sweep")
            a2.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"\nplot written to {args.plot}")
        except ImportError:
            print("\nmatplotlib not installed: no plot")
        except Exception:  # noqa: BLE001
            traceback.print_exc()


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
