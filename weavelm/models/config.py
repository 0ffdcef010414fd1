"""Model configuration read from a Hugging Face `config.json` (transformers 4.x or 5.x layout).

Only what the supported families need is kept; anything we cannot run exactly (an unknown RoPE
type, an unknown activation) is refused here with a clear error rather than run wrongly. What
differs between families (fixed flags, extra checks) comes from their registry entry
(`weavelm.models.registry`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from weavelm.errors import WeavelmError, check
from weavelm.models.registry import family_for
from weavelm.parallel.fp8 import checkpoint_format, checkpoint_kv_scales

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
    # Mixture of experts (set by an MoE family's config hook; 0 experts: a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0       # each expert's intermediate size
    norm_topk_prob: bool = True          # renormalise the top-k routing weights
    moe_layers: list[int] = field(default_factory=list)   # layers whose MLP is the experts
    # An FP8 checkpoint's layer format (weavelm.parallel.fp8.checkpoint_format); None: not
    # quantized
    quantization: str | None = None
    # the checkpoint has a K and a V scale per layer for an FP8 KV cache (kv_cache_scheme)
    kv_cache_scales: bool = False

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """`source` names the file in errors (a config.json path, or a GGUF file)."""
        check(isinstance(cfg, dict), f"{source} must hold a JSON object of settings, got a "
                                     f"{type(cfg).__name__}: re-download the model")
        _check_shape_fields(cfg, source)
        archs = cfg.get("architectures") or []
        family = family_for(archs[0] if archs else None)
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
        eos = cfg.get("eos_token_id")
        fields = dict(
            architecture=family.architecture, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window"), rope_scaling=rope,
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            quantization=checkpoint_format(cfg, source),
            kv_cache_scales=checkpoint_kv_scales(cfg, source))
        fields.update(family.config_flags)
        if family.config_hook is not None:
            family.config_hook(cfg, fields)
        return cls(**fields)

    def valid_tp_degrees(self, limit: int = 64) -> list[int]:
        """TP degrees that split the heads, KV heads and MLP evenly."""
        return [tp for tp in range(1, limit + 1)
                if self.num_heads % tp == 0 and self.intermediate_size % tp == 0
                and self.moe_intermediate_size % tp == 0
                and (self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0)]

    def layer_gemms(self, tp: int) -> list:
        """The per-rank GEMMs of one decoder layer at TP `tp` (the family's `layer_gemms`): what
        the weave's splitter models."""
        return family_for(self.architecture).layer_gemms(self, tp)

    def check_tp(self, tp: int) -> None:
        if tp < 1 or tp not in self.valid_tp_degrees(max(tp, 64)):
            valid = ", ".join(map(str, self.valid_tp_degrees()))
            raise WeavelmError(
                f"TP={tp} cannot split this model ({self.num_heads} attention heads, "
                f"{self.num_kv_heads} KV heads, MLP {self.intermediate_size}"
                f"{self._experts_note()}): "
                f"use one of TP = {valid}")

    def _experts_note(self) -> str:
        return f", experts {self.moe_intermediate_size}" if self.num_experts else ""


MAX_POSITIONS = 1 << 24        # 16 M positions: past every published context length
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_OPTIONAL = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_shape_fields(cfg: dict, source: str) -> None:
    """Every size a positive integer, and the heads consistent, each error naming field and
    file (rather than a traceback deep in the model's constructor)."""
    def positive_int(name, value):
        check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
              f"{source}: {name} must be a positive integer, got {value!r}")

    for name in _REQUIRED:
        check(name in cfg, f"{source} has no {name}: re-download or re-convert the model")
        positive_int(name, cfg[name])
    for name in _OPTIONAL:
        if cfg.get(name) is not None:
            positive_int(name, cfg[name])
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
        cfg["num_attention_heads"]
    check(heads % kv == 0, f"{source}: num_attention_heads ({heads}) is not a multiple of "
                           f"num_key_value_heads ({kv})")
    check(cfg.get("head_dim") is not None or cfg["hidden_size"] % heads == 0,
          f"{source}: hidden_size ({cfg['hidden_size']}) is not divisible by "
          f"num_attention_heads ({heads}) and no head_dim is given")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    check(head_dim % 2 == 0, f"{source}: head_dim {head_dim} is odd: rotary embeddings rotate "
                             f"pairs of features, so it must be even")
    longest = cfg.get("max_position_embeddings") or 0
    check(longest <= MAX_POSITIONS, f"{source}: max_position_embeddings {longest:,} is past "
                                    f"{MAX_POSITIONS:,}, more than any model is trained for: "
                                    f"fix config.json")
    eps = cfg.get("rms_norm_eps", 1e-6)
    check(isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1,
          f"{source}: rms_norm_eps must be a small positive number, got {eps!r}")
