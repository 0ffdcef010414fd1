"""Decode a set of sequences to the end, one step ahead of the host.

B = sequences in a step.

Step k + 1 is launched before the host reads step k's tokens: its token ids are step k's
sampled tokens, gathered on the device, so the GPU never idles while the host copies tokens
back, checks stops and prepares inputs (on one H200 that wait was 0.39 ms of a 5.3 ms
llama3-8b step; benchmarks/RESULTS.md). The cost: a sequence that stops on EOS at step k has
already been given step k + 1, whose token is dropped. Stops the host can foresee (the token
budget, the context) are never overrun. Sampling keeps its order: one call per step, on the
device, rank 0's choice broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from weavelm.engine.block_manager import BlockAllocator
from weavelm.engine.model_runner import ModelRunner, StepPiece
from weavelm.engine.sampler import SamplingParams, TokenReadback, sample
from weavelm.parallel.communicator import Communicator


@dataclass
class Running:
    """A sequence being decoded: its prompt length, tokens so far, blocks and token limit."""
    prompt_len: int
    tokens: list[int]            # sampled tokens the host has read
    blocks: list[int]
    limit: int                   # it may not grow past this many tokens (prompt + output)
    launched: int = 0            # tokens sampled or in flight
    done: bool = False


@dataclass
class _InFlight:
    rows: list[int]              # indices into the running list, in step order
    tokens: torch.Tensor         # [B] int64 on the device
    pending: tuple               # TokenReadback.start's, for `read`


class LookaheadDecoder:
    def __init__(self, runner: ModelRunner, comm: Communicator, params: SamplingParams,
                 generator, is_stop: Callable[[int], bool],
                 on_token: Callable[[int, int], None] | None = None):
        self.runner, self.comm, self.params, self.generator = runner, comm, params, generator
        self.is_stop, self.on_token = is_stop, on_token
        self.cuda = runner.device.type == "cuda"
        size = runner.config.max_num_seqs
        self._readback = TokenReadback(size, runner.device)
        # Pinned and used in turn, so the row index of the next step goes to the device
        # without waiting for the stream.
        self._index = [torch.zeros(size, dtype=torch.int64, pin_memory=self.cuda)
                       for _ in range(2)]
        self._turn = 0
        self.tokens_read = 0

    def run(self, seqs: list[Running], grow: Callable[[list[int], int], None]) -> None:
        """Decode until every sequence is done; `grow(blocks, tokens)` extends a block table
        (raising a user error when the cache is full)."""
        for s in seqs:
            s.launched = len(s.tokens)
            s.done = s.done or not self._may_continue(s)
        inflight = None
        while True:
            rows = [i for i, s in enumerate(seqs) if not s.done and self._may_continue(s)]
            if inflight is not None and not self._blocks_ready(seqs, rows):
                # Not enough free blocks for the look-ahead step: learn first which sequences
                # stopped (they need none), then grow only the ones that go on.
                self._settle(seqs, inflight)
                inflight = None
                continue
            launched = self._launch(seqs, rows, inflight, grow) if rows else None
            if inflight is not None:
                self._settle(seqs, inflight)
            if launched is None:
                return
            inflight = launched

    def _may_continue(self, s: Running) -> bool:
        return s.launched < self.params.max_new_tokens and s.prompt_len + s.launched < s.limit

    def _blocks_ready(self, seqs, rows) -> bool:
        blocks: BlockAllocator = self.runner.blocks
        need = sum(max(0, blocks.blocks_for(seqs[i].prompt_len + seqs[i].launched)
                       - len(seqs[i].blocks)) for i in rows)
        return need <= blocks.num_free

    def _launch(self, seqs, rows, inflight, grow) -> _InFlight:
        pieces = []
        for i in rows:
            s = seqs[i]
            pos = s.prompt_len + s.launched - 1
            grow(s.blocks, pos + 1)
            last = s.tokens[-1] if s.launched == len(s.tokens) else 0   # 0: on the device
            pieces.append(StepPiece([last], pos, s.blocks))
        ids = None
        self._turn ^= 1
        if inflight is not None:
            where = {r: j for j, r in enumerate(inflight.rows)}
            index = self._index[self._turn][:len(rows)]
            index.numpy()[:] = [where[i] for i in rows]
            ids = inflight.tokens.index_select(0, index.to(inflight.tokens.device,
                                                           non_blocking=True))
        logits = self.runner.step(pieces, ids)
        tokens = sample(logits, self.params, self.generator)
        tokens = self.comm.broadcast(tokens.contiguous(), src=0)   # rank 0 decides
        for i in rows:
            seqs[i].launched += 1
        return _InFlight(rows, tokens, self._readback.start(tokens))

    def _settle(self, seqs, inflight: _InFlight) -> None:
        """Read a launched step's tokens; a sequence that has stopped drops its token."""
        for i, tok in zip(inflight.rows, self._readback.read(inflight.pending, self.comm)):
            s = seqs[i]
            if s.done:
                continue
            s.tokens.append(tok)
            self.tokens_read += 1
            if self.on_token is not None:
                self.on_token(i, tok)
            if self.is_stop(tok):
                s.done = True
                s.launched = len(s.tokens)     # the step in flight for it, if any, is dropped
