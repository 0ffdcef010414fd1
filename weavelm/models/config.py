"""Model configuration read from a Hugging Face `config.json` (transformers 4.x or 5.x layout).

Only what the supported families need is kept; anything we cannot run exactly (an unknown RoPE
type, an unknown activation) is refused here with a clear error rather than run wrongly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from weavelm.errors import WeavelmError, check

# architecture name -> family flags. Mistral and Llama share one implementation (a registry
# entry, not a copy); Qwen2 adds q/k/v biases, Qwen3 adds per-head q/k RMSNorm.
ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": None, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True},
}
ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_scaling: dict = field(default_factory=dict)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        check(arch in ARCHITECTURES,
              f"unsupported architecture {arch!r}: weavelm runs {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[arch]
        act = cfg.get("hidden_act", "silu")
        check(act == "silu", f"unsupported activation {act!r} in config.json: weavelm runs silu")

        # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        check(rope_type in ROPE_TYPES,
              f"unsupported RoPE type {rope_type!r}: weavelm runs {', '.join(ROPE_TYPES)}")
        rope["rope_type"] = rope_type

        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        qkv_bias = family["qkv_bias"]
        if qkv_bias is None:
            qkv_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen"):
            # Qwen applies its window only to layers >= max_window_layers; not supported here.
            check(not cfg.get("use_sliding_window", False),
                  f"{arch} with use_sliding_window=true is not supported: weavelm runs Qwen "
                  f"models with full attention (use_sliding_window=false)")
            window = None
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, qk_norm=family["qk_norm"], sliding_window=window,
            rope_scaling=rope, eos_token_ids=eos, bos_token_id=cfg.get("bos_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    def valid_tp_degrees(self, limit: int = 64) -> list[int]:
        """TP degrees that split the heads, KV heads and MLP evenly."""
        return [tp for tp in range(1, limit + 1)
                if self.num_heads % tp == 0 and self.intermediate_size % tp == 0
                and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)]

    def check_tp(self, tp: int) -> None:
        if tp < 1 or tp not in self.valid_tp_degrees(max(tp, 64)):
            valid = ", ".join(map(str, self.valid_tp_degrees()))
            raise WeavelmError(
                f"TP={tp} cannot split this model ({self.num_heads} attention heads, "
                f"{self.num_kv_heads} KV heads, MLP {self.intermediate_size}): "
                f"use one of TP = {valid}")
