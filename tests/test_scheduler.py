"""The scheduler's decode loop (`Scheduler._schedule_decodes`, written out for host time)
against the general loop it replaces, step by step over random workloads that preempt."""
import random

import pytest

from weavelm.engine.block_manager import BlockAllocator
from weavelm.engine.sampler import SamplingParams
from weavelm.engine.scheduler import Scheduler, Status
from weavelm.engine.sequence import Sequence
from weavelm.engine.step_rows import advance


class GeneralScheduler(Scheduler):
    """The scheduler's running-sequence passes as they were before the decode loop: every
    running sequence through the general checks (`_chunk`, `_reserve`, `_piece`), a pass for
    decode tokens and one for the rest of started prompts (admission is shared)."""

    def schedule(self):
        budget = self.max_tokens
        limit = self._batch_limit()
        pieces = []
        for decoding in (True, False):
            for seq in list(self.running):
                if budget == 0 or len(pieces) >= limit or seq.status is not Status.RUNNING \
                        or seq.last_in_flight or self._waits_for_token(seq) \
                        or (seq.num_uncomputed == 1) is not decoding or seq.num_uncomputed == 0:
                    continue
                n = self._chunk(seq, budget)
                if self._reserve(seq, n, pieces):
                    pieces.append(self._piece(seq, n))
                    budget -= n
        self._admit(pieces, budget, limit)
        return pieces

    def _schedule_decodes(self, pieces, budget, limit):
        raise AssertionError("the reference schedules decode tokens in its own loop")


class CountingScheduler(Scheduler):
    """The scheduler under test, counting the preemptions its decode loop makes."""
    decode_preemptions = 0

    def _schedule_decodes(self, pieces, budget, limit):
        before = self.num_preempted
        budget = super()._schedule_decodes(pieces, budget, limit)
        self.decode_preemptions += self.num_preempted - before
        return budget


def _run(cls, seed: int, caching: bool, stages: int, tokens: int, skip_past_prompt=False):
    rng = random.Random(seed)
    sched = cls(BlockAllocator(24, 4, caching=caching), max_num_seqs=12,
                max_num_batched_tokens=tokens, num_stages=stages)
    log, seqs, arrival = [], [], 0
    for step in range(120):
        for _ in range(rng.choice((0, 1, 1, 2))):
            prompt = [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
            seq = Sequence(str(arrival), prompt, SamplingParams(
                max_new_tokens=rng.randrange(1, 25), ignore_eos=True), arrival)
            arrival += 1
            seqs.append(seq)
            sched.add(seq)
        pieces = sched.schedule()              # while the last step runs (as the engine)
        for seq in seqs:                       # then the last step's tokens are read
            if seq.num_pending:
                seq.num_pending = 0
                if seq.last_in_flight:
                    sched.finish(seq, "length")
        log.append([(p.seq.request_id, p.start, p.length, p.sample, list(p.seq.blocks))
                    for p in pieces])
        for p in pieces:                       # this step: its tokens are read after the next
            if p.seq.finished:                 # schedule (one ended at the read: not run)
                continue
            seq = p.seq
            if skip_past_prompt:               # the engine's way (step_rows.advance)
                advance([p], sched.cache_computed)
            else:
                seq.num_computed += p.length
                sched.cache_computed(seq)
            if p.sample:
                seq.output_token_ids.append(rng.randrange(50))
                seq.num_pending = 1
                seq.last_in_flight = len(seq.output_token_ids) >= seq.params.max_new_tokens
        log.append(sched.num_preempted)
    return log, sched


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("tokens", [24, 5])          # 5: the token budget ends decode passes
@pytest.mark.parametrize("seed", range(4))
def test_decode_loop_schedules_as_the_general_loop(seed, tokens, caching, stages):
    fast, sched = _run(CountingScheduler, seed, caching, stages, tokens)
    general, _ = _run(GeneralScheduler, seed, caching, stages, tokens)
    assert fast == general
    assert sched.decode_preemptions > 0                # the decode loop itself preempted


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_naming_prompt_blocks_only_for_pieces_in_the_prompt_changes_nothing(seed, stages):
    """The engine names filled prompt blocks only after pieces that reach into the prompt
    (`step_rows.advance`): the same schedules, blocks, cache hits and preemptions as naming
    after every piece, with prefix caching on."""
    fast, sched = _run(Scheduler, seed, True, stages, 24, skip_past_prompt=True)
    every, ref = _run(Scheduler, seed, True, stages, 24)
    assert fast == every
    assert sched.blocks.hits == ref.blocks.hits and sched.blocks.queries == ref.blocks.queries
