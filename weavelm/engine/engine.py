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
At TP > 1 every rank runs the same engine with the same requests, so every rank makes the same
steps. A request that cannot run (too long for the context or the cache) finishes at once with
an error in its `finish_reason`; the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from weavelm.engine.model_runner import ModelRunner, StepPiece
from weavelm.engine.sampler import SamplingParams, sample
from weavelm.engine.scheduler import Scheduler
from weavelm.engine.sequence import Sequence, Status
from weavelm.errors import check
from weavelm.parallel.communicator import Communicator


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                 # every token generated so far
    new_token_ids: list[int]             # the ones this step added
    finished: bool
    finish_reason: str | None            # "stop", "length", "abort" or "error: ..."


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
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._failed)

    # -- steps ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs = [self._output(seq, []) for seq in self._failed]
        self._failed = []
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return outputs
        pieces = [StepPiece(p.seq.token_slice(p.start, p.length), p.start, p.seq.blocks,
                            p.sample) for p in scheduled]
        logits = self.runner.step(pieces)
        owners = [p.seq for p in scheduled if p.sample]
        tokens = self._sample(logits, owners)
        for p in scheduled:
            p.seq.num_computed += p.length
        for seq, tok in zip(owners, tokens):
            seq.output_token_ids.append(tok)
            reason = self._stop_reason(seq, tok)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq, [tok]))
        return outputs

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (servers call it once they have its output)."""
        seq = self.seqs.get(request_id)
        if seq is not None and seq.finished:
            del self.seqs[request_id]

    def _sample(self, logits, owners: list[Sequence]) -> list[int]:
        """One token per owner; rows that sample alike (every greedy row; else the same
        temperature, top-k, top-p and generator) are sampled in one call. Rank 0 decides and
        broadcasts, so ranks never diverge."""
        if not owners:
            return []
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
                index = torch.tensor(rows, device=logits.device)
                tokens[index] = sample(logits.index_select(0, index), seq.params,
                                       seq.generator or self.generator)
        tokens = self.comm.broadcast(tokens, src=0).tolist()
        check_errors = getattr(self.comm, "check_errors", None)
        if check_errors is not None:        # a fused kernel timed out inside a graph replay
            check_errors(sync=False)
        return tokens

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.stop_ids and not seq.params.ignore_eos:
            return "stop"
        if len(seq.output_token_ids) >= seq.params.max_new_tokens \
                or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _output(seq: Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids),
                             new, seq.finished, seq.finish_reason)
