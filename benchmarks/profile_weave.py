"""Per-kernel timeline of one prefill per schedule on rank 0, to see where the time goes.

    torchrun --nproc-per-node 4 benchmarks/profile_weave.py --tokens 8192 --layers 8 [--out DIR]

Prints, per mode, the top kernels by GPU time and the busy time of each CUDA stream, and the
overlap: sum of kernel time on the side stream that ran while a compute-stream kernel was
running. For the weave, a table per reduction (embedding, attention and MLP of halves A and B):
its kernel time, the compute it overlapped, and the compute-stream idle time that ended when it
ended (the compute stream was waiting for it). `--graph` profiles a CUDA-graph replay (no host
launch gaps), `--shift f` cuts the weave at T/2 + f*T. Writes a Chrome trace per mode to --out
(gzip) when given.
"""
import argparse
import gzip
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402


def intervals_overlap(a, b):
    """Total length of the intersection of two lists of (start, end) intervals."""
    a, b = sorted(a), sorted(b)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# First match wins: NCCL's kernels say AllReduce, ours say fused_ar_rmsnorm / allreduce_p2p,
# the memory-efficient attention kernel is a CUTLASS fmha.
CATEGORIES = (("NCCL", ("nccl",)),
              ("fused comm", ("fused_ar", "allreduce_")),
              ("attention", ("flash", "fmha", "attention", "efficient")),
              ("GEMM", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
              ("RMSNorm", ("rmsnorm",)))


def stall_report(compute, side, schedule, gap_us=2.0):
    """Per reduction of the weave: its kernel time, the compute time it overlapped, and the
    compute-stream idle time it caused (an idle gap on the compute stream that ends when this
    reduction ends: the compute stream was waiting for its event). `compute` and `side` are
    sorted (start, end, name) lists; `schedule[k]` names side kernel k."""
    gaps, busy_until = [], compute[0][1]
    for a, b, _ in compute[1:]:        # compute kernels may overlap: gaps after the running end
        if a - busy_until > gap_us:
            gaps.append((busy_until, a))
        busy_until = max(busy_until, b)
    rows = {}
    for k, (s0, s1, _) in enumerate(side):
        label = schedule[k] if k < len(schedule) else "other"
        busy = intervals_overlap([(a, b) for a, b, _ in compute], [(s0, s1)])
        # a gap caused by this reduction closes within a few us after the kernel ends
        stall = sum(g1 - max(g0, s0) for g0, g1 in gaps if s1 - 1 <= g1 <= s1 + 30)
        r = rows.setdefault(label, [0, 0.0, 0.0, 0.0])
        r[0] += 1
        r[1] += s1 - s0
        r[2] += busy
        r[3] += stall
    idle = sum(g1 - g0 for g0, g1 in gaps)
    print(f"  compute-stream idle gaps > {gap_us:g} us: {len(gaps)}, {idle / 1e3:.2f} ms; before "
          f"the first reduction {max(0.0, side[0][0] - compute[0][0]) / 1e3:.2f} ms of compute, "
          f"after the last one ends "
          f"{max(0.0, max(b for _, b, _ in compute) - side[-1][1]) / 1e3:.2f} ms")
    print("  | reduction | count | mean kernel us | mean compute overlapped us | "
          "mean compute stall us | total stall ms |")
    print("  | --- | --- | --- | --- | --- | --- |")
    for label, (n, dur, busy, stall) in rows.items():
        print(f"  | {label} | {n} | {dur / n:.0f} | {busy / n:.0f} | {stall / n:.0f} | "
              f"{stall / 1e3:.2f} |")


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (elementwise, copies)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shape", default="llama3-70b")
    ap.add_argument("--ctas", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", default="baseline,fused,weave,nocomm")
    ap.add_argument("--graph", action="store_true",
                    help="profile a CUDA-graph replay (no host launch gaps) instead of eager")
    ap.add_argument("--shift", type=float, default=None,
                    help="cut the weave at T/2 + shift*T (aligned) instead of the splitter's")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from weavelm.bench.prefill import PrefillTimer
    from weavelm.weave.executor import WEAVE_CTAS
    from weavelm.parallel.state import init_parallel
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    state = init_parallel(tp, "cuda")
    runner = PrefillTimer(args.shape, args.layers, tp, "p2p", None)
    runner.schedule.weave_ctas = args.ctas or WEAVE_CTAS
    T = args.tokens
    split = runner.split_for(T)
    if args.shift is not None:
        from weavelm.weave.wave_model import default_align
        align = default_align(tp)
        split = round((T / 2 + args.shift * T) / align) * align
    inputs = runner._inputs(T)
    for mode in args.modes.split(","):
        s = split if mode == "weave" else None
        if args.graph:
            graph = runner._capture(T, mode, s, inputs)
            run = graph.replay
        else:
            def run():
                runner.forward(T, mode, s, inputs)
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        torch.distributed.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        torch.distributed.barrier()
        if args.graph:
            del graph
        if not state.is_first:
            continue
        path = f"/tmp/trace_{mode}.json"
        prof.export_chrome_trace(path)
        events = [e for e in json.load(open(path))["traceEvents"]
                  if e.get("cat") == "kernel" and "dur" in e]
        by_stream = {}
        for e in events:
            by_stream.setdefault(e["args"].get("stream", e.get("tid")), []).append(
                (e["ts"], e["ts"] + e["dur"], e["name"]))
        t0 = min(e["ts"] for e in events)
        t1 = max(e["ts"] + e["dur"] for e in events)
        print(f"\n### {mode}: {T} tokens, {args.layers} layers, TP={tp}, split={s}, "
              f"{'CUDA graph' if args.graph else 'eager'}, GPU span {(t1 - t0) / 1e3:.2f} ms")
        streams = sorted(by_stream, key=lambda k: -sum(b - a for a, b, _ in by_stream[k]))
        for k in streams:
            busy = sum(b - a for a, b, _ in by_stream[k])
            print(f"  stream {k}: {len(by_stream[k])} kernels, busy {busy / 1e3:.2f} ms")
        if len(streams) > 1:
            main_iv = [(a, b) for a, b, _ in by_stream[streams[0]]]
            side_iv = [(a, b) for k in streams[1:] for a, b, _ in by_stream[k]]
            ov = intervals_overlap(main_iv, side_iv)
            side = sum(b - a for a, b in side_iv)
            print(f"  side-stream kernel time overlapped with compute: {ov / 1e3:.2f} of "
                  f"{side / 1e3:.2f} ms")
        if mode == "weave":
            # The fused kernels, in the schedule's reduction order (woven.py), against all the
            # other kernels; by name, not by stream: a graph replay may renumber streams.
            order = ["embed A", "embed B"] + [
                f"{blk} {half}" for _ in range(args.layers)
                for blk in ("attn", "mlp") for half in ("A", "B")]
            kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events)
            stall_report([k for k in kernels if category(k[2]) != "fused comm"],
                         [k for k in kernels if category(k[2]) == "fused comm"], order)
        cats = {}
        for e in events:
            c = category(e["name"])
            cats[c] = cats.get(c, 0.0) + e["dur"]
        print("  by kind (GPU ms): " + ", ".join(f"{c} {d / 1e3:.2f}" for c, d in
                                                  sorted(cats.items(), key=lambda kv: -kv[1])))
        totals = {}
        for e in events:
            name = e["name"][:70]
            n, d = totals.get(name, (0, 0.0))
            totals[name] = (n + 1, d + e["dur"])
        print("  | kernel | calls | GPU ms |")
        print("  | --- | --- | --- |")
        for name, (n, d) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"  | {name} | {n} | {d / 1e3:.2f} |")
        if args.out and mode == "weave":   # files that come back are few: keep one
            os.makedirs(args.out, exist_ok=True)
            with open(path, "rb") as f, gzip.open(os.path.join(args.out, f"trace_{mode}.json.gz"),
                                                   "wb") as g:
                shutil.copyfileobj(f, g)


if __name__ == "__main__":
    main()
