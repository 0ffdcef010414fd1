"""Where a serving run's time goes: the engine's steps broken down by kind, on one device.

    python3 benchmarks/profile_engine.py --num-requests 300            # GPU, llama3-8b shape
    python3 benchmarks/profile_engine.py --num-requests 20 --device cpu   # tiny shape, CPU
    python3 benchmarks/profile_engine.py --num-requests 1000 --whole-run  # GPU time by kernel

1. Single steps timed alone (best of 3, synchronised): one fresh 8192-token prompt; a
   7936-token prompt beside 256 decode tokens at context --ctx; 256 decode tokens run eagerly;
   a 4096-token chunk continuing a 4096-token prefix.
2. The `bench throughput` workload (same generator, seed 0) through the engine with a device
   sync around every model step, so each step's time is its own: totals per kind of step
   (decode-only, mixed = decode tokens beside prefill chunks, prefill-only), scheduling and
   sampling. The first large mixed and decode-only steps also run under torch.profiler (top
   kernels by GPU time). The syncs cost the engine its one-step lookahead: totals here are an
   upper bound of `bench throughput`'s.
With --whole-run, instead: the workload runs as `bench throughput` runs it (no syncs between
steps) under torch.profiler, and the GPU time of the whole run is summed by kind of kernel
(GEMM, attention, paged decode, norms, ...) beside the wall time: what the GPU did, and how
long it sat idle.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from weavelm.bench.prefill import fill_random
from weavelm.bench.shapes import SHAPES, shape_config
from weavelm.bench.throughput import workload
from weavelm.engine.llm import LLM
from weavelm.engine.model_runner import StepPiece
from weavelm.engine.sampler import SamplingParams
from weavelm.parallel.state import init_parallel

TINY = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=16384)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default=None, help="default: llama3-8b on cuda, a tiny one on cpu")
    ap.add_argument("--ctx", type=int, default=None, help="decode context of the single steps")
    ap.add_argument("--whole-run", action="store_true",
                    help="GPU time of the whole workload by kind of kernel (no per-step syncs)")
    args = ap.parse_args()
    dev = args.device
    SHAPES.setdefault("tiny", TINY)
    shape = args.shape or ("llama3-8b" if dev == "cuda" else "tiny")
    ctx = args.ctx or (2048 if dev == "cuda" else 64)
    init_parallel(1, dev)
    hf = shape_config(shape, None)
    llm = LLM.from_weights(hf, lambda m: fill_random(m, 0), tp=1, device=dev,
                           max_model_len=8192 + 513, max_num_seqs=256,
                           max_num_batched_tokens=8192)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if args.whole_run:
        return whole_run(llm, workload(args.num_requests, hf["vocab_size"], 0), sync)
    single_steps(llm, hf["vocab_size"], ctx, sync)
    engine_loop(llm, workload(args.num_requests, hf["vocab_size"], 0), sync, dev == "cuda")


def single_steps(llm, vocab: int, ctx: int, sync):
    runner = llm.runner
    bs = runner.block_size
    flop_token = 2 * sum(p.numel() for p in llm.model.parameters())

    def pieces(lengths, decode=0, start=0):
        out, nxt = [], 1
        for n in lengths:
            k = -(-(start + n) // bs)
            out.append(StepPiece([i % vocab for i in range(n)], start, list(range(nxt, nxt + k))))
            nxt += k
        for _ in range(decode):
            k = -(-(ctx + 1) // bs)
            out.append(StepPiece([5], ctx, list(range(nxt, nxt + k))))
            nxt += k
        return out

    def best(ps, reps=3):
        runner._run_eager(ps, runner.kv)
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            runner._run_eager(ps, runner.kv)
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    print(f"single steps (decode context {ctx}); TFLOP/s = 2 x parameters x tokens / time")
    for name, ps in [("1 x 8192", pieces([8192])),
                     ("7936 + 256 decode", pieces([7936], decode=256)),
                     ("256 decode, eager", pieces([], decode=256)),
                     ("4096 after 4096", pieces([4096], start=4096))]:
        t = best(ps)
        T = sum(len(p.token_ids) for p in ps)
        print(f"  {name:18s} {T:5d} tokens {t * 1e3:8.1f} ms {T / t:9.0f} tok/s "
              f"{flop_token * T / t / 1e12:6.0f} TFLOP/s")


def engine_loop(llm, requests, sync, profile_steps: bool):
    from torch.profiler import ProfilerActivity, profile
    runner, engine = llm.runner, llm.engine
    stats = collections.defaultdict(lambda: [0, 0.0, 0])      # kind -> [count, s, tokens]
    run_step, run_sample, run_schedule = runner.step, engine._sample, engine.scheduler.schedule
    profiled = set()

    def kind_of(pieces):
        decode = sum(1 for p in pieces if len(p.token_ids) == 1)
        return "decode-only" if decode == len(pieces) else ("mixed" if decode else
                                                            "prefill-only")

    def step(pieces, ids=None, late=None):
        kind = kind_of(pieces)
        T = sum(len(p.token_ids) for p in pieces)
        if profile_steps and kind not in profiled \
                and len(pieces) >= (200 if kind == "mixed" else 64):
            profiled.add(kind)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                         record_shapes=True) as prof:
                out = run_step(pieces, ids, late)
                sync()
            start = sum(p.start_pos for p in pieces) / len(pieces)
            print(f"== torch.profiler: {kind} step, {len(pieces)} pieces, {T} tokens, mean "
                  f"start position {start:.0f}")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30,
                                            max_name_column_width=50))
            print("   by input shape (torch ops):")
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=30,
                max_shapes_column_width=70))
            return out
        sync()
        t = time.perf_counter()
        out = run_step(pieces, ids, late)
        sync()
        s = stats[kind]
        s[0], s[1], s[2] = s[0] + 1, s[1] + time.perf_counter() - t, s[2] + T
        return out

    def timed(name, fn, count):
        def wrapped(*a):
            t = time.perf_counter()
            r = fn(*a)
            s = stats[name]
            s[0], s[1], s[2] = s[0] + 1, s[1] + time.perf_counter() - t, s[2] + count(a, r)
            return r
        return wrapped

    runner.step = step
    engine._sample = timed("sample", run_sample, lambda a, r: len(a[1]))
    engine.scheduler.schedule = timed("schedule", run_schedule,
                                      lambda a, r: sum(p.length for p in r))
    engine.stop_ids = set()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    t0 = time.perf_counter()
    steps = drain(engine)
    total = time.perf_counter() - t0
    print(f"{len(requests)} requests: {total:.1f} s, {steps} steps, prompt tokens "
          f"{sum(len(p) for p, _ in requests)}, output tokens {sum(n for _, n in requests)} "
          f"(the profiled steps are left out below)")
    for kind, (n, t, T) in stats.items():
        print(f"  {kind:13s} {n:5d} x {t / max(n, 1) * 1e3:7.2f} ms = {t:7.2f} s, "
              f"{T:8d} tokens, {T / max(t, 1e-9):9.0f} tok/s")


def drain(engine) -> int:
    """Step the engine until every request has finished; returns the number of steps."""
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


# kernel-name patterns -> kind, first match wins (names as torch.profiler reports them)
KINDS = [("paged decode attention", ("paged_decode",)),
         ("flash / cuDNN attention", ("flash", "fmha", "cudnn", "attention")),
         ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas")),
         ("rope + cache write", ("rope",)),
         ("RMSNorm (+ residual)", ("rmsnorm", "rms_norm", "add_norm")),
         ("SiLU x mul", ("silu", "act_and_mul", "swiglu")),
         ("sampling (argmax, softmax, topk)", ("argmax", "softmax", "topk", "sort", "max")),
         ("copies, gathers, casts", ("copy", "index", "gather", "cat", "memcpy", "memset",
                                     "fill", "elementwise", "scatter", "reduce"))]


def kind_of_kernel(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def whole_run(llm, requests, sync):
    """The workload as `bench throughput` serves it, under torch.profiler: GPU time by kind."""
    from torch.profiler import ProfilerActivity, profile
    engine = llm.engine
    engine.stop_ids = set()
    for i, (prompt, n) in enumerate(requests[:8]):     # warm-up: kernels built, graphs captured
        engine.add_request(f"w{i}", prompt[:512], SamplingParams(max_new_tokens=4,
                                                                ignore_eos=True))
    drain(engine)
    sync()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    gpu = llm.runner.device.type == "cuda"       # on CPU: torch ops' CPU time instead
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        steps = drain(engine)
        sync()
        wall = time.perf_counter() - t0
    by_kind, by_name = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) \
            if gpu else e.self_cpu_time_total
        if us <= 0 or e.key.startswith("cuda") or e.key.startswith("Activity"):
            continue
        by_kind[kind_of_kernel(e.key)] += us / 1e6
        by_name[e.key[:90]] += us / 1e6
    busy = sum(by_kind.values())
    print(f"{len(requests)} requests, {steps} steps: wall {wall:.2f} s under the profiler, "
          f"GPU busy {busy:.2f} s ({busy / wall:.0%}), idle {wall - busy:.2f} s")
    for kind, s in by_kind.most_common():
        print(f"  {kind:34s} {s:8.2f} s  {s / wall:6.1%} of wall")
    print("top kernels:")
    for name, s in by_name.most_common(25):
        print(f"  {s:8.2f} s  {name}")


if __name__ == "__main__":
    main()
