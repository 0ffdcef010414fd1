"""A step's rows on the host: what the engine hands the runner for the scheduled pieces, and the
bookkeeping once their tokens are sampled. Per sequence, every step: at 1,024 running sequences
these loops are most of the engine's host time (benchmarks/probe_host_parts.py), so they read
each attribute once and skip work a decode row never needs (a decode row lies past its prompt:
no prompt tokens to slice, no prompt log-probabilities, no prompt blocks to name).
"""
from __future__ import annotations

from weavelm.engine.logprobs import covers_wanted_prompt_logprobs
from weavelm.engine.model_runner import StepPiece

PLACEHOLDER = -1                         # a sampled token not read yet (never a real id)


def step_pieces(scheduled) -> tuple[list[StepPiece], list[tuple[int, int]], list[int],
                                    list[int]]:
    """(pieces, spans, late_at, late_rows) of the scheduled pieces: the runner's pieces; each
    piece's rows of the logits (first, count: every token's for prompt log-probabilities, else
    the last token's if it samples); the step's token indices whose value is still on the
    device (a placeholder: the previous step sampled it) and their rows in that step."""
    pieces, spans, late_at, late_rows = [], [], [], []
    offset = row = 0
    for p in scheduled:
        seq, start, length = p.seq, p.start, p.length
        n_prompt, out = len(seq.prompt_token_ids), seq.output_token_ids
        all_rows = seq.params.prompt_logprobs is not None and covers_wanted_prompt_logprobs(p)
        ids = out[start - n_prompt:start - n_prompt + length] if start >= n_prompt \
            else seq.token_slice(start, length)
        pieces.append(StepPiece(ids, start, seq.blocks, p.sample, all_rows))
        count = length if all_rows else int(p.sample)
        spans.append((row, count))
        row += count
        offset += length
        if seq.num_pending and start + length == n_prompt + len(out):
            late_at.append(offset - 1)         # its last token is still on the device
            late_rows.append(seq.pending_row)
    return pieces, spans, late_at, late_rows


def advance(scheduled, cache_computed) -> None:
    """Count the pieces' tokens as computed; name the prompt blocks they filled
    (`cache_computed`, only for pieces that reach into the prompt: a piece past it fills none)."""
    for p in scheduled:
        seq = p.seq
        seq.num_computed += p.length
        if p.start < len(seq.prompt_token_ids):
            cache_computed(seq)


def place_sampled(owners, max_model_len: int) -> list[tuple[object, int]]:
    """Give each sampling sequence a placeholder for its token (row i of the step's tokens);
    returns (sequence, index of its placeholder) in row order."""
    placed = []
    for row, seq in enumerate(owners):
        out = seq.output_token_ids
        placed.append((seq, len(out)))
        out.append(PLACEHOLDER)
        seq.num_pending += 1
        seq.pending_row = row
        seq.last_in_flight = len(out) >= seq.params.max_new_tokens \
            or len(seq.prompt_token_ids) + len(out) >= max_model_len
    return placed
