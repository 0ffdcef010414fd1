"""Host time of the engine's steps, the model stubbed out (no GPU needed): what the scheduler,
the engine's bookkeeping and the runner's decode input staging cost per step, and how many
steps of each kind `bench throughput`'s workload makes.

    python3 benchmarks/probe_engine_host.py [--num-requests 1000] [--decoding 256]

1. `--decoding` sequences decoding (prompts 500..3000 tokens), 100 engine steps timed; the stub
   runner fills the decode graph's host staging with ModelRunner._replay's function.
2. The `bench throughput` workload (seed 0) through the scheduler: steps per kind and tokens.
3. The runner's own host work for one 8192-token mixed step (256 decode tokens beside four
   prompt chunks): `ModelRunner._run_eager` of a tiny CPU model whose layers are stubbed out
   (step layout, attention batch, input tensors), median of 30.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))       # profile_engine's TINY

from weavelm.bench.throughput import workload  # noqa: E402
from weavelm.engine.block_manager import BlockAllocator  # noqa: E402
from weavelm.engine.engine import LLMEngine  # noqa: E402
from weavelm.engine.config import EngineConfig  # noqa: E402
from weavelm.models.host_inputs import StagedTables, stage_decode_rows  # noqa: E402
from weavelm.parallel.state import init_parallel  # noqa: E402
from weavelm.engine.sampler import SamplingParams  # noqa: E402

MAX_LEN, VOCAB, BS = 8192 + 513, 128256, 16


class StubRunner:
    """The runner's interface without a model: logits of zeros; decode steps fill host staging
    with the graph replay's own `stage_decode_rows`."""

    def __init__(self, num_blocks: int, max_num_seqs: int = 256):
        self.config = EngineConfig(max_model_len=MAX_LEN, max_num_seqs=max_num_seqs)
        # prefix caching on, as the engine's default (EngineConfig.enable_prefix_caching)
        self.blocks = BlockAllocator(num_blocks, BS, caching=self.config.enable_prefix_caching)
        self.device, self.block_size = torch.device("cpu"), BS
        self.state, self.link = init_parallel(1, "cpu"), None     # one rank, one stage
        G, M = max_num_seqs, -(-MAX_LEN // BS)
        self.h_rows, self.h_tables = np.zeros((3, G), np.int64), np.zeros(G * M, np.int32)
        self.staged = StagedTables()
        self.kinds = collections.Counter()
        self.tokens = collections.Counter()

    def step(self, pieces, late=None):
        decode = all(len(p.token_ids) == 1 for p in pieces)
        kind = "decode-only" if decode else "mixed"
        self.kinds[kind] += 1
        self.tokens[kind] += sum(len(p.token_ids) for p in pieces)
        if decode:
            stage_decode_rows(pieces, BS, self.h_rows, self.h_tables, self.config.max_num_seqs,
                              self.staged)
        return torch.zeros(sum(p.sample for p in pieces), 8)


class LocalComm:
    def broadcast(self, t, src=0):
        return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--decoding", type=int, default=256)
    args = ap.parse_args()

    runner = StubRunner(max(60000, args.decoding * 250), max(args.decoding, 1))
    engine = LLMEngine(runner, LocalComm(), runner.config)
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
    engine = LLMEngine(runner, LocalComm(), runner.config)
    requests = workload(args.num_requests, VOCAB, 0)
    for i, (prompt, out_len) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=out_len,
                                                          ignore_eos=True))
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    print(f"{args.num_requests} requests of bench throughput's workload: "
          f"{time.perf_counter() - t:.2f} s of host time; steps "
          + ", ".join(f"{k} {v} ({runner.tokens[k]} tokens)" for k, v in runner.kinds.items()))
    print(f"{mixed_step_host_ms():.2f} ms of the runner's host time per 8192-token mixed step "
          f"(256 decode tokens + 4 prompt chunks, model layers stubbed)")


def mixed_step_host_ms(reps: int = 30) -> float:
    from profile_engine import TINY

    from weavelm.bench.prefill import fill_random
    from weavelm.bench.shapes import SHAPES, shape_config
    from weavelm.engine.llm import LLM
    from weavelm.engine.model_runner import StepPiece
    from weavelm.parallel.state import init_parallel
    SHAPES.setdefault("tiny", TINY)
    init_parallel(1, "cpu")
    llm = LLM.from_weights(shape_config("tiny", None), lambda m: fill_random(m, 0), tp=1,
                           device="cpu", max_model_len=MAX_LEN, max_num_seqs=256,
                           max_num_batched_tokens=8192)
    runner = llm.runner
    hidden = TINY["hidden_size"]
    runner.executor.run = lambda ids, step, mode, split=None, **kw: torch.zeros(len(ids), hidden)
    pieces, nxt = [], 1
    for i in range(256):
        n = 1000 + 7 * i
        k = -(-(n + 1) // BS)
        pieces.append(StepPiece([5], n, list(range(nxt, nxt + k)), True))
        nxt += k
    for n, start in ((3000, 0), (2000, 517), (1936, 0), (1000, 33)):
        k = -(-(n + start) // BS)
        pieces.append(StepPiece(list(range(n)), start, list(range(nxt, nxt + k)), False))
        nxt += k
    times = []
    for _ in range(reps + 3):
        t = time.perf_counter()
        runner._run_eager(pieces, runner.kv)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:]) * 1e3


if __name__ == "__main__":
    main()
