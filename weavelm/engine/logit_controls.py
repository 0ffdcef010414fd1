"""The controls a request puts on its logits before sampling (temperature, min-p, top-k and
top-p come after, in `sampler.sample`), batched over the rows of a step that have them:

- `logit_bias`: added to the named tokens' logits (OpenAI's);
- `min_tokens`: the stop tokens (EOS and the request's `stop_token_ids`) masked until the
  output has that many tokens (vLLM's);
- penalties on the tokens seen so far (vLLM's formulas): the repetition penalty p on every
  token of the prompt or the output (logit / p where positive, logit * p where negative), then
  `frequency_penalty` x (its count in the output) and `presence_penalty` x (1 if it is in the
  output) subtracted.

The log-probabilities a request asks for are the model's own (taken before these).

    logits = apply_controls(logits, rows)      # rows: [Controlled(...)] of the step's rows
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from weavelm.engine.sampler import SamplingParams
from weavelm.models.host_inputs import host_to_device


@dataclass
class Controlled:
    """One row of the step's logits whose request has controls."""
    row: int
    params: SamplingParams
    output: torch.Tensor | None        # [n] int64 on the device: the output so far (penalties)
    prompt: list[int] | None           # the prompt (repetition penalty), else None
    generated: int                     # output tokens so far (min_tokens)
    stop_ids: frozenset                # the engine's stop tokens (EOS, end of turn)


def controlled_row(row: int, seq, previous: torch.Tensor | None, stop_ids,
                   device: torch.device) -> Controlled:
    """Row `row` of a step's logits as seq's controls need it: its output so far on the device
    (a token still in flight, the engine being one step ahead, taken from `previous`, the
    tokens that step sampled), its prompt, how many tokens it has."""
    params, output = seq.params, None
    if params.penalized:
        known = seq.output_token_ids[:len(seq.output_token_ids) - seq.num_pending]
        output = host_to_device(np.array(known, dtype=np.int64), device)
        if seq.num_pending:             # at most one: one step runs ahead
            output = torch.cat([output, previous[seq.pending_row:seq.pending_row + 1]])
    return Controlled(row, params, output,
                      seq.prompt_token_ids if params.repetition_penalty != 1 else None,
                      len(seq.output_token_ids),
                      frozenset() if params.ignore_eos else frozenset(stop_ids))


def has_controls(params: SamplingParams) -> bool:
    return bool(params.logit_bias) or params.min_tokens > 0 or params.penalized


def apply_controls(logits: torch.Tensor, rows: list[Controlled]) -> torch.Tensor:
    """logits [B, V] with every controlled row's controls applied (a new tensor)."""
    if not rows:
        return logits
    logits = logits.clone()
    V, dev = logits.shape[1], logits.device
    where, ids, values = [], [], []            # logit_bias as one scatter-add
    masked_rows, masked_ids = [], []           # min_tokens as one index_put
    for c in rows:
        for t, v in (c.params.logit_bias or {}).items():
            where.append(c.row), ids.append(t), values.append(float(v))
        if c.generated < c.params.min_tokens:
            stops = set(c.stop_ids) | set(c.params.stop_token_ids or ())
            stops = [t for t in stops if t < V]
            masked_rows += [c.row] * len(stops)
            masked_ids += stops
    if where:
        logits.index_put_((_ids(where, dev), _ids(ids, dev)),
                          host_to_device(np.array(values, dtype=np.float32), dev),
                          accumulate=True)
    penalized = [c for c in rows if c.params.penalized]
    if penalized:
        logits = _penalize(logits, penalized)
    if masked_rows:
        logits[_ids(masked_rows, dev), _ids(masked_ids, dev)] = float("-inf")
    return logits


def _penalize(logits: torch.Tensor, rows: list[Controlled]) -> torch.Tensor:
    V, dev = logits.shape[1], logits.device
    index = _ids([c.row for c in rows], dev)
    sub = logits.index_select(0, index)                            # [R, V]
    R = len(rows)
    # counts of each token in each row's output: the outputs padded with V (a spare column)
    width = max(1, max(len(c.output) for c in rows))
    outputs = torch.full((R, width), V, dtype=torch.int64, device=dev)
    for i, c in enumerate(rows):
        outputs[i, :len(c.output)] = c.output
    counts = torch.zeros(R, V + 1, dtype=logits.dtype, device=dev)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=logits.dtype))
    counts = counts[:, :V]
    rep = [c.params.repetition_penalty for c in rows]
    if any(p != 1 for p in rep):
        seen = counts > 0
        prompts = [c.prompt or [] for c in rows]
        pwidth = max(1, max(len(p) for p in prompts))
        padded = np.full((R, pwidth), V, dtype=np.int64)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = p
        in_prompt = torch.zeros(R, V + 1, dtype=torch.bool, device=dev)
        in_prompt.scatter_(1, host_to_device(padded, dev), True)
        seen |= in_prompt[:, :V]
        p = _column(rep, dev)
        sub = torch.where(seen, torch.where(sub > 0, sub / p, sub * p), sub)
    sub = sub - _column([c.params.frequency_penalty for c in rows], dev) * counts \
        - _column([c.params.presence_penalty for c in rows], dev) * (counts > 0).to(sub.dtype)
    return logits.index_copy(0, index, sub)


def _ids(values: list[int], device) -> torch.Tensor:
    return host_to_device(np.array(values, dtype=np.int64), device)


def _column(values: list[float], device) -> torch.Tensor:
    return host_to_device(np.array(values, dtype=np.float32), device).view(-1, 1)
