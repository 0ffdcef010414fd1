"""The step-level engine that servers drive (vLLM's names): requests join and leave between
steps.

    engine.add_request("a", prompt_token_ids, SamplingParams(max_new_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():            # RequestOutput of every request that got a token
            ...
    engine.abort_request("a")                # frees its KV blocks at once

Each step: the scheduler picks the tokens (decode tokens first, then prefill chunks, within
`max_num_batched_tokens`), the model runner runs them (the weave on big steps, CUDA graphs for
decode-only steps), rank 0 samples and broadcasts, and finished requests give their blocks back.

The engine runs one step ahead of the host: `step()` queues step k + 1 on the GPU before it
reads step k's tokens, so the GPU does not wait while the host reads tokens, checks stops and
schedules (about 7 of 62 s of `bench throughput` before). A token the host has not read is a
placeholder at the end of its sequence; step k + 1 takes its value from the device. What this
costs: each `step()` returns the tokens of the step before it (the last ones come from a call
that launches nothing), and a sequence that stops on EOS at step k has been given step k + 1,
whose token is dropped. Stops the host can foresee (the token budget, the context) are never
overrun.
At TP > 1 every rank runs the same engine with the same requests, so every rank makes the same
steps. A request that cannot run (too long for the context or the cache) finishes at once with
an error in its `finish_reason`; the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from weavelm.engine.model_runner import ModelRunner, StepPiece
from weavelm.engine.sampler import SamplingParams, TokenReadback, sample
from weavelm.engine.scheduler import Scheduler
from weavelm.engine.sequence import Sequence, Status
from weavelm.errors import check
from weavelm.models.host_inputs import host_to_device
from weavelm.parallel.communicator import Communicator


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                 # every token generated so far
    new_token_ids: list[int]             # the ones this step added
    finished: bool
    finish_reason: str | None            # "stop", "length", "abort" or "error: ..."


@dataclass
class _Launched:
    """A step on the GPU whose tokens the host has not read."""
    owners: list[tuple[Sequence, int]]   # (sequence, index of its placeholder), in sampling order
    tokens: torch.Tensor                 # [n] int64 on the device
    pending: tuple                       # TokenReadback.start's, for `read`


PLACEHOLDER = -1                         # a sampled token not read yet (never a real id)


class LLMEngine:
    def __init__(self, runner: ModelRunner, comm: Communicator, stop_ids: set[int],
                 max_model_len: int):
        cfg = runner.config
        self.runner, self.comm, self.stop_ids = runner, comm, stop_ids
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(runner.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._arrivals = 0
        self._failed: list[Sequence] = []     # finished at add_request, reported by step()
        self.generator = torch.Generator(device=runner.device)
        self.generator.manual_seed(0)
        self._in_flight: _Launched | None = None
        self._readback = TokenReadback(cfg.max_num_seqs, runner.device)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None) -> None:
        check(request_id not in self.seqs, f"request id {request_id!r} is already in use: give "
                                           f"each request its own id")
        params = params or SamplingParams()
        seq = Sequence(request_id, list(prompt_token_ids), params, self._arrivals)
        self._arrivals += 1
        self.seqs[request_id] = seq
        error = self._refusal(seq)
        if error is not None:
            seq.status, seq.finish_reason = Status.FINISHED, f"error: {error}"
            self._failed.append(seq)
            return
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        self.scheduler.add(seq)

    def _refusal(self, seq: Sequence) -> str | None:
        n = len(seq.prompt_token_ids)
        if n == 0:
            return "the prompt is empty: give at least one token"
        if n >= self.max_model_len:
            return (f"the prompt has {n} tokens but the context holds {self.max_model_len}: "
                    f"shorten the prompt")
        longest = min(self.max_model_len, n + seq.params.max_new_tokens)
        blocks = self.runner.blocks
        if blocks.blocks_for(longest - 1) > blocks.capacity:
            return (f"the request may grow to {longest} tokens but the KV cache holds "
                    f"{blocks.capacity * blocks.block_size}: lower max_new_tokens, or give the "
                    f"cache more memory")
        return None

    def abort_request(self, request_id: str) -> None:
        """End a request now; its blocks are free at once (unknown or finished ids: nothing)."""
        seq = self.seqs.get(request_id)
        if seq is not None and not seq.finished:
            self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._failed) \
            or self._in_flight is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End it now; a token of it still in flight is dropped when it arrives."""
        del seq.output_token_ids[len(seq.output_token_ids) - seq.num_pending:]
        seq.num_pending, seq.last_in_flight = 0, False
        self.scheduler.finish(seq, reason)

    # -- steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Queue the next step, then read the one before it: the outputs of that one (and of
        requests that failed at `add_request`)."""
        outputs = [self._output(seq, []) for seq in self._failed]
        self._failed = []
        scheduled = self.scheduler.schedule()
        launched = self._launch(scheduled) if scheduled else None
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self._read(previous)
        return outputs

    def settle(self) -> list[RequestOutput]:
        """Read the step in flight, if any, without queueing another; its outputs."""
        previous, self._in_flight = self._in_flight, None
        return self._read(previous) if previous is not None else []

    def _launch(self, scheduled) -> _Launched:
        pieces, late_at, late_rows, offset = [], [], [], 0
        for p in scheduled:
            seq = p.seq
            pieces.append(StepPiece(seq.token_slice(p.start, p.length), p.start, seq.blocks,
                                    p.sample))
            offset += p.length
            if seq.num_pending and p.start + p.length == seq.num_tokens:
                late_at.append(offset - 1)         # its last token is still on the device
                late_rows.append(seq.pending_row)
        late = None
        if late_at:
            previous = self._in_flight.tokens
            rows = host_to_device(np.array(late_rows, dtype=np.int64), previous.device)
            late = (late_at, previous.index_select(0, rows))
        logits = self.runner.step(pieces, late=late)
        owners = [p.seq for p in scheduled if p.sample]
        tokens = self._sample(logits, owners)
        for p in scheduled:
            p.seq.num_computed += p.length
        placed = []
        for row, seq in enumerate(owners):
            placed.append((seq, len(seq.output_token_ids)))
            seq.output_token_ids.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.pending_row = row
            seq.last_in_flight = len(seq.output_token_ids) >= seq.params.max_new_tokens \
                or seq.num_tokens >= self.max_model_len
        return _Launched(placed, tokens, self._readback.start(tokens))

    def _read(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens and put them in place; stops end sequences."""
        outputs = []
        for (seq, index), tok in zip(launched.owners,
                                     self._readback.read(launched.pending, self.comm)):
            if seq.finished:                # stopped, aborted or failed meanwhile: dropped
                continue
            seq.output_token_ids[index] = tok
            seq.num_pending -= 1
            reason = self._stop_reason(seq, tok, index + 1)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(self._output(seq, [tok]))
        return outputs

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (servers call it once they have its output)."""
        seq = self.seqs.get(request_id)
        if seq is not None and seq.finished:
            del self.seqs[request_id]

    def _sample(self, logits, owners: list[Sequence]) -> torch.Tensor:
        """One token per owner, on the device; rows that sample alike (every greedy row; else
        the same temperature, top-k, top-p and generator) are sampled in one call. Rank 0
        decides and broadcasts, so ranks never diverge."""
        if not owners:
            return torch.empty(0, dtype=torch.int64, device=logits.device)
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(owners):
            p = seq.params
            key = ("greedy",) if p.greedy else (p.temperature, p.top_k, p.top_p,
                                                id(seq.generator))
            groups.setdefault(key, []).append(row)
        if len(groups) == 1:
            seq = owners[0]
            tokens = sample(logits, seq.params, seq.generator or self.generator)
        else:
            tokens = torch.empty(len(owners), dtype=torch.int64, device=logits.device)
            for rows in groups.values():
                seq = owners[rows[0]]
                index = host_to_device(np.array(rows, dtype=np.int64), logits.device)
                tokens[index] = sample(logits.index_select(0, index), seq.params,
                                       seq.generator or self.generator)
        return self.comm.broadcast(tokens.contiguous(), src=0)

    def _stop_reason(self, seq: Sequence, token: int, generated: int) -> str | None:
        """Why a sequence ends at its `generated`-th token `token`, or None."""
        if token in self.stop_ids and not seq.params.ignore_eos:
            return "stop"
        if generated >= seq.params.max_new_tokens \
                or len(seq.prompt_token_ids) + generated >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _output(seq: Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.read_token_ids,
                             new, seq.finished, seq.finish_reason)
