"""Log-probabilities (SamplingParams.logprobs / prompt_logprobs): the model's own distribution
(log-softmax of the raw logits, before temperature, penalties or masks: vLLM's default
"raw_logprobs"), with each token's k most likely alternatives.

Generated tokens: each step's table ([rows, 1 + 2k] float64: the token's log-probability, k
values, k ids) starts its copy to the host right after sampling (`LogprobCopies.start`: one
copy per step), and is read with the step's tokens. Prompt tokens: a prefill chunk of a request
that wants them returns every row's logits (`StepPiece.all_rows`) and its table is read at once
(`record_prompt_logprobs`: only such requests wait for their step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from weavelm.engine.sampler import MAX_LOGPROBS, TokenReadback
from weavelm.models.host_inputs import host_to_device


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its position (id and
    log-probability, most likely first) under the model's distribution there."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def logprob_table(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of logits [R, V]: the log-softmax at targets [R] and the k largest, packed as
    float64 [R, 1 + 2k] = (target's, k values, k ids): one tensor, so one copy to the host
    (float64 holds any vocabulary id exactly)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets.view(-1, 1))
    if k == 0:
        return chosen.double()
    values, ids = lp.topk(k, dim=-1)
    return torch.cat([chosen.double(), values.double(), ids.double()], dim=1)


def unpack_logprobs(token: int, row: list[float], k: int) -> TokenLogprob:
    """`token`'s entry from one row of `logprob_table`'s output (as Python floats), with k of
    the alternatives the row holds."""
    width = (len(row) - 1) // 2
    return TokenLogprob(token, row[0], [(int(row[1 + width + j]), row[1 + j])
                                        for j in range(k)])


def covers_wanted_prompt_logprobs(p) -> bool:
    """Whether scheduled piece p's logits give prompt log-probabilities still wanted: position
    q predicts prompt token q + 1."""
    seq = p.seq
    if not seq.prompt_logprobs_left:
        return False
    return p.start + 1 < len(seq.prompt_token_ids) \
        and p.start + p.length >= len(seq.prompt_logprobs)


def record_prompt_logprobs(p, logits: torch.Tensor | None, first_row: int, share=None,
                           device=None) -> None:
    """Append the prompt log-probabilities piece p's logits (from row first_row) give. It waits
    for this step's logits: only requests that want prompt log-probabilities pay. Across
    pipeline stages `share(table)` broadcasts the last stage's table in place (the other
    stages pass logits None and the `device` of an empty table of its shape)."""
    seq = p.seq
    begin = len(seq.prompt_logprobs)                   # the prompt token to score first
    end = min(len(seq.prompt_token_ids), p.start + p.length + 1)
    targets = seq.prompt_token_ids[begin:end]
    k = seq.params.prompt_logprobs
    if logits is None:
        table = torch.empty(len(targets), 1 + 2 * k, dtype=torch.float64, device=device)
    else:
        rows = logits[first_row + begin - 1 - p.start:first_row + end - 1 - p.start]
        table = logprob_table(rows, host_to_device(np.array(targets, dtype=np.int64),
                                                   logits.device), k)
    if share is not None:
        share(table)
    table = table.tolist()
    seq.prompt_logprobs += [unpack_logprobs(t, r, k) for t, r in zip(targets, table)]


class LogprobCopies:
    """The sampled tokens' tables, copied to the host without waiting (pinned buffers used in
    turn, as the tokens'; made on first use)."""

    def __init__(self, max_rows: int, device: torch.device):
        self.max_rows, self.device = max_rows, device
        self._readback: TokenReadback | None = None

    def start(self, logits, tokens, owners):
        """(rows of the owners that want log-probabilities, their copy's pending), or None."""
        made = self.table(logits, tokens, owners)
        if made is None:
            return None
        if self._readback is None:
            self._readback = TokenReadback(self.max_rows * (1 + 2 * MAX_LOGPROBS), self.device,
                                           torch.float64)
        return made[0], self._readback.start(made[1])

    def table(self, logits, tokens, owners):
        """(rows of the owners that want log-probabilities, their `logprob_table`), or None.
        Without logits (a pipeline stage before the last) an empty table of its shape, for
        the last stage's to arrive in."""
        rows = [i for i, s in enumerate(owners) if s.params.logprobs is not None]
        if not rows:
            return None
        k = max(owners[i].params.logprobs for i in rows)
        if logits is None:
            return rows, torch.empty(len(rows), 1 + 2 * k, dtype=torch.float64,
                                     device=self.device)
        if len(rows) < len(owners):
            index = host_to_device(np.array(rows, dtype=np.int64), logits.device)
            logits, tokens = logits.index_select(0, index), tokens.index_select(0, index)
        return rows, logprob_table(logits, tokens, k)
