"""What the engine returns for a request after a step, and when a sequence stops."""
from __future__ import annotations

from weavelm.engine.logprobs import TokenLogprob
from weavelm.engine.sequence import Sequence


class RequestOutput:
    """A request's state after a step. `token_ids` is every token generated so far: a list
    built when read, from the engine's own list of the request's tokens (it only grows past
    what this output saw), so a step's output costs no copy of a long generation (at 1,024
    running sequences the copies had been ~1.2 ms of host time a step)."""
    __slots__ = ("request_id", "prompt_token_ids", "_tokens", "_count", "new_token_ids",
                 "finished", "finish_reason", "logprobs", "prompt_logprobs", "num_cached_tokens")

    def __init__(self, request_id: str, prompt_token_ids: list[int], token_ids: list[int],
                 new_token_ids: list[int], finished: bool, finish_reason: str | None,
                 logprobs: list[TokenLogprob] | None = None,
                 prompt_logprobs: list[TokenLogprob | None] | None = None,
                 num_cached_tokens: int = 0, *, count: int | None = None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._tokens = token_ids            # count: the engine's list, of which the first
        self._count = len(token_ids) if count is None else count    # `count` are this output's
        self.new_token_ids = new_token_ids  # the ones this step added
        self.finished = finished
        self.finish_reason = finish_reason  # "stop", "length", "abort" or "error: ..."
        # With SamplingParams.logprobs: one per token of token_ids. With prompt_logprobs: one
        # per prompt token, the first None (nothing predicts it); complete once a token was
        # generated.
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.num_cached_tokens = num_cached_tokens  # prompt tokens found in the prefix cache

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[:self._count]

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, token_ids={self.token_ids}, "
                f"new_token_ids={self.new_token_ids}, finished={self.finished}, "
                f"finish_reason={self.finish_reason!r})")


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
    # read tokens are never rewritten (placeholders fill in order): the engine's list serves
    return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids,
                         new, seq.finished, seq.finish_reason,
                         list(seq.logprobs) if params.logprobs is not None else None,
                         list(seq.prompt_logprobs) if params.prompt_logprobs is not None
                         else None, seq.num_cached_tokens,
                         count=len(seq.output_token_ids) - seq.num_pending)
