"""The library face of the weave: `WovenDecoderLayer` and `WovenDecoder`, what every registered
family is built from and what a user composes a tensor-parallel model of (Megatron-core's
`TransformerLayer` is the anchor).

B = sequences, T = tokens in the step, D = hidden size, V = vocabulary.

A model is an embedding that returns partial sums (`VocabParallelEmbedding`), a stack of
`WovenDecoderLayer`s and a final norm; each layer is two blocks, attention and MLP, that end in
a `RowParallelLinear` and so return *partial sums* on each rank. Blocks never reduce them and
know nothing of streams or communicators' buffers: the executor (`weavelm.weave.executor`)
reduces every block's partial sums together with the residual add and the next norm, in the
mode asked for (baseline / fused / weave / nocomm), in whatever order and on whatever stream it
chooses; the stack gives it the cross-layer part of the weave (half B's reduction hidden behind
half A's next block). The engine runs the same modules through the same executor.

    model = MyModel(...)                        # a WovenDecoder subclass (examples/)
    load_weights(model, "path/to/hf-checkpoint", packed_modules=...)   # each rank its shard
    logits = model(input_ids)                   # [B, T, V], like a Hugging Face forward
    logits = model(input_ids, mode="weave", split=7)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from weavelm.errors import check
from weavelm.kernels.rmsnorm import rms_norm
from weavelm.models.attention import (
    AttentionBatch, PagedKVCache, cached_attention, prefill_batch,
)
from weavelm.parallel.communicator import Communicator
from weavelm.parallel.layers import default_weight_loader
from weavelm.parallel.pipeline import MissingModule
from weavelm.weave.executor import Executor, Mode, parse_mode

FORWARD_BLOCK_SIZE = 16      # KV block size of the cache a forward() call builds for itself


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

    def attend(self, q, k, v, layer: int, scale: float, window: int | None = None):
        """Causal attention of this step's tokens, for an attention block of one's own:
        q [T, H, Dh], k/v [T, Hkv, Dh] (this rank's heads, rotated already if the model rotates)
        -> [T, H, Dh]. Writes k and v into layer `layer` of the cache first, so a sequence cut
        by the weave (or continued over steps) sees all its earlier keys."""
        return cached_attention(q, k, v, self.cache, layer, self.batch, scale, window)


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


class WovenDecoderLayer(nn.Module):
    """A pre-norm decoder layer whose two reductions the weave schedules.

    `self_attn(x, step)` and `mlp(x)` are any modules that end in a `RowParallelLinear` and
    return its partial sums [T, D]; `input_layernorm` and `post_attention_layernorm` are the
    norms before them (`RMSNorm`: the executor applies them fused with the residual add and the
    reduction). A block whose forward also takes `out=` gets the communicator's staging buffer
    there (pass it to the RowParallelLinear: its GEMM then writes where the fused kernel reads,
    no copy). `step` is a `StepInput`: positions, and `step.attend(q, k, v, layer, scale)` for
    causal attention over the KV cache. Attribute names follow Hugging Face, so checkpoint names
    map one to one.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self._attn_out = _takes_out(self_attn)
        self._mlp_out = _takes_out(mlp)

    def attention_block(self, x, step: StepInput, out=None):
        """x [T, D] (normed) -> partial sums [T, D]."""
        if self._attn_out:
            return self.self_attn(x, step, out=out)
        return self.self_attn(x, step)

    def mlp_block(self, x, out=None):
        """x [T, D] (normed) -> partial sums [T, D]."""
        return self.mlp(x, out=out) if self._mlp_out else self.mlp(x)


def _takes_out(module: nn.Module) -> bool:
    return "out" in inspect.signature(module.forward).parameters


class WovenDecoder(nn.Module):
    """A tensor-parallel decoder-only model the weave runs: Hugging Face's layout
    (`model.embed_tokens`: a `VocabParallelEmbedding`, `model.layers`: `WovenDecoderLayer`s,
    `model.norm`, `lm_head`: a `ParallelLMHead`) and the views of it the executor and the
    engine use. Every registered family's `...ForCausalLM` is one; so is a model of one's own
    (set those four attributes, or override `embed`, `layers`, `final_norm`,
    `compute_logits`).

    `model(input_ids, positions=None)` runs a prefill and returns the logits of every position,
    as a Hugging Face model does; the engine drives the same modules step by step.
    """

    config: "object"
    model: nn.Module
    lm_head: nn.Module

    @property
    def layers(self):
        """The decoder layers this rank runs: all of them, or a pipeline stage's range (the
        others are `MissingModule`s in `model.layers`, which keeps checkpoint indices)."""
        layers = self.model.layers
        if not any(isinstance(m, MissingModule) for m in layers):
            return layers
        return [m for m in layers if not isinstance(m, MissingModule)]

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @property
    def holds_lm_head(self) -> bool:
        """Whether this rank computes logits (every rank but those of earlier pipeline stages)."""
        return not isinstance(self.lm_head, MissingModule)

    def missing_prefixes(self) -> list[str]:
        """Parameter-name prefixes of the modules other pipeline stages hold: the loader skips
        checkpoint tensors under them."""
        return [name + "." for name, m in self.named_modules() if isinstance(m, MissingModule)]

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of activations (and of a full-precision KV cache)."""
        return self._anchor().dtype

    def _anchor(self) -> torch.Tensor:
        return self.lm_head.weight if self.holds_lm_head else \
            self.layers[0].input_layernorm.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> this rank's partial embedding sums [T, D] (the executor reduces them)."""
        return self.model.embed_tokens(ids)

    def compute_logits(self, hidden: torch.Tensor, comm: Communicator) -> torch.Tensor:
        """hidden [B, D] -> logits [B, V] (float32), identical on every rank."""
        return self.lm_head(hidden, comm).float()

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads on this rank, head dim): what one cached token holds per K and V
        (read from the first layer's attention: `num_kv_heads`, `head_dim`)."""
        attn = self.layers[0].self_attn
        return len(self.layers), attn.num_kv_heads, attn.head_dim

    def make_kv_cache(self, num_blocks: int, block_size: int, dtype=None) -> PagedKVCache:
        """A paged KV cache of `num_blocks` blocks of `block_size` tokens, this rank's KV heads,
        in `dtype` (default the model's; float8_e4m3fn: an FP8 cache)."""
        layers, kv_heads, head_dim = self.kv_cache_shape()
        p = self._anchor()
        cache = PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim,
                             dtype or p.dtype, p.device)
        if cache.fp8:          # a checkpoint's per-layer scales (else 1.0)
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                if getattr(attn, "k_scale", None) is not None:
                    cache.k_scale[i], cache.v_scale[i] = float(attn.k_scale), \
                        float(attn.v_scale)
        return cache

    # -- the library face: a prefill through the executor ---------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, positions: torch.Tensor | None = None, *,
                mode: str | Mode = "baseline", split: int | None = None,
                comm: Communicator | None = None) -> torch.Tensor:
        """input_ids [B, T] (or [T]: one sequence; or a list of token-id lists of any lengths)
        -> logits [B, T, V] (or [T, V]; or [sum of lengths, V]), float32, the same on every
        rank.

        `mode`: baseline (all-reduce, then add + RMSNorm), fused (the fused reduce-scatter +
        residual + RMSNorm + all-gather kernel), weave (the step's tokens cut in two after
        `split`, default the middle; each half's reduction hidden behind the other half's
        compute on GPUs) or nocomm (no reduction: wrong output, the bound). `positions`:
        each token's position (default 0, 1, ... per sequence). `comm`: the communicator
        (default: one over the current TP group, `weavelm.parallel.make_communicator`)."""
        device = self.lm_head.weight.device
        if isinstance(input_ids, (list, tuple)):
            seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in input_ids]
            shape = None
        else:
            check(input_ids.dim() in (1, 2) and input_ids.shape[-1] > 0,
                  f"input_ids must be [batch, tokens] or [tokens], got "
                  f"{tuple(input_ids.shape)}")
            seqs = list(input_ids.view(-1, input_ids.shape[-1]))
            shape = tuple(input_ids.shape)
        check(len(seqs) > 0 and all(len(s) > 0 for s in seqs), "input_ids holds no tokens")
        lengths = [len(s) for s in seqs]
        batch, default_positions, num_blocks = prefill_batch(lengths, FORWARD_BLOCK_SIZE, device)
        if positions is None:
            positions = default_positions
        check(positions.numel() == sum(lengths), f"positions must give one position per token "
                                                 f"({sum(lengths)}), got {positions.numel()}")
        step = StepInput(positions.reshape(-1).to(device),
                         self.make_kv_cache(num_blocks, FORWARD_BLOCK_SIZE), batch)
        mode = parse_mode(mode)
        if mode is Mode.WEAVE and split is None:
            split = sum(lengths) // 2
        executor = self.executor(comm)
        hidden = executor.run(torch.cat(seqs).to(device), step, mode, split)       # [T, D]
        logits = self.compute_logits(hidden, executor.comm)                        # [T, V]
        return logits if shape is None else logits.view(*shape, -1)

    def executor(self, comm: Communicator | None = None) -> Executor:
        """The executor of this stack over `comm` (kept: it owns the weave's side stream)."""
        if comm is None:
            from weavelm.parallel.backends import make_communicator
            from weavelm.parallel.state import get_state
            cached = self.__dict__.get("_default_comm")
            if cached is None:
                cached = self.__dict__["_default_comm"] = make_communicator(None, get_state())
            comm = cached
        executors = self.__dict__.setdefault("_executors", {})
        if id(comm) not in executors:
            executors[id(comm)] = Executor(self, comm)
        return executors[id(comm)]
