"""`EngineConfig`: every option of an engine in one typed object (vLLM's `EngineArgs` is the
anchor), checked once where it is built, and sent to every rank as it is.

    config = EngineConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct", tp=2, max_num_seqs=64)
    engine = LLMEngine.from_config(config)          # or LLM(**same keywords)

The CLI, `LLM(...)` keywords and `weavelm serve` all build one; a bad value fails at
construction with one line naming the option and the fix. What depends on the model (the TP
degree against its heads, `max_model_len` against its context) is checked by `for_model` once
the model's config is known; `prompt_refusal` is the one "the prompt fits the context" check.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from weavelm.engine.block_manager import BLOCK_SIZE
from weavelm.errors import check

DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
BACKENDS = ("auto", "torch", "p2p", "multimem")
MODES = ("auto", "baseline", "fused", "weave", "nocomm")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class EngineConfig:
    model: str | None = None              # HF directory, repo id or .gguf; None: the default
    tp: int | None = None                 # None: the launcher's world size / pp, else 1
    pp: int = 1                           # pipeline stages (each of tp ranks)
    device: str | None = None             # cpu, cuda, cuda:N; None: cuda if present
    dtype: object = None                  # a name of DTYPES or a torch.dtype; None: bf16 / fp32
    quantization: str | None = None       # "fp8": FP8 weights quantized at load (vLLM's name)
    kv_cache_dtype: str = "auto"          # "fp8": K and V stored in e4m3 (vLLM's name)
    max_model_len: int | None = None      # None: the model's context (set by `for_model`)
    allow_pickle: bool = False
    backend: str | None = None            # communicator; None: auto on GPUs, torch on CPU
    mode: str = "auto"                    # schedule: auto, baseline, fused, weave, nocomm
    gpu_memory_utilization: float = 0.90  # share of GPU memory for weights, activations, KV
    max_num_seqs: int = 256               # sequences in flight; the largest decode graph
    max_num_batched_tokens: int = 8192    # tokens in one step
    enforce_eager: bool = False           # no CUDA graphs for decode
    num_kv_blocks: int | None = None      # fixes the KV cache's size instead of measuring it
    block_size: int = BLOCK_SIZE          # tokens per KV block
    enable_prefix_caching: bool = True    # reuse the KV blocks of prompts' shared prefixes
    seed: int = 0                         # the engine's generator: requests without a seed
    collective_timeout: float | None = None   # seconds a rank waits for its peers

    def __post_init__(self):
        check(self.tp is None or _positive_int(self.tp), f"tp must be at least 1, got {self.tp!r}")
        check(_positive_int(self.pp), f"pp must be at least 1, got {self.pp!r}")
        check(self.dtype is None or self.dtype in DTYPES
              or str(self.dtype) in ("torch.float32", "torch.bfloat16", "torch.float16"),
              f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        from weavelm.parallel.fp8 import check_method
        check_method(self.quantization)
        from weavelm.models.kv_cache import check_kv_cache_dtype
        check_kv_cache_dtype(self.kv_cache_dtype)
        check(self.max_model_len is None or _positive_int(self.max_model_len),
              f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        check(self.backend in (None, *BACKENDS),
              f"unknown backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        check(self.mode in MODES or type(self.mode).__name__ == "Mode",
              f"unknown mode {self.mode!r}: choose auto, baseline, fused or weave")
        g = self.gpu_memory_utilization
        check(isinstance(g, (int, float)) and not isinstance(g, bool) and 0 < g <= 1,
              f"gpu_memory_utilization must be in (0, 1], got {g!r}")
        check(_positive_int(self.max_num_seqs),
              f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        check(_positive_int(self.max_num_batched_tokens),
              f"max_num_batched_tokens must be a positive integer, got "
              f"{self.max_num_batched_tokens!r}")
        check(_positive_int(self.block_size),
              f"block_size must be a positive integer, got {self.block_size!r}")
        check(self.num_kv_blocks is None or (_positive_int(self.num_kv_blocks)
                                             and self.num_kv_blocks >= 2),
              f"num_kv_blocks={self.num_kv_blocks!r}: the cache needs at least 2 blocks (one "
              f"is scratch)")
        for name in ("allow_pickle", "enforce_eager", "enable_prefix_caching"):
            check(isinstance(getattr(self, name), bool),
                  f"{name} must be True or False, got {getattr(self, name)!r}")
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool)
              and 0 <= self.seed < 2**63, f"seed must be an integer in [0, 2**63), got "
                                          f"{self.seed!r}")
        if self.collective_timeout is not None:
            from weavelm.parallel.state import collective_timeout
            collective_timeout("cpu", self.collective_timeout)     # its one-line check

    @classmethod
    def from_keywords(cls, **options) -> "EngineConfig":
        """An EngineConfig from `LLM(...)`-style keywords; an unknown one is named."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        check(not unknown, f"unknown LLM option {unknown[0] if unknown else ''!r}: the options "
                           f"are {', '.join(sorted(known))}")
        return cls(**options)

    def for_model(self, model_config) -> "EngineConfig":
        """This config with `max_model_len` set from the model's context (checked against it)
        and the TP degree checked against the model's heads."""
        if self.tp is not None:
            model_config.check_tp(self.tp)
        check(self.pp <= model_config.num_layers,
              f"pp={self.pp} pipeline stages need at least {self.pp} decoder layers; this model "
              f"has {model_config.num_layers}: lower --pp")
        limit = model_config.max_position_embeddings
        check(self.max_model_len is None or self.max_model_len <= limit,
              f"max_model_len={self.max_model_len} is outside this model's context "
              f"(1..{limit}): lower it")
        return dataclasses.replace(self, max_model_len=self.max_model_len or limit)


def prompt_refusal(num_tokens: int, max_model_len: int) -> str | None:
    """Why a prompt of `num_tokens` tokens cannot run in a context of `max_model_len`, or None
    (at least one token must be left to generate)."""
    if num_tokens == 0:
        return "the prompt is empty: give at least one token"
    if num_tokens >= max_model_len:
        return (f"the prompt has {num_tokens} tokens but the context holds {max_model_len}: "
                f"shorten the prompt")
    return None


def check_prompt(num_tokens: int, max_model_len: int) -> None:
    """`prompt_refusal` as a WeavelmError."""
    reason = prompt_refusal(num_tokens, max_model_len)
    check(reason is None, reason or "")


def ids_refusal(prompt_token_ids, vocab: int | None) -> str | None:
    """Why `prompt_token_ids` is not a list of token ids of a vocabulary of `vocab`, or None."""
    import numpy as np
    ids = np.asarray(prompt_token_ids) if isinstance(prompt_token_ids, (list, tuple)) else None
    if ids is None or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        return f"a prompt must be a list of int token ids, got {prompt_token_ids!r:.80}"
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        return (f"token id {bad} is outside this model's vocabulary (0..{vocab - 1}): the "
                f"tokenizer and model disagree")
    return None
