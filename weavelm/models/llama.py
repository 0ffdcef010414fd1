"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm).

T = tokens in the step, D = hidden size, H / Hkv = query / KV heads on this rank, Dh = head dim,
I = intermediate size, V = vocabulary.

Classes and attribute names mirror Hugging Face's, so checkpoint names map one to one except for
the packed projections in `PACKED_MODULES`. The model composes TP layers only: each block
returns partial sums, and a schedule (`weavelm.weave.executor`) reduces them, adds the residual
and applies the *next* norm. The four architectures share this implementation: they are four
registry entries at the bottom of this file.
"""
from __future__ import annotations

import torch
from torch import nn

from weavelm.errors import check
from weavelm.kernels.activation import silu_and_mul
from weavelm.models.attention import rotary_attention
from weavelm.models.config import ModelConfig
from weavelm.models.decoder import WovenDecoder, WovenDecoderLayer, RMSNorm, StepInput
from weavelm.models.registry import GemmShape, ModelFamily, register_family
from weavelm.models.rope import RotaryEmbedding
from weavelm.parallel.fp8 import gate_up_silu_rounded, load_kv_scale
from weavelm.parallel.layers import (
    MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
    VocabParallelEmbedding,
)
from weavelm.parallel.pipeline import MissingModule, building_stage

# checkpoint module name -> (packed module, shard id)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    """`layer_idx`: the layer's index in the KV cache (its stage's own layers only)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, dtype, device):
        super().__init__()
        self.layer_idx = layer_idx
        self.rotary = rotary                  # shared by every layer (non-persistent tables)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.qkv_bias,
                                          params_dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=False, params_dtype=dtype, device=device)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim, self.scale = cfg.head_dim, cfg.head_dim ** -0.5
        self.window = cfg.sliding_window
        self.k_scale = self.v_scale = None     # a checkpoint's FP8 KV-cache scales
        if cfg.kv_cache_scales:
            for name in ("k_scale", "v_scale"):
                p = nn.Parameter(torch.ones((), dtype=torch.float32, device=device),
                                 requires_grad=False)
                p.weight_loader = load_kv_scale
                setattr(self, name, p)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)

    @property
    def fp8_input(self):
        """The FP8 projection that is x's only reader, or None: the norm before this block may
        hand x over rounded to FP8 (`parallel.fp8.add_rms_norm_rounded`)."""
        return self.qkv_proj if self.qkv_proj.weight_scale is not None else None

    def forward(self, x, step: StepInput, out=None):
        qkv = self.qkv_proj(x)                                       # [T, (H + 2 Hkv) Dh]
        T = qkv.shape[0]
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size,
                             self.qkv_proj.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)              # [T, H, Dh]
        k = k.reshape(T, self.num_kv_heads, self.head_dim)           # [T, Hkv, Dh]
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(k.shape)
        o = rotary_attention(q, k, v, self.rotary, step.positions, step.cache, self.layer_idx,
                             step.batch, self.scale, self.window)
        return self.o_proj(o.reshape(T, -1), out=out)                # [T, D] partial sums


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, params_dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size,
                                           params_dtype=dtype, device=device)

    @property
    def fp8_input(self):
        """As `LlamaAttention.fp8_input`: gate_up, x's only reader, when it is FP8."""
        return self.gate_up_proj if self.gate_up_proj.weight_scale is not None else None

    def forward(self, x, out=None):
        if self.down_proj.weight_scale is not None:    # it takes silu(gate) * up rounded to FP8
            h = gate_up_silu_rounded(x, self.gate_up_proj)           # [T, I/N]
        else:
            h = silu_and_mul(self.gate_up_proj(x))                  # [T, 2I/N] -> [T, I/N]
        return self.down_proj(h, out=out)                            # [T, D] partial sums


class LlamaModel(nn.Module):
    """`make_mlp(cfg, layer_idx, dtype, device)` builds each layer's MLP block (a family with
    mixture-of-experts layers passes its own). On a pipeline stage only its layers are built
    (`parallel/pipeline.py`); the embedding on the first stage (and on the last when the LM
    head shares it), the final norm on the last."""

    def __init__(self, cfg: ModelConfig, dtype, device, max_positions: int, make_mlp=None):
        super().__init__()
        make_mlp = make_mlp or (lambda cfg, i, dtype, device: LlamaMLP(cfg, dtype, device))
        mine, first, last = building_stage(cfg.num_layers)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                   params_dtype=dtype, device=device) \
            if first or (last and cfg.tie_word_embeddings) else MissingModule()
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                      cfg.rope_scaling, device=device)
        self.layers = nn.ModuleList([
            WovenDecoderLayer(
                self_attn=LlamaAttention(cfg, i - mine.start, self.rotary, dtype, device),
                mlp=make_mlp(cfg, i, dtype, device),
                input_layernorm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device),
                post_attention_layernorm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype,
                                                 device))
            if i in mine else MissingModule() for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device) if last \
            else MissingModule()


class LlamaForCausalLM(WovenDecoder):
    make_mlp = None              # LlamaModel's dense MLP; subclasses may build other blocks

    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device="cpu",
                 max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, dtype, device, max_positions or cfg.max_position_embeddings,
                                self.make_mlp)
        last = building_stage(cfg.num_layers)[2]
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, params_dtype=dtype,
                                      device=device) if last else MissingModule()
        if cfg.tie_word_embeddings and last:
            self.lm_head.tie(self.model.embed_tokens)


def layer_gemms(cfg: ModelConfig, tp: int) -> list[GemmShape]:
    """The per-rank GEMMs of one decoder layer at TP degree `tp` (KV heads replicated when tp
    exceeds their number, as QKVParallelLinear does)."""
    q_heads, kv_heads = cfg.num_heads // tp, max(cfg.num_kv_heads // tp, 1)
    return [GemmShape((q_heads + 2 * kv_heads) * cfg.head_dim, cfg.hidden_size, "qkv"),
            GemmShape(cfg.hidden_size, q_heads * cfg.head_dim, "o"),
            GemmShape(2 * cfg.intermediate_size // tp, cfg.hidden_size, "gate_up"),
            GemmShape(cfg.hidden_size, cfg.intermediate_size // tp, "down")]


def _qwen_window(hf: dict, fields: dict) -> None:
    """Qwen applies its window only to layers >= max_window_layers, which weavelm does not run:
    refuse a config that turns it on, and ignore the (then unused) window otherwise."""
    check(not hf.get("use_sliding_window", False),
          f"{fields['architecture']} with use_sliding_window=true is not supported: weavelm runs "
          f"Qwen models with full attention (use_sliding_window=false)")
    fields["sliding_window"] = None


# GGUF per-block tensor names (after `blk.N.`) -> Hugging Face names (after `model.layers.N.`).
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_COMMON = dict(model_class=LlamaForCausalLM, layer_gemms=layer_gemms,
               packed_modules=PACKED_MODULES, gguf_block_names=GGUF_BLOCK_NAMES)
# llama.cpp writes Mistral models as "llama" GGUFs: they load as LlamaForCausalLM.
register_family(ModelFamily("LlamaForCausalLM", **_COMMON, gguf_architecture="llama",
                            gguf_permute_qk=True))
register_family(ModelFamily("MistralForCausalLM", **_COMMON))
register_family(ModelFamily("Qwen2ForCausalLM", **_COMMON, config_flags={"qkv_bias": True},
                            config_hook=_qwen_window, gguf_architecture="qwen2"))
register_family(ModelFamily("Qwen3ForCausalLM", **_COMMON, config_flags={"qk_norm": True},
                            config_hook=_qwen_window, gguf_architecture="qwen3"))
