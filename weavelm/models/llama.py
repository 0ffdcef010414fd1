"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm).

T = tokens in the step, D = hidden size, H / Hkv = query / KV heads on this rank, Dh = head dim,
I = intermediate size, V = vocabulary, B = sequences.

Classes and attribute names mirror Hugging Face's, so checkpoint names map one to one except for
the packed projections in `PACKED_MODULES`. The model composes TP layers only; every collective
goes through the communicator: each block leaves partial sums, and the schedule in
`weavelm.models.woven` reduces them, adds the residual and applies the *next* norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.kernels.rmsnorm import rms_norm
from weavelm.models.attention import AttentionBatch, KVCache, cached_attention
from weavelm.models.config import ModelConfig
from weavelm.models.rope import RotaryEmbedding
from weavelm.models.woven import Mode, StackRunner, WovenDecoderLayer
from weavelm.parallel.layers import (
    MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
    VocabParallelEmbedding, default_weight_loader,
)

# checkpoint module name -> (packed module, shard id)
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype, device):
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.qkv_bias,
                                          params_dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=False, reduce_results=False,
                                        params_dtype=dtype, device=device)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim, self.scale = cfg.head_dim, cfg.head_dim ** -0.5
        self.window = cfg.sliding_window
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)

    def forward(self, positions, x, cache: KVCache, batch: AttentionBatch, rotary, out=None):
        T = x.shape[0]
        qkv = self.qkv_proj(x)                                       # [T, (H + 2 Hkv) Dh]
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size,
                             self.qkv_proj.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)              # [T, H, Dh]
        k = k.reshape(T, self.num_kv_heads, self.head_dim)           # [T, Hkv, Dh]
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(k.shape)
        q, k = rotary(positions, q, k)
        o = cached_attention(q, k, v, cache, self.layer_idx, batch, self.scale, self.window)
        return self.o_proj(o.reshape(T, -1), out=out)                # [T, D] partial sums


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, params_dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size,
                                           reduce_results=False, params_dtype=dtype,
                                           device=device)

    def forward(self, x, out=None):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)            # [T, I/N] each
        return self.down_proj(F.silu(gate) * up, out=out)            # [T, D] partial sums


def llama_decoder_layer(cfg: ModelConfig, layer_idx: int, dtype, device) -> WovenDecoderLayer:
    return WovenDecoderLayer(
        self_attn=LlamaAttention(cfg, layer_idx, dtype, device),
        mlp=LlamaMLP(cfg, dtype, device),
        input_layernorm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device),
        post_attention_layernorm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device, max_positions: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                   params_dtype=dtype, device=device)
        self.layers = nn.ModuleList([llama_decoder_layer(cfg, i, dtype, device)
                                     for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                      cfg.rope_scaling, device=device)
        self.runner = StackRunner(self.layers, self.norm)

    def forward(self, ids, positions, cache, batch, mode: Mode = Mode.BASELINE,
                split: int | None = None):
        h = self.embed_tokens(ids, reduce=False)   # [T, D] partial sums: the runner reduces
        return self.runner.run(mode, h, positions, cache, batch, self.rotary, split)


class LlamaForCausalLM(nn.Module):
    packed_modules = PACKED_MODULES

    def __init__(self, cfg: ModelConfig, dtype=torch.float32, device="cpu",
                 max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, dtype, device, max_positions or cfg.max_position_embeddings)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, params_dtype=dtype,
                                      device=device)
        if cfg.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(self, ids, positions, cache: KVCache, batch: AttentionBatch,
                mode: Mode = Mode.BASELINE, split: int | None = None):
        """ids, positions: [T] -> final hidden states [T, D] (final-normed, on every rank).
        `mode` and `split` choose the schedule (see weavelm.models.woven)."""
        return self.model(ids, positions, cache, batch, Mode(mode), split)

    def make_kv_cache(self, slots: int, positions: int) -> KVCache:
        """A KV cache for `slots` sequences of up to `positions` tokens, this rank's KV heads."""
        attn = self.model.layers[0].self_attn
        p = self.lm_head.weight
        return KVCache(self.config.num_layers, slots, positions, attn.num_kv_heads,
                       attn.head_dim, p.dtype, p.device)

    def compute_logits(self, hidden):
        """hidden [B, D] -> logits [B, V] (float32), identical on every rank."""
        return self.lm_head(hidden).float()
