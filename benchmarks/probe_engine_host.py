"""Host time of the engine's steps, the model stubbed out (no GPU needed): what the scheduler,
the engine's bookkeeping and the runner's decode input staging cost per step, and how many
steps of each kind `bench throughput`'s workload makes.

    python3 benchmarks/probe_engine_host.py [--num-requests 1000] [--decoding 256]

1. `--decoding` sequences decoding (prompts 500..3000 tokens), 100 engine steps timed; the stub
   runner fills the decode graph's host staging with ModelRunner._replay's function.
2. The `bench throughput` workload (seed 0) through the scheduler: steps per kind and tokens.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from weavelm.bench.throughput import workload  # noqa: E402
from weavelm.engine.block_manager import BlockAllocator  # noqa: E402
from weavelm.engine.engine import LLMEngine  # noqa: E402
from weavelm.engine.model_runner import RunnerConfig, stage_decode_rows  # noqa: E402
from weavelm.engine.sampler import SamplingParams  # noqa: E402

MAX_LEN, VOCAB, BS = 8192 + 513, 128256, 16


class StubRunner:
    """The runner's interface without a model: logits of zeros; decode steps fill host staging
    with the graph replay's own `stage_decode_rows`."""

    def __init__(self, num_blocks: int, max_num_seqs: int = 256):
        self.config = RunnerConfig(max_model_len=MAX_LEN, max_num_seqs=max_num_seqs)
        self.blocks = BlockAllocator(num_blocks, BS)
        self.device, self.block_size = torch.device("cpu"), BS
        G, M = max_num_seqs, -(-MAX_LEN // BS)
        self.h_rows, self.h_tables = np.zeros((3, G), np.int64), np.zeros(G * M, np.int32)
        self.kinds = collections.Counter()
        self.tokens = collections.Counter()

    def step(self, pieces, ids=None):
        decode = all(len(p.token_ids) == 1 for p in pieces)
        kind = "decode-only" if decode else "mixed"
        self.kinds[kind] += 1
        self.tokens[kind] += sum(len(p.token_ids) for p in pieces)
        if decode:
            stage_decode_rows(pieces, BS, self.h_rows, self.h_tables, self.config.max_num_seqs)
        return torch.zeros(sum(p.sample for p in pieces), 8)


class LocalComm:
    def broadcast(self, t, src=0):
        return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--decoding", type=int, default=256)
    args = ap.parse_args()

    runner = StubRunner(60000, max(args.decoding, 1))
    engine = LLMEngine(runner, LocalComm(), set(), MAX_LEN)
    rng = np.random.default_rng(0)
    for i in range(args.decoding):
        engine.add_request(str(i), [1] * int(rng.integers(500, 3000)),
                           SamplingParams(max_new_tokens=400, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_uncomputed > 1 for s in engine.scheduler.running):
        engine.step()
    n = 100
    t = time.perf_counter()
    for _ in range(n):
        engine.step()
    print(f"{(time.perf_counter() - t) / n * 1e3:.2f} ms of host time per decode step of "
          f"{len(engine.scheduler.running)} sequences")

    runner = StubRunner(55848)
    engine = LLMEngine(runner, LocalComm(), set(), MAX_LEN)
    requests = workload(args.num_requests, VOCAB, 0)
    for i, (prompt, out_len) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=out_len,
                                                          ignore_eos=True))
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                engine.forget(out.request_id)
    print(f"{args.num_requests} requests of bench throughput's workload: "
          f"{time.perf_counter() - t:.2f} s of host time; steps "
          + ", ".join(f"{k} {v} ({runner.tokens[k]} tokens)" for k, v in runner.kinds.items()))


if __name__ == "__main__":
    main()
