"""Continuous batching with chunked prefill: which tokens of which sequences the next step runs.

    scheduler = Scheduler(blocks, max_num_seqs=256, max_num_batched_tokens=8192)
    scheduler.add(seq)
    pieces = scheduler.schedule()            # [ScheduledPiece(seq, start, length, sample)]
    ... run the step, sample ...
    scheduler.finish(seq, reason)            # frees its blocks at once

A step carries at most `max_num_batched_tokens` tokens: first one token for every running
sequence that is decoding, then prefill chunks, oldest sequence first: running sequences with
prompt left, then waiting ones (first come, first served) while fewer than `max_num_seqs` run.
A chunk may stop anywhere in a prompt; the next step continues it. When the cache has no block
for a running sequence's next tokens, the newest running sequence is preempted: its blocks go
back and it waits at the front of the queue to be recomputed (prompt and outputs prefilled
again), as vLLM's recompute preemption. Admitting a waiting sequence never preempts. A
sequence whose token in flight is its last by length (the engine runs one step ahead) gets no
piece and is not preempted: it ends when that token is read.

Across pipeline stages (`num_stages` > 1) a step leaves out the sequences whose sampled token is
still in flight (the first stage needs it to go on), and takes at most 1 / (num_stages + 1) of
the sequences there are, so that they form batches taking turns: one in each stage while the
host plans the next (vLLM keeps one batch per stage in flight likewise).

With prefix caching, a waiting sequence whose next prompt block is being computed right now by
a running one (the n samples of one prompt, many requests on one new system prompt) waits
until it is cached and then takes it, rather than computing it a second time; the sequences
behind it are admitted meanwhile.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from weavelm.engine.block_manager import BlockAllocator, prefix_hashes
from weavelm.engine.sequence import Sequence, Status


PROMPT_LOGPROBS_CHUNK = 512


@dataclass
class ScheduledPiece:
    seq: Sequence
    start: int               # position of the piece's first token
    length: int
    sample: bool             # it reaches the sequence's last token: sample the next one


class Scheduler:
    def __init__(self, blocks: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 num_stages: int = 1):
        self.blocks = blocks
        self.num_stages = num_stages
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # in admission order: the newest last
        self.num_preempted = 0
        # prompt-block hash -> running sequences that will compute it (not cached yet)
        self._computing: dict[bytes, int] = {}

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stopped, out of length, aborted, failed) and free its blocks now."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._claim(seq, -1)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.blocks)
        seq.blocks = []
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _batch_limit(self) -> int:
        """Sequences one step may take: all it can at one stage; across stages a share of
        those there are (running and waiting), so that num_stages + 1 batches take turns."""
        if self.num_stages == 1:
            return self.max_num_seqs
        there = min(self.max_num_seqs, len(self.running) + len(self.waiting))
        return max(1, -(-there // (self.num_stages + 1)))

    def _waits_for_token(self, seq: Sequence) -> bool:
        """Across stages: seq's last sampled token has not come back from the last stage."""
        return self.num_stages > 1 and seq.num_pending > 0

    def schedule(self) -> list[ScheduledPiece]:
        budget = self.max_tokens
        limit = self._batch_limit()
        pieces: list[ScheduledPiece] = []
        # Running sequences, oldest first: decode tokens, then the rest of started prompts.
        budget = self._schedule_decodes(pieces, budget, limit)
        for seq in list(self.running):
            if budget == 0 or len(pieces) >= limit:
                break
            if seq.status is not Status.RUNNING or seq.last_in_flight \
                    or self._waits_for_token(seq) or seq.num_uncomputed <= 1:
                continue
            n = self._chunk(seq, budget)
            if self._reserve(seq, n, pieces):
                pieces.append(self._piece(seq, n))
                budget -= n
        self._admit(pieces, budget, limit)
        return pieces

    def _admit(self, pieces: list, budget: int, limit: int) -> None:
        """Waiting sequences, first come first served, while there is room."""
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs \
                and len(pieces) < limit:
            seq = self.waiting[0]
            if self._prefix_in_flight(seq) or self._waits_for_token(seq):
                deferred.append(self.waiting.popleft())
                continue
            cached = self._take_cached_prefix(seq) if not seq.blocks else 0
            n = self._chunk(seq, budget)
            need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.blocks)
            if need > self.blocks.num_free:
                if cached:                            # given back: it waits as it was
                    self.blocks.free(seq.blocks)
                    seq.blocks, seq.num_computed, seq.num_registered = [], 0, 0
                break                                 # admitting never preempts
            self.waiting.popleft()
            self._extend(seq, need)
            seq.status, seq.admitted = Status.RUNNING, True
            self.blocks.count_lookup(*seq.lookup)
            self.running.append(seq)
            self._claim(seq, 1)
            pieces.append(self._piece(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))

    def _schedule_decodes(self, pieces: list, budget: int, limit: int) -> int:
        """One token for each running sequence with one left to compute, oldest first; returns
        the budget left. The general loop's checks written out for the steady state (this runs
        for every sequence every step: at 1,024 sequences its host time is the step's)."""
        bs, running, multi = self.blocks.block_size, Status.RUNNING, self.num_stages > 1
        for seq in list(self.running):
            if budget == 0 or len(pieces) >= limit:
                break
            if seq.status is not running or seq.last_in_flight \
                    or (multi and seq.num_pending > 0):
                continue
            done = seq.num_computed
            if len(seq.prompt_token_ids) + len(seq.output_token_ids) - done != 1:
                continue
            # its next token's slot is past its blocks: one more (or preempt for it)
            if done >= len(seq.blocks) * bs and not self._reserve(seq, 1, pieces):
                continue
            pieces.append(ScheduledPiece(seq, done, 1, True))
            budget -= 1
        return budget

    # -- prefix caching ---------------------------------------------------------------------
    def _hashes(self, seq: Sequence) -> list:
        if seq.prompt_hashes is None:
            bs = self.blocks.block_size
            seq.prompt_hashes = prefix_hashes(seq.prompt_token_ids, bs,
                                              len(seq.prompt_token_ids) // bs)
        return seq.prompt_hashes

    def _cacheable(self, seq: Sequence) -> list:
        """The hashes of seq's prompt blocks it may take from the cache: full blocks before its
        last token (at least that one is computed, so there are logits); none where it must
        compute its whole prompt (prompt log-probabilities need every prompt row's logits)."""
        if not self.blocks.caching or seq.params.prompt_logprobs is not None:
            return []
        return self._hashes(seq)[:(seq.num_tokens - 1) // self.blocks.block_size]

    def _claim(self, seq: Sequence, sign: int) -> None:
        """Count seq (+1: admitted; -1: preempted or ended) as computing the prompt blocks it
        has not named in the cache yet."""
        if not self.blocks.caching:
            return
        full = len(seq.prompt_token_ids) // self.blocks.block_size
        for h in self._hashes(seq)[seq.num_registered:full]:
            if sign > 0:
                self._computing[h] = self._computing.get(h, 0) + 1
            else:
                self._unclaim(h)

    def _unclaim(self, h: bytes) -> None:
        left = self._computing.get(h, 0) - 1
        if left > 0:
            self._computing[h] = left
        else:
            self._computing.pop(h, None)

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether the first of seq's cacheable prompt blocks that is not cached yet is being
        computed by a running sequence (seq then waits for it). The hash it waits on is kept,
        so a sequence that keeps waiting costs one lookup a step."""
        if not self._computing or seq.blocks:
            return False
        if seq.waits_on is not None and seq.waits_on in self._computing:
            return True
        seq.waits_on = None
        for h in self._cacheable(seq):
            if h in self._computing:
                seq.waits_on = h
                return True
            if not self.blocks.is_cached(h):
                return False
        return False

    def _take_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence about to be admitted the cached blocks of its prompt's longest
        cached prefix (at least its last token is left to compute, so there are logits);
        returns the tokens they hold."""
        hashes = self._cacheable(seq)
        if not hashes:
            return 0
        seq.blocks = self.blocks.lookup(hashes)
        seq.num_registered = len(seq.blocks)
        seq.num_computed = len(seq.blocks) * self.blocks.block_size
        seq.lookup = (len(hashes), len(seq.blocks))
        if not seq.admitted:                          # its first admission: what it found
            seq.num_cached_tokens = seq.num_computed
        return seq.num_computed

    def cache_computed(self, seq: Sequence) -> None:
        """Name the prompt blocks of seq that its steps have filled (so far queued is enough:
        a later step that reads them runs after on the same stream)."""
        if not self.blocks.caching:
            return
        full = min(seq.num_computed, len(seq.prompt_token_ids)) // self.blocks.block_size
        if full > seq.num_registered:
            hashes = self._hashes(seq)
            for i in range(seq.num_registered, full):
                self.blocks.register(seq.blocks[i], hashes[i])
                self._unclaim(hashes[i])
            seq.num_registered = full

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens of seq for this step: all it has left, within the budget; a prompt whose
        log-probabilities are wanted goes in chunks of PROMPT_LOGPROBS_CHUNK (each of its
        tokens' logits, [chunk, V] in float32, is alive at once)."""
        n = min(budget, seq.num_uncomputed)
        if seq.prompt_logprobs_left:
            n = min(n, PROMPT_LOGPROBS_CHUNK)
        return n

    def _piece(self, seq: Sequence, n: int) -> ScheduledPiece:
        return ScheduledPiece(seq, seq.num_computed, n, seq.num_computed + n == seq.num_tokens)

    def _reserve(self, seq: Sequence, n: int, scheduled: list[ScheduledPiece]) -> bool:
        """Blocks for seq's next n tokens, preempting the newest other running sequences if the
        cache is full (those already in this step stay). False: seq itself was preempted."""
        need = self.blocks.blocks_for(seq.num_computed + n) - len(seq.blocks)
        in_step = {id(p.seq) for p in scheduled} if need > self.blocks.num_free else ()
        while need > self.blocks.num_free:       # (the set only then: it is O(running))
            # (not one whose last token is in flight: it ends at the next read, and recomputed
            # it would be given one token too many)
            victims = [s for s in self.running if s is not seq and id(s) not in in_step
                       and not s.last_in_flight]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            self._extend(seq, need)
        return True

    def _extend(self, seq: Sequence, n: int) -> None:
        """n more blocks for seq, following its last one where they are free."""
        seq.blocks.extend(self.blocks.allocate(n, after=seq.blocks[-1] if seq.blocks else None))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._claim(seq, -1)
        self.blocks.free(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = [], 0, Status.WAITING
        seq.num_registered = 0
        self.waiting.appendleft(seq)
        self.num_preempted += 1
