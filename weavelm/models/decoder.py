"""What every family's model is made of, as the engine's schedules see it.

T = tokens in the step, D = hidden size, V = vocabulary.

A model is an embedding, a stack of `DecoderLayer`s and a final norm, and each layer is two
blocks, attention and MLP, that end in a row-parallel GEMM and so return *partial sums* on
each rank. Models never reduce them and know nothing of streams or communicators' buffers: the
schedules in `weavelm.engine.weave.executor` reduce every block's partial sums together with the
residual add and the next norm, in whatever order and on whatever stream they choose
(docs/architecture.md, "Schedules").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from weavelm.kernels.rmsnorm import rms_norm
from weavelm.models.attention import AttentionBatch, PagedKVCache
from weavelm.parallel.communicator import Communicator
from weavelm.parallel.layers import default_weight_loader


@dataclass
class StepInput:
    """What attention needs of a step besides the hidden states: each token's position, the KV
    cache and the step's pieces (which tokens belong to which sequence, and their cache slots)."""
    positions: torch.Tensor          # [T] int64
    cache: PagedKVCache
    batch: AttentionBatch

    def split(self, n_first: int) -> tuple["StepInput", "StepInput"]:
        """The step's first `n_first` tokens and the rest (a sequence may be cut in two)."""
        first, second = self.batch.split(n_first)
        return (StepInput(self.positions[:n_first], self.cache, first),
                StepInput(self.positions[n_first:], self.cache, second))


class RMSNorm(nn.Module):
    """Replicated RMSNorm weight; the schedules apply it fused with the residual add."""

    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer: attention and MLP blocks with the norms before them.

    `self_attn(x, step, out=None)` and `mlp(x, out=None)` must return partial sums (they end in
    a RowParallelLinear) and write them into `out` when given. Attribute names follow Hugging
    Face, so checkpoint names map one to one.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: RMSNorm,
                 post_attention_layernorm: RMSNorm):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def attention_block(self, x, step: StepInput, out=None):
        """x [T, D] (normed) -> partial sums [T, D]."""
        return self.self_attn(x, step, out=out)

    def mlp_block(self, x, out=None):
        """x [T, D] (normed) -> partial sums [T, D]."""
        return self.mlp(x, out=out)


class CausalLM(nn.Module):
    """Base of every family's `...ForCausalLM`: Hugging Face's layout (`model.embed_tokens`,
    `model.layers`, `model.norm`, `lm_head`) and the views of it the engine uses.

    Models have no `forward`: a schedule runs them (`weavelm.engine.weave.executor.Executor`).
    """

    config: "object"
    model: nn.Module
    lm_head: nn.Module

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> RMSNorm:
        return self.model.norm

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> this rank's partial embedding sums [T, D] (the schedule reduces them)."""
        return self.model.embed_tokens(ids)

    def compute_logits(self, hidden: torch.Tensor, comm: Communicator) -> torch.Tensor:
        """hidden [B, D] -> logits [B, V] (float32), identical on every rank."""
        return self.lm_head(hidden, comm).float()

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads on this rank, head dim): what one cached token holds per K and V."""
        attn = self.layers[0].self_attn
        return len(self.layers), attn.num_kv_heads, attn.head_dim

    def make_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A paged KV cache of `num_blocks` blocks of `block_size` tokens, this rank's KV heads."""
        layers, kv_heads, head_dim = self.kv_cache_shape()
        p = self.lm_head.weight
        return PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim, p.dtype,
                            p.device)
