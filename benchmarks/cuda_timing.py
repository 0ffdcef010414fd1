"""CUDA-event timing shared by the benchmark scripts (run as `python benchmarks/x.py` or under
torchrun: this folder is on sys.path)."""
from __future__ import annotations

import statistics

import torch


def cuda_time_us(fn, iters: int, warmup: int, *, ranks: str | None = None) -> float:
    """Median device time of fn() in µs, CUDA events around each call.

    ranks (torch.distributed initialised): "once" - a barrier before the timed calls; "each" -
    a barrier before every call; either way the slowest rank's median is returned, the time of
    a collective. None: this process alone."""
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if ranks == "once":
        dist.barrier()
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if ranks == "each":
            dist.barrier()
            torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    t = statistics.median(times)
    if ranks is None:
        return t
    t = torch.tensor([t], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def graph_us(fn, calls=20, repeats=5):
    """µs per call of fn: a CUDA graph of `calls` calls (no launch overhead), median of
    `repeats` replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)
