"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, seeded).

B = sequences, V = vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from weavelm.engine.structured import Constraint
from weavelm.errors import check
from weavelm.models.host_inputs import host_to_device


GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20                     # most alternatives per token (vLLM's default limit)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    ignore_eos: bool = False
    # Log-probabilities (the model's, before temperature and truncation: vLLM's default
    # "raw_logprobs"): None = none; k = each generated (prompt) token's and its k most likely.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Controls of the distribution (vLLM's and OpenAI's formulas; engine/logit_controls.py):
    presence_penalty: float = 0.0     # minus this for each token the output holds
    frequency_penalty: float = 0.0    # minus this times its count in the output
    repetition_penalty: float = 1.0   # tokens of prompt or output: logit / p (> 0), * p (< 0)
    min_p: float = 0.0                # drop tokens less likely than min_p x the likeliest
    logit_bias: dict | None = None    # token id -> added to its logit
    min_tokens: int = 0               # no stop token (EOS, stop_token_ids) before this many
    stop_token_ids: list | None = None  # these end the request too ("stop"), and are output
    # Structured output: the tokens must spell what this says (engine/structured.py)
    structured: Constraint | None = None

    def __post_init__(self):
        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def number(x) -> bool:        # finite: 10**400 or inf would overflow the division
            try:
                return (integer(x) or isinstance(x, float)) and math.isfinite(float(x))
            except OverflowError:
                return False

        check(integer(self.max_new_tokens) and self.max_new_tokens >= 1,
              f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        check(number(self.temperature) and self.temperature >= 0,
              f"temperature must be a finite number >= 0 (0 = greedy), got "
              f"{self.temperature!r:.40}")
        check(integer(self.top_k) and self.top_k >= 0,
              f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        check(number(self.top_p) and 0 < self.top_p <= 1,
              f"top_p must be a number in (0, 1], got {self.top_p!r}")
        check(self.seed is None or (integer(self.seed) and 0 <= self.seed < 2**63),
              f"seed must be an integer in [0, 2**63), got {self.seed!r:.40}")
        check(isinstance(self.ignore_eos, bool),
              f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            check(k is None or (integer(k) and 0 <= k <= MAX_LOGPROBS),
                  f"{name} must be None or an integer in 0..{MAX_LOGPROBS}, got {k!r:.40}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(number(v) and -2 <= v <= 2, f"{name} must be a number in [-2, 2], got "
                                              f"{v!r:.40}")
        check(number(self.repetition_penalty) and 0 < self.repetition_penalty <= 100,
              f"repetition_penalty must be a number in (0, 100] (1 = off), got "
              f"{self.repetition_penalty!r:.40}")
        check(number(self.min_p) and 0 <= self.min_p <= 1,
              f"min_p must be a number in [0, 1], got {self.min_p!r:.40}")
        check(self.logit_bias is None or (
            isinstance(self.logit_bias, dict) and len(self.logit_bias) <= 1024 and all(
                integer(k) and k >= 0 and number(v) and -100 <= v <= 100
                for k, v in self.logit_bias.items())),
              f"logit_bias must map token ids (>= 0) to numbers in [-100, 100] (at most 1024), "
              f"got {self.logit_bias!r:.60}")
        check(integer(self.min_tokens) and 0 <= self.min_tokens,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.stop_token_ids is None or (
            isinstance(self.stop_token_ids, (list, tuple)) and len(self.stop_token_ids) <= 1024
            and all(integer(t) and t >= 0 for t in self.stop_token_ids)),
              f"stop_token_ids must be a list of token ids (>= 0), got "
              f"{self.stop_token_ids!r:.60}")

        check(self.structured is None or isinstance(self.structured, Constraint),
              f"structured must be a Constraint (weavelm.engine.structured), got "
              f"{type(self.structured).__name__}")

    @property
    def penalized(self) -> bool:
        """Whether the tokens seen so far change this request's logits."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 \
            or self.repetition_penalty != 1

    def token_ids_used(self) -> list[int]:
        """The token ids the parameters name (checked against the vocabulary by the engine)."""
        return list(self.logit_bias or ()) + list(self.stop_token_ids or ())

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW sample as greedy: dividing logits by them overflows
        (as the anchors do)."""
        return self.temperature < GREEDY_BELOW


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list,
           default: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B]: row i with params[i] (greedy, temperature,
    top-k, top-p), its randomness drawn from generators[i] (a seeded request's own) or, where
    that is None, from `default`.

    Sampling is an exponential race (argmax of probs / q, q ~ Exp(1), which picks token i with
    probability probs[i]) with each row's q drawn from its own generator: a seeded row's token
    depends on its logits and its generator alone, never on the other rows of the batch."""
    B, V = logits.shape
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy_rows) == B:
        return logits.argmax(dim=-1)
    controls = [(p.temperature, p.top_k, p.top_p) for p in params]
    uniform = all(c == controls[0] for c in controls)
    scale = _per_row([1.0 if p.greedy else p.temperature for p in params], uniform, logits)
    logits = logits / scale
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if max(min_p) > 0:          # below min_p x the likeliest token's probability
        probs = logits.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * _per_row(min_p, uniform and len(
            set(min_p)) == 1, logits)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if min(top_k) < V or min(top_p) < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)      # [B, V]
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if min(top_k) < V:      # below the k-th largest (ties with it stay)
            k = _per_row([k - 1 for k in top_k], uniform, logits, torch.int64)
            kth = sorted_logits[:, k:k + 1] if uniform else sorted_logits.gather(1, k)
            drop |= sorted_logits < kth                                      # kth: [B, 1]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        if min(top_p) < 1.0:    # the mass before it already reaches top_p
            probs = sorted_logits.softmax(dim=-1)
            drop |= probs.cumsum(dim=-1) - probs >= _per_row(top_p, uniform, logits)
        drop[:, 0] = False      # the most likely token always stays (a tiny top_p drops none)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs)
    own = [i for i, g in enumerate(generators) if g is not None]
    if len(own) < B:
        q.exponential_(generator=default)
    for i in own:
        q[i].exponential_(generator=generators[i])
    tokens = (probs / q.clamp_min_(1e-20)).argmax(dim=-1)
    if greedy_rows:
        index = host_to_device(np.array(greedy_rows, dtype=np.int64), logits.device)
        tokens[index] = logits.index_select(0, index).argmax(dim=-1)
    return tokens


def _per_row(values: list, uniform: bool, like: torch.Tensor, dtype=torch.float32):
    """One value per row as a [B, 1] tensor on the logits' device (a Python scalar when every
    row has the same parameters: no copy to the device)."""
    if uniform:
        return values[0]
    return host_to_device(np.array(values, dtype=np.float32 if dtype is torch.float32
                                   else np.int64), like.device).view(-1, 1)


class TokenReadback:
    """Sampled tokens copied back to the host without waiting for the GPU, for callers that
    queue step k + 1 before they read step k (the engine): two pinned buffers
    used in turn, an event per copy.

        pending = readback.start(tokens)        # right after sampling step k
        ... queue step k + 1 ...
        values = readback.read(pending, comm)    # step k's tokens as Python ints
    """

    def __init__(self, size: int, device: torch.device, dtype=torch.int64):
        self.cuda = device.type == "cuda"
        self._host = [torch.zeros(size, dtype=dtype, pin_memory=self.cuda) for _ in range(2)]
        self._turn = 0

    def start(self, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Start copying `tokens` (any shape of at most `size` elements) to the host."""
        self._turn ^= 1
        host = self._host[self._turn][:tokens.numel()].view(tokens.shape)
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
