"""A request's sequence as the scheduler sees it: its tokens, how many are in the KV cache, its
blocks and its state."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from weavelm.engine.sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"        # queued, or preempted (its blocks given back, recomputed later)
    RUNNING = "running"        # holds blocks; prefilling or decoding
    FINISHED = "finished"


_FINISHED = Status.FINISHED


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int                               # order of add_request: FCFS and "newest"
    output_token_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0                      # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None           # "stop", "length", "abort", or an error message
    generator: object = None                   # torch.Generator of a seeded sampled request
    # The engine runs one step ahead of the host: a token sampled on the device that the host
    # has not read yet sits at the end of output_token_ids as a placeholder. `pending_row` is
    # the newest one's row among the tokens its step sampled; `last_in_flight`: that token is
    # the sequence's last by length, so the scheduler gives it no further step.
    num_pending: int = 0
    pending_row: int = 0
    last_in_flight: bool = False
    # With params.logprobs / prompt_logprobs: a TokenLogprob per read output token; per prompt
    # token from the first (None: nothing predicts it) as far as the prefill has reached.
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    matcher: object = None                     # structured output: its grammar's state
    # Prefix caching: the prompt's full blocks' hashes (made on first use), how many of its
    # blocks are named in the cache, and how many prompt tokens its first admission found
    # cached (vLLM's num_cached_tokens).
    prompt_hashes: list | None = None
    num_registered: int = 0
    num_cached_tokens: int = 0
    lookup: tuple = (0, 0)                     # its last lookup: (blocks queried, found)
    waits_on: bytes | None = None              # a prompt block another sequence computes now
    admitted: bool = False

    @property
    def prompt_logprobs_left(self) -> int:
        """Prompt tokens whose log-probability is wanted and not computed yet."""
        if self.params.prompt_logprobs is None:
            return 0
        return len(self.prompt_token_ids) - len(self.prompt_logprobs)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, length: int) -> list[int]:
        """tokens[start:start + length] without building the whole list (decode: the last)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:start - n + length]
        head = self.prompt_token_ids[start:start + length]
        return head + self.output_token_ids[:length - len(head)]

    @property
    def read_token_ids(self) -> list[int]:
        """The generated tokens the host has read (the placeholders left out)."""
        return self.output_token_ids[:len(self.output_token_ids) - self.num_pending]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is _FINISHED       # (an Enum's class lookup costs more: per step)
