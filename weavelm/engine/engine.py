"""The engine (vLLM's names): requests join and leave between steps. It is the one decode loop:
`LLM.generate`, `weavelm serve` and the benchmarks all drive `step`.

    engine = LLMEngine.from_config(EngineConfig(model=..., tp=...))
    engine.add_request("a", prompt_token_ids, SamplingParams(max_new_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():            # RequestOutput of every request that got a token
            ...
    engine.abort_request("a")                # frees its KV blocks at once

A request leaves the engine once its last output is returned (or when it is aborted): its id
can be used again, and the engine keeps no record of it.

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
steps. So do the ranks of every pipeline stage: the last stage samples and broadcasts the
tokens to all ranks without waiting (read with the step, `num_stages` steps later), and a step
leaves out the sequences whose token is still in flight, so the running sequences form
`num_stages` + 1 batches taking turns and `num_stages` of them are in flight after each `step()`
(one per stage); at one stage a sequence's next step takes its token from the device instead.
A request that cannot run (too long for the context or the cache) finishes at once with an
error in its `finish_reason`; the others go on.

A request owns its randomness: one with a `seed` samples from its own generator (rows of a
step are sampled together, each with its own noise: `sampler.sample`), so its tokens depend on
nothing else in the batch, nor on the front end that carried it. Requests without a seed share
the engine's generator (seeded by `EngineConfig.seed`).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import torch

from weavelm.engine.config import EngineConfig, ids_refusal, prompt_refusal
from weavelm.engine.logit_controls import apply_controls, controlled_row, has_controls
from weavelm.engine.structured import Grammars, constraint_rows
from weavelm.engine.model_runner import ModelRunner
from weavelm.engine.logprobs import LogprobCopies, record_prompt_logprobs, unpack_logprobs
from weavelm.engine.outputs import RequestOutput, request_output, stop_reason
from weavelm.engine.sampler import SamplingParams, TokenReadback, sample
from weavelm.engine.scheduler import Scheduler
from weavelm.engine.sequence import Sequence, Status
from weavelm.engine.step_rows import advance, place_sampled, step_pieces
from weavelm.errors import WeavelmError, check
from weavelm.models.host_inputs import host_to_device
from weavelm.parallel.communicator import Communicator
from weavelm.parallel.pipeline import host_communicator


# Python's cyclic collector runs a young collection every 700 allocations by default; a step
# over 1,024 sequences allocates tens of thousands of small objects, and the older collections
# this cascades into walk every live sequence's token lists: 3-4 ms of a 10 ms host step
# (benchmarks/probe_host_parts.py, RESULTS.md). Reference counting frees nearly everything the
# engine makes; the collector still runs, 14 times less often (the engine only raises it).
GC_YOUNG_THRESHOLD = 10_000


@dataclass
class _Launched:
    """A step on the GPU whose tokens the host has not read."""
    owners: list[tuple[Sequence, int]]   # (sequence, index of its placeholder), in sampling order
    tokens: torch.Tensor                 # [n] int64 on the device
    pending: tuple                       # TokenReadback.start's, for `read`
    logprobs: tuple | None = None        # (rows of owners that want them, their table's pending)
    constrained: bool = False            # structured-output rows: read before the next launch
    works: tuple = ()                    # pipeline: the broadcasts that bring tokens (and table)


class LLMEngine:
    def __init__(self, runner: ModelRunner, comm: Communicator, config: EngineConfig,
                 model_config=None, source=None, tokenizer=None):
        """An engine over a built runner; `from_config` builds one from an EngineConfig.
        `config.max_model_len` must be resolved (`EngineConfig.for_model`)."""
        self.runner, self.comm, self.config = runner, comm, config
        self.model_config, self.source, self._tokenizer = model_config, source, tokenizer
        self.max_model_len = config.max_model_len
        self.scheduler = Scheduler(runner.blocks, config.max_num_seqs,
                                   config.max_num_batched_tokens, runner.state.num_stages)
        self.link = runner.link                   # pipeline stages: None in one stage
        self.host_comm = host_communicator(comm, runner.state)   # inputs and tokens go over it
        self.depth = runner.state.num_stages      # steps in flight after each step()
        self.seqs: dict[str, Sequence] = {}       # the requests not yet finished and returned
        self._arrivals = 0
        self._failed: list[Sequence] = []     # finished at add_request, reported by step()
        self.generator = torch.Generator(device=runner.device)
        self.generator.manual_seed(config.seed)
        self._in_flight: list[_Launched] = []     # launched, not read yet: oldest first
        self._readback = TokenReadback(config.max_num_seqs, runner.device)
        self._logprob_copies = LogprobCopies(config.max_num_seqs, runner.device)
        self._stop_ids: set[int] | None = None
        self._grammars: Grammars | None = None     # structured output: made on first use
        young, *older = gc.get_threshold()
        if 0 < young < GC_YOUNG_THRESHOLD:         # (0: the collector is off; left so)
            gc.set_threshold(GC_YOUNG_THRESHOLD, *older)

    @classmethod
    def from_config(cls, config: EngineConfig, hf_config: dict | None = None, weights=None,
                    tokenizer=None, progress: bool = True) -> "LLMEngine":
        """Build this rank's engine: join the process group, build the model on this rank's
        shard and load its weights (from `config.model`; or from `hf_config` and `weights`:
        (name, tensor) pairs or a callable that fills the built model), then the runner (KV
        cache, decode graphs) and the scheduler."""
        from weavelm.engine.model_loading import load_model
        loaded = load_model(config, hf_config, weights, progress)
        engine = cls(loaded.runner, loaded.comm, loaded.config, loaded.model_config,
                     loaded.source, tokenizer)
        loaded.arm()                   # every rank is loaded: short collective waits from here
        return engine

    model = property(lambda self: self.runner.model)
    state = property(lambda self: self.runner.state)
    device = property(lambda self: self.runner.device)

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (token-id use needs none)."""
        if self._tokenizer is None:
            check(self.source is not None, "this engine was built from in-memory weights "
                                           "without a tokenizer: pass tokenizer= or use token ids")
            from weavelm.models.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.source.path)
        return self._tokenizer

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end a sequence: EOS and the chat template's end-of-turn marker."""
        if self._stop_ids is None:
            from weavelm.models.tokenizer import stop_token_ids
            eos = list(self.model_config.eos_token_ids) if self.model_config else []
            try:
                tokenizer = self.tokenizer
            except WeavelmError:            # token-id-only use of a model without tokenizer files
                tokenizer = None
            self._stop_ids = set(eos)
            if tokenizer is not None:
                self._stop_ids |= stop_token_ids(tokenizer, {"eos_token_id": eos})
        return self._stop_ids

    @stop_ids.setter
    def stop_ids(self, ids) -> None:
        self._stop_ids = set(ids)

    @property
    def grammars(self) -> Grammars:
        """Structured output's compiled grammars for this model's tokenizer (made on first use:
        xgrammar reads the vocabulary once)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model_config.vocab_size,
                                      self.stop_ids)
        return self._grammars

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request. Token ids that are not this model's are refused here (one-line
        WeavelmError, nothing queued); a request too long for the context or the cache finishes
        with an error output at the next step (`check_request` raises that error instead)."""
        check(request_id not in self.seqs, f"request id {request_id!r} is already in use: give "
                                           f"each request its own id")
        params = params or SamplingParams()
        check(isinstance(params, SamplingParams), f"params must be a SamplingParams, got "
                                                  f"{type(params).__name__}")
        bad_ids = self._bad_ids(prompt_token_ids)       # misuse: refused here, nothing queued
        check(bad_ids is None, bad_ids or "")
        vocab = self.model_config.vocab_size if self.model_config else None
        named = [t for t in params.token_ids_used() if vocab is not None and t >= vocab]
        check(not named, f"token id {named[0] if named else ''} in logit_bias or stop_token_ids "
                         f"is outside this model's vocabulary of {vocab}")
        self.stop_ids                       # the tokenizer loads here, never inside a step
        matcher = None
        if params.structured is not None:           # a constraint that does not compile: here
            matcher = self.grammars.matcher(params.structured)
        seq = Sequence(request_id, list(prompt_token_ids), params, self._arrivals,
                       matcher=matcher)
        self._arrivals += 1
        self.seqs[request_id] = seq
        error = self._length_refusal(len(seq.prompt_token_ids), params)
        if error is not None:
            seq.status, seq.finish_reason = Status.FINISHED, f"error: {error}"
            self._failed.append(seq)
            return
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]        # the first prompt token: nothing predicts it
        if params.seed is not None and not params.greedy:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        self.scheduler.add(seq)

    def _bad_ids(self, prompt_token_ids) -> str | None:
        """Why `prompt_token_ids` is not a list of this model's token ids, or None."""
        return ids_refusal(prompt_token_ids,
                           self.model_config.vocab_size if self.model_config else None)

    def refusal(self, prompt_token_ids: list[int], params: SamplingParams) -> str | None:
        """Why a request cannot run (bad ids, too long for the context or the cache), or None."""
        return self._bad_ids(prompt_token_ids) or \
            self._length_refusal(len(prompt_token_ids), params)

    def _length_refusal(self, n: int, params: SamplingParams) -> str | None:
        """Why a prompt of n tokens cannot run to its end in this context and cache, or None."""
        reason = prompt_refusal(n, self.max_model_len)
        if reason is not None:
            return reason
        longest = min(self.max_model_len, n + params.max_new_tokens)
        blocks = self.runner.blocks
        if blocks.blocks_for(longest - 1) > blocks.capacity:
            return (f"the request may grow to {longest} tokens but the KV cache holds "
                    f"{blocks.capacity * blocks.block_size}: lower max_new_tokens, or give the "
                    f"cache more memory")
        return None

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """`refusal` as a WeavelmError (front ends that fail a whole call at once)."""
        reason = self.refusal(prompt_token_ids, params)
        check(reason is None, reason or "")

    def abort_request(self, request_id: str) -> bool:
        """End a request now and forget it; its blocks are free at once. False: no such
        request was running (unknown, or finished and returned already)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq in self._failed:
            self._failed.remove(seq)
        if seq.finished:
            return False
        self._finish(seq, "abort")
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes (vLLM's name); False if running requests still hold
        some of their blocks (those are forgotten once they end)."""
        return self.runner.blocks.reset_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._failed) or bool(self._in_flight)

    def batches_in_flight(self) -> list[list[str]]:
        """The request ids of each launched step whose tokens are not read yet, oldest first
        (one after each `step()` in one stage, `num_stages` across a pipeline)."""
        return [[seq.request_id for seq, _ in launched.owners] for launched in self._in_flight]

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
        outputs = [request_output(seq, []) for seq in self._failed]
        for seq in self._failed:
            self._leave(seq)
        self._failed = []
        if any(launched.constrained for launched in self._in_flight):
            # a constrained row's next mask needs its token: read them before going on
            while self._in_flight:
                outputs += self._read(self._in_flight.pop(0))
        scheduled = self.scheduler.schedule()
        if scheduled:
            self._in_flight.append(self._launch(scheduled))
        while len(self._in_flight) > self.depth or (self._in_flight and not scheduled):
            outputs += self._read(self._in_flight.pop(0))
        return outputs

    def _launch(self, scheduled) -> _Launched:
        pieces, spans, late_at, late_rows = step_pieces(scheduled)
        late = None
        if late_at:
            previous = self._in_flight[-1].tokens
            if late_rows == list(range(len(previous))):    # steady decode: every row, in order
                late = (late_at, previous)
            else:
                rows = host_to_device(np.array(late_rows, dtype=np.int64), previous.device)
                late = (late_at, previous.index_select(0, rows))
        logits = self.runner.step(pieces, late=late)       # None on a stage before the last
        if any(piece.all_rows for piece in pieces):
            share = self.link.broadcast_from_last if self.link is not None else None
            for p, piece, (first, _) in zip(scheduled, pieces, spans):
                if piece.all_rows:
                    record_prompt_logprobs(p, logits, first, share, self.device)
            rows = [first + count - 1 for p, (first, count) in zip(scheduled, spans) if p.sample]
            if logits is not None:
                logits = logits.index_select(0, host_to_device(np.array(rows, dtype=np.int64),
                                                               logits.device))
        owners = [p.seq for p in scheduled if p.sample]
        tokens = self._sample(logits, owners)
        works, wanted = (), None
        if self.link is None:
            wanted = self._logprob_copies.start(logits, tokens, owners)
        elif owners:          # from the last stage to every rank, read with the step
            works = (self.link.broadcast_from_last(tokens, async_op=True),)
            table = self._logprob_copies.table(logits, tokens, owners)
            if table is not None:
                works += (self.link.broadcast_from_last(table[1], async_op=True),)
                wanted = (table[0], (table[1], None))
        advance(scheduled, self.scheduler.cache_computed)
        placed = place_sampled(owners, self.max_model_len)
        pending = self._readback.start(tokens) if self.link is None else (tokens, None)
        return _Launched(placed, tokens, pending, wanted,
                         any(s.matcher is not None for s in owners), works)

    def _read(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens and put them in place; stops end sequences."""
        outputs = []
        table = {}
        for work in launched.works:          # pipeline: the last stage's tokens have arrived
            work.wait()
        if launched.logprobs is not None:
            rows, pending = launched.logprobs
            table = dict(zip(rows, TokenReadback.read(pending, self.comm)))
        stop_ids, max_len = self.stop_ids, self.max_model_len
        for i, ((seq, index), tok) in enumerate(zip(
                launched.owners, self._readback.read(launched.pending, self.comm))):
            if seq.finished:                # stopped, aborted or failed meanwhile: dropped
                continue
            seq.output_token_ids[index] = tok
            seq.num_pending -= 1
            p = seq.params
            if not (table or seq.matcher is not None or tok in stop_ids or p.stop_token_ids
                    or index + 1 >= p.max_new_tokens
                    or len(seq.prompt_token_ids) + index + 1 >= max_len):
                outputs.append(request_output(seq, [tok]))    # (no stop possible: the most
                continue                                      # common row, its checks inline)
            if i in table:
                seq.logprobs.append(unpack_logprobs(tok, table[i], seq.params.logprobs))
            if seq.matcher is not None and not seq.matcher.accept_token(tok):
                # (a token outside the mask is sampled only when the mask allows none)
                self._finish(seq, "error: no token of this model's vocabulary can continue the "
                                  "structured output here: the constraint cannot be written "
                                  "in its tokens")
                outputs.append(request_output(seq, [tok]))
                self._leave(seq)
                continue
            reason = stop_reason(seq, tok, index + 1, stop_ids, max_len)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(request_output(seq, [tok]))
            if seq.finished:
                self._leave(seq)
        return outputs

    def _leave(self, seq: Sequence) -> None:
        """A finished request whose last output is being returned leaves the engine."""
        if self.seqs.get(seq.request_id) is seq:
            del self.seqs[seq.request_id]

    def _sample(self, logits, owners: list[Sequence]) -> torch.Tensor:
        """One token per owner, on the device, each row with its request's parameters and
        generator. Rank 0 decides and broadcasts, so ranks never diverge. Across pipeline
        stages the last stage decides (its rank 0's choice goes to every rank of every stage
        in `_launch`); the stages before it, without logits, return an empty [n] for it."""
        if not owners or logits is None:
            return torch.empty(len(owners), dtype=torch.int64, device=self.device)
        previous = self._in_flight[-1].tokens if self._in_flight else None
        controlled = [controlled_row(i, s, previous, self.stop_ids, logits.device)
                      for i, s in enumerate(owners) if has_controls(s.params)]
        processed = apply_controls(logits, controlled)
        constrained = constraint_rows(owners)
        if constrained:
            if processed is logits:         # the raw logits stay as they are (logprobs)
                processed = logits.clone()
            self.grammars.mask(processed, constrained)
        tokens = sample(processed, [s.params for s in owners], [s.generator for s in owners],
                        self.generator)
        return self.comm.broadcast(tokens.contiguous(), src=0)   # (this stage's TP ranks)
