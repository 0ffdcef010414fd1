"""Where a decode step's GPU time goes, kernel by kernel: the decode CUDA graph of a llama3-8b
shaped model (random weights) replayed under torch.profiler, bf16 and FP8 weights.

    python3 benchmarks/profile_decode.py [BATCHES] [QUANTS] [MODULE.NAME=VALUE ...]
    e.g. 1,16,64 bf16,fp8 kernels.fp8_gemv.FUSED_MAX_K=4096    (a module constant of weavelm,
    set before the models are built: to measure a knob without editing the source)

Per batch, after a run of 128-token prompts and 128 new tokens (so attention reads ~256 keys a
sequence): the step's GPU time (bench_decode's replay timing, 50 replays), its kernels, their
summed time and the gaps between them; the kernels by name (time, count, mean, and the time
from the end of the kernel before to theirs: under programmatic dependent launch a kernel starts
early and waits, so only the ends tell what each adds to the step); for the first
batch the first 16 kernels in order with the gap before each.
"""
import collections
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import knobs  # noqa: E402
from bench_decode import replay_gpu_ms  # noqa: E402

from weavelm import LLM, SamplingParams  # noqa: E402
from weavelm.bench.prefill import fill_random  # noqa: E402
from weavelm.bench.shapes import shape_config  # noqa: E402

batches = [int(b) for b in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 64]
quants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["bf16", "fp8"]
knobs.apply(sys.argv[3:])
cfg = shape_config("llama3-8b", None)
cfg["max_position_embeddings"] = 8192
cfg.pop("rope_scaling", None)
length = 128 + 128 + 8                  # as bench_decode sizes it: 1,024 sequences fit an H100
for q in quants:
    t = time.time()
    llm = LLM.from_weights(cfg, lambda m: fill_random(m, 0), tp=1, device="cuda",
                           dtype="bfloat16", max_model_len=length, max_num_seqs=max(batches),
                           num_kv_blocks=max(batches) * -(-length // 16) + 64,
                           quantization=None if q == "bf16" else q)
    print(f"{q}: built in {time.time() - t:.1f} s", flush=True)
    runner = llm.runner
    for B in batches:
        # a run as bench_decode's (prompts of 128, 128 new tokens): the graph's inputs hold its
        # last step, so attention reads ~256 keys a sequence
        gen = torch.Generator().manual_seed(B)
        llm.generate_from_ids(torch.randint(0, cfg["vocab_size"], (B, 128), generator=gen).tolist(),
                              SamplingParams(max_new_tokens=128, ignore_eos=True))
        G = min(g for g in runner.graphs if g >= B)
        graph = runner.graphs[G]
        step_ms = replay_gpu_ms(llm, B, repeats=50)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:       # kernels with their start and duration
            prof.export_chrome_trace(os.path.join(d, "trace.json"))
            with open(os.path.join(d, "trace.json")) as f:
                ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
        ev.sort(key=lambda e: e["ts"])
        n = len(ev) // 5
        one = ev[-n:]
        busy = sum(e["dur"] for e in one)
        span = one[-1]["ts"] + one[-1]["dur"] - one[0]["ts"]
        print(f"\n## {q} batch {B} (graph {G}): replay {step_ms * 1e3:.1f} us/step, {n} kernels, "
              f"kernel time {busy:.1f} us, span {span:.1f} us, gaps {span - busy:.1f} us")
        # a kernel's own time, and its time on the step's path: from the end of the kernel
        # before to its own end (under PDL a kernel starts early and waits, so its duration
        # includes its predecessor's tail; the ends still follow each other)
        by = collections.defaultdict(lambda: [0, 0.0, 0.0])
        end = one[0]["ts"]
        for e in one:
            by[e["name"][:90]][0] += 1
            by[e["name"][:90]][1] += e["dur"]
            by[e["name"][:90]][2] += e["ts"] + e["dur"] - end
            end = e["ts"] + e["dur"]
        print("  own time (count, mean) | on the path (mean) | kernel")
        for k, (c, d, p) in sorted(by.items(), key=lambda kv: -kv[1][2])[:22]:
            print(f"  {d:9.1f} us  {c:4d}x  {d / c:7.2f} us | {p:9.1f} us {p / c:7.2f} us | {k}")
        # the first layer's sequence (kernel order) with durations and gaps
        if B == batches[0]:
            print("  first 16 kernels (dur, gap before):")
            for i, e in enumerate(one[:16]):
                gap = e["ts"] - (one[i - 1]["ts"] + one[i - 1]["dur"]) if i else 0
                print(f"    {e['dur']:7.2f} {gap:6.2f}  {e['name'][:80]}")
    del llm, runner, graph
    torch.cuda.empty_cache()
