"""Host time of a decode step at N running sequences, by part, the model stubbed out (no GPU):
the scheduler, the engine's launch (step inputs, sampling bookkeeping) with the runner's decode
staging inside it, and the read of the step's tokens (outputs, stops). probe_engine_host.py's
stub runner, N sequences with prompts of 500-3,000 tokens, 50 decode steps after their prefill.

    python3 benchmarks/probe_host_parts.py [N]          # default 1024
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_engine_host as P  # noqa: E402

from weavelm.engine.engine import LLMEngine  # noqa: E402
from weavelm.engine.sampler import SamplingParams  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
runner = P.StubRunner(N * 250, N)
engine = LLMEngine(runner, P.LocalComm(), runner.config)
rng = np.random.default_rng(0)
for i in range(N):
    engine.add_request(str(i), [1] * int(rng.integers(500, 3000)),
                       SamplingParams(max_new_tokens=400, ignore_eos=True))
while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
    engine.step()
T = {}


def wrap(obj, name):
    f = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        T[name] = T.get(name, 0) + time.perf_counter() - t
        return r
    setattr(obj, name, timed)


for obj, name in ((engine.scheduler, "schedule"), (runner, "step"), (engine, "_read"),
                  (engine, "_launch")):
    wrap(obj, name)
n = 50
t = time.perf_counter()
for _ in range(n):
    engine.step()
tot = (time.perf_counter() - t) / n * 1e3
print(f"{N} sequences: {tot:.2f} ms of host time a decode step; by part (ms): "
      + ", ".join(f"{k} {v / n * 1e3:.2f}" for k, v in T.items())
      + " (step = the runner's staging, inside _launch)")
