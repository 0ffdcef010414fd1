"""A step's per-sequence rows (`engine/step_rows.py`, written for host time) against the loops
they replace in the engine, verbatim, over random sequences: prompts and outputs of any length,
chunks inside and across the prompt, decode rows, tokens still on the device, prompt
log-probabilities wanted or not."""
import copy
import random

import pytest

from weavelm.engine.logprobs import covers_wanted_prompt_logprobs
from weavelm.engine.model_runner import StepPiece
from weavelm.engine.sampler import SamplingParams
from weavelm.engine.scheduler import ScheduledPiece
from weavelm.engine.sequence import Sequence
from weavelm.engine.step_rows import PLACEHOLDER, place_sampled, step_pieces


def reference_pieces(scheduled):
    """The engine's loop before step_rows (LLMEngine._launch), verbatim."""
    pieces, spans, late_at, late_rows, offset, row = [], [], [], [], 0, 0
    for p in scheduled:
        seq = p.seq
        all_rows = covers_wanted_prompt_logprobs(p)
        pieces.append(StepPiece(seq.token_slice(p.start, p.length), p.start, seq.blocks,
                                p.sample, all_rows))
        count = p.length if all_rows else int(p.sample)      # its rows of the logits
        spans.append((row, count))
        row += count
        offset += p.length
        if seq.num_pending and p.start + p.length == seq.num_tokens:
            late_at.append(offset - 1)         # its last token is still on the device
            late_rows.append(seq.pending_row)
    return pieces, spans, late_at, late_rows


def reference_place(owners, max_model_len):
    placed = []
    for row, seq in enumerate(owners):
        placed.append((seq, len(seq.output_token_ids)))
        seq.output_token_ids.append(PLACEHOLDER)
        seq.num_pending += 1
        seq.pending_row = row
        seq.last_in_flight = len(seq.output_token_ids) >= seq.params.max_new_tokens \
            or seq.num_tokens >= max_model_len
    return placed


def _state(seq):
    return (seq.output_token_ids, seq.num_pending, seq.pending_row, seq.last_in_flight)


def _random_step(rng):
    scheduled = []
    for i in range(rng.randrange(1, 12)):
        prompt = [rng.randrange(100) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(max_new_tokens=rng.randrange(1, 30),
                                prompt_logprobs=rng.choice((None, 0, 2)))
        seq = Sequence(str(i), prompt, params, i)
        seq.output_token_ids = [rng.randrange(100) for _ in range(rng.randrange(0, 20))]
        seq.blocks = list(range(rng.randrange(0, 10)))
        if params.prompt_logprobs is not None:          # as far as the prefill has reached
            seq.prompt_logprobs = [None] * rng.randrange(1, len(prompt) + 1)
        seq.num_pending = rng.choice((0, 0, 1))
        seq.pending_row = rng.randrange(12)
        total = seq.num_tokens
        start = rng.choice((total - 1, rng.randrange(total)))   # a decode row or a chunk
        length = rng.randrange(1, total - start + 1)
        scheduled.append(ScheduledPiece(seq, start, length, start + length == total))
    return scheduled


@pytest.mark.parametrize("seed", range(200))
def test_step_rows_equal_the_engine_loops_they_replace(seed):
    rng = random.Random(seed)
    scheduled = _random_step(rng)
    assert step_pieces(scheduled) == reference_pieces(scheduled)
    owners = [p.seq for p in scheduled if p.sample]
    mine, theirs = copy.deepcopy(owners), copy.deepcopy(owners)
    max_len = rng.randrange(5, 80)
    got, want = place_sampled(mine, max_len), reference_place(theirs, max_len)
    assert [i for _, i in got] == [i for _, i in want]
    assert [_state(s) for s in mine] == [_state(s) for s in theirs]
