"""What the engine returns for a request after a step, and when a sequence stops."""
from __future__ import annotations

from dataclasses import dataclass

from weavelm.engine.logprobs import TokenLogprob
from weavelm.engine.sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                 # every token generated so far
    new_token_ids: list[int]             # the ones this step added
    finished: bool
    finish_reason: str | None            # "stop", "length", "abort" or "error: ..."
    # With SamplingParams.logprobs: one per token of token_ids. With prompt_logprobs: one per
    # prompt token, the first None (nothing predicts it); complete once a token was generated.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0           # prompt tokens found in the prefix cache, not computed


def stop_reason(seq: Sequence, token: int, generated: int, stop_ids: set[int],
                max_model_len: int) -> str | None:
    """Why a sequence ends at its `generated`-th token `token`, or None."""
    if token in stop_ids and not seq.params.ignore_eos:
        return "stop"
    if seq.params.stop_token_ids and token in seq.params.stop_token_ids:
        return "stop"
    if seq.matcher is not None and seq.matcher.is_terminated():
        return "stop"
    if generated >= seq.params.max_new_tokens \
            or len(seq.prompt_token_ids) + generated >= max_model_len:
        return "length"
    return None


def request_output(seq: Sequence, new: list[int]) -> RequestOutput:
    """seq's output after a step that added the tokens `new`."""
    params = seq.params
    return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.read_token_ids,
                         new, seq.finished, seq.finish_reason,
                         list(seq.logprobs) if params.logprobs is not None else None,
                         list(seq.prompt_logprobs) if params.prompt_logprobs is not None
                         else None, seq.num_cached_tokens)
