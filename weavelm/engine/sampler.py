"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded).

B = sequences, V = vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from weavelm.errors import check


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
              and self.max_new_tokens >= 1,
              f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        check(number(self.temperature) and self.temperature >= 0,
              f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        check(isinstance(self.top_k, int) and self.top_k >= 0,
              f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        check(number(self.top_p) and 0 < self.top_p <= 1,
              f"top_p must be a number in (0, 1], got {self.top_p!r}")
        check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
              f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW sample as greedy: dividing logits by them overflows
        (as the anchors do)."""
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TokenReadback:
    """Sampled tokens copied back to the host without waiting for the GPU, for callers that
    queue step k + 1 before they read step k (the engine, the decode loop): two pinned buffers
    used in turn, an event per copy.

        pending = readback.start(tokens)        # right after sampling step k
        ... queue step k + 1 ...
        values = readback.read(pending, comm)    # step k's tokens as Python ints
    """

    def __init__(self, size: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self._host = [torch.zeros(size, dtype=torch.int64, pin_memory=self.cuda)
                      for _ in range(2)]
        self._turn = 0

    def start(self, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
        self._turn ^= 1
        host = self._host[self._turn][:len(tokens)]
        if not self.cuda:
            host.copy_(tokens)
            return host, None
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def read(pending: tuple[torch.Tensor, object], comm) -> list[int]:
        host, event = pending
        if event is not None:
            event.synchronize()
        check_errors = getattr(comm, "check_errors", None)
        if check_errors is not None:        # a fused kernel timed out inside a graph replay
            check_errors(sync=False)
        return host.tolist()
