"""Megatron-style tensor-parallel layers for inference.

N = TP world size, r = this rank. Each layer allocates only its shard and hangs a
`weight_loader(param, loaded, shard_id=None)` on each parameter; that loader is the only code that
slices checkpoint tensors. `loaded` is a torch tensor or a lazily-read safetensors slice (anything
with `get_shape()` and `[...]` indexing), so a rank reads only the bytes of its own shard.
Layers that pack several checkpoint tensors into one parameter list the `shard_id`s it takes in
`shard_ids`; the loader checks that every one arrived.

Linear layers built inside `fp8.fp8_layers("fp8")` hold float8 (e4m3) weights and a float32
scale per output row of their shard (`weight_scale`, a buffer): the loaders quantize each shard
as it arrives, so no full-precision copy of the model is ever held (weavelm/parallel/fp8.py).

No layer communicates on its own: `RowParallelLinear` and `VocabParallelEmbedding` return this
rank's partial sums and the schedule reduces them (fused with residual add and RMSNorm); the LM
head gathers its logits through the communicator it is given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.parallel.communicator import Communicator
from weavelm.parallel.fp8 import (
    FP8, block_grid, building_quantization, check_codes, dequantize_blocks, fp8_linear,
    quantize_rows, store_block_scales, store_row_scales,
)
from weavelm.parallel.state import divide, get_state


# -- reading a shard out of a checkpoint tensor -------------------------------------------------
def loaded_shape(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """loaded[..., start:start+size, ...] along `dim`, read lazily from safetensors slices."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def check_whole(loaded, shape: tuple, what: str) -> None:
    """The checkpoint tensor as a whole must have the model's unsharded `shape` and a floating
    dtype: a slice that happens to fit is not enough (an oversized tensor would load silently)."""
    got = loaded_shape(loaded)
    if tuple(got) != tuple(shape):
        raise ValueError(f"{what}: checkpoint tensor has shape {tuple(got)}, the model's "
                         f"(unsharded) shape is {tuple(shape)}")
    if isinstance(loaded, torch.Tensor):
        floating, name = loaded.dtype.is_floating_point, str(loaded.dtype)
    else:
        name = str(loaded.get_dtype())
        floating = name.upper().startswith(("F", "BF"))
    if not floating:
        raise ValueError(f"{what}: checkpoint tensor has dtype {name}, weights must be floating "
                         f"point")


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, "
                         f"model expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Replicated parameters (norms): copy the whole tensor."""
    check_whole(loaded, param.shape, "replicated parameter")
    copy_checked(param.data, materialize(loaded), "replicated parameter")


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class TPLayer(nn.Module):
    """Base of a layer sharded over the TP group: knows this rank, the degree, dtype, device."""

    def __init__(self, params_dtype=None, device=None):
        super().__init__()
        state = get_state()
        self.tp_rank, self.tp_size = state.rank, state.world_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.device = device if device is not None else state.device


class _Linear(TPLayer):
    """A TP linear layer's weight: full precision, or FP8 codes with per-row scales.

    FP8 (`fp8.fp8_layers`): "fp8" quantizes a full-precision checkpoint's shards as they load;
    "fp8-channel" loads an FP8 checkpoint's codes and its per-row (or per-tensor) scales,
    `weight_scale`, as they are; "fp8-block" loads codes and 128 x 128 block scales,
    `weight_scale_inv`, and turns them into per-row codes and scales once all are loaded
    (`process_weights_after_loading`)."""

    def _make_weight(self, shape):
        self.quantization = building_quantization()
        fp8 = self.quantization is not None
        self.weight = _param(shape, FP8 if fp8 else self.params_dtype, self.device)
        self.weight.weight_loader = self.weight_loader
        if self.quantization == "fp8-channel":             # loaded from the checkpoint
            self.weight_scale = _param((shape[0],), torch.float32, self.device)
            self.weight_scale.weight_loader = self.weight_loader
        else:
            scale = torch.ones(shape[0], dtype=torch.float32, device=self.device) \
                if fp8 else None
            self.register_buffer("weight_scale", scale, persistent=False)
        if self.quantization == "fp8-block":
            self.weight_scale_inv = _param(block_grid(shape), torch.float32, self.device)
            self.weight_scale_inv.weight_loader = self.weight_loader
        if self.quantization == "fp8":
            self.weight.store_rows = self._store_rows     # fill_random: draw, then quantize

    def _store(self, param, offset: int, shard, what: str) -> None:
        """Copy a checkpoint shard into rows offset.. of `param`: quantized for an FP8 weight
        of a full-precision checkpoint, as it is (its dtype checked) for an FP8 checkpoint."""
        src = materialize(shard)
        dst = param.data.narrow(0, offset, src.shape[0]) if src.dim() else param.data
        if param is not self.weight or self.weight_scale is None:
            copy_checked(dst, src, what)
            return
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, "
                             f"model expects {tuple(dst.shape)}")
        if self.quantization == "fp8":
            self._store_rows(offset, src)
            return
        check_codes(src, what)
        dst.copy_(src)

    def _store_scales(self, param, rows: tuple[int, int, int, int], cols: tuple[int, int, int],
                      loaded, what: str) -> None:
        """A checkpoint scale tensor into this rank's part of `param`. rows = (checkpoint rows,
        this shard's offset in the layer, its size, its first checkpoint row); cols =
        (checkpoint columns, first column of this rank, columns of this rank)."""
        total, offset, size, start = rows
        if param is self.weight_scale:       # per row [total, 1] / [total], or per tensor
            store_row_scales(param.data[offset:offset + size], loaded, total, start, what)
        else:                                 # 128 x 128 blocks
            store_block_scales(param.data, loaded, rows, cols, what)

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """FP8 block scales -> per-row codes and scales (the one FP8 GEMM path)."""
        if self.quantization == "fp8-block":
            codes, scale = quantize_rows(dequantize_blocks(
                self.weight.data, self.weight_scale_inv.data.double()))    # exact products
            self.weight.data.copy_(codes)
            self.weight_scale.copy_(scale)
            del self.weight_scale_inv
            self.quantization = "fp8-channel"

    def _store_rows(self, offset: int, rows: torch.Tensor) -> None:
        codes, scale = quantize_rows(rows.to(self.weight.device))
        self.weight.data[offset:offset + rows.shape[0]].copy_(codes)
        self.weight_scale[offset:offset + rows.shape[0]].copy_(scale)

    def _matmul(self, x, bias=None, out=None):
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale, bias, out=out)
        if out is not None:
            y = torch.matmul(x, self.weight.t(), out=out)
            return y if bias is None else y.add_(bias)
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(_Linear):
    """Y = XA + b with A split along its second (output) dimension: rank r holds A[:, r-th block]
    and returns its [*, output_size / N] block of Y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype=None, device=None):
        super().__init__(params_dtype, device)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.tp_size)
        self._make_weight((self.output_size_per_partition, input_size))
        self.bias = None
        if bias:
            self.bias = _param((self.output_size_per_partition,), self.params_dtype, self.device)
            self.bias.weight_loader = self.weight_loader
        scales = [p for p in (self.weight_scale, getattr(self, "weight_scale_inv", None))
                  if isinstance(p, nn.Parameter)]          # an FP8 checkpoint's
        for p in (self.weight, self.bias, *scales):
            if p is not None and hasattr(self, "shard_ids"):
                p.shard_ids = self.shard_ids       # the packed shards the loader must see

    def _shard_rows(self, shard_id) -> tuple[int, int, int, int, str]:
        """(checkpoint rows, offset in this rank's weight, rows, first checkpoint row, name)
        of checkpoint tensor `shard_id`."""
        size = self.output_size_per_partition
        return self.output_size, 0, size, self.tp_rank * size, "column"

    def weight_loader(self, param, loaded, shard_id=None):
        total, offset, size, start, what = self._shard_rows(shard_id)
        if param is self.weight_scale or param is getattr(self, "weight_scale_inv", None):
            cols = (self.input_size, 0, self.input_size)
            self._store_scales(param, (total, offset, size, start), cols, loaded,
                               f"{what} scales")
            return
        check_whole(loaded, (total,) + tuple(param.shape[1:]), f"{what} projection")
        self._store(param, offset, narrow(loaded, 0, start, size), f"{what} shard")

    def forward(self, x):
        return self._matmul(x, self.bias)                           # [T, out/N]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input packed into one GEMM
    (gate_proj and up_proj -> gate_up_proj). Checkpoint tensor `i` loads with shard_id=i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype=None, device=None):
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias, params_dtype, device)

    def _shard_rows(self, shard_id):
        sizes = [divide(s, self.tp_size) for s in self.output_sizes]
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        return (self.output_sizes[shard_id], offset, size, self.tp_rank * size,
                f"merged {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed into one column-parallel GEMM, split by attention head.

    Query heads split evenly. KV heads split evenly when N <= kv_heads; when N > kv_heads each KV
    head is replicated on N / kv_heads consecutive ranks (grouped-query attention keeps working).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, params_dtype=None, device=None):
        tp = get_state().world_size
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, tp)
        if tp >= num_kv_heads:
            divide(tp, num_kv_heads)
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp), 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.shard_ids = ("q", "k", "v")
        total = (self.q_size + 2 * self.kv_size) * tp
        super().__init__(hidden_size, total, bias, params_dtype, device)

    def _shard_rows(self, shard_id):
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size = self.kv_size
            start = (self.tp_rank // self.kv_replicas) * self.kv_size
        return heads * self.head_dim, offset, size, start, f"qkv {shard_id}"


class RowParallelLinear(_Linear):
    """Y = XA + b with A split along its first (input) dimension: rank r holds A[r-th block, :]
    and takes X already split (the output of a ColumnParallelLinear).

    Returns this rank's partial sums X_r A_r (+ b on rank 0 only, so the sum over ranks is
    XA + b); the caller reduces them, fused with the residual add and the next RMSNorm.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype=None, device=None):
        super().__init__(params_dtype, device)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.tp_size)
        self._make_weight((output_size, self.input_size_per_partition))
        self.bias = None
        if bias:
            self.bias = _param((output_size,), self.params_dtype, self.device)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        size = self.input_size_per_partition
        if param is self.weight_scale or param is getattr(self, "weight_scale_inv", None):
            rows = (self.output_size, 0, self.output_size, 0)     # every row, whole
            cols = (self.input_size, self.tp_rank * size, size)
            self._store_scales(param, rows, cols, loaded, "row-parallel scales")
            return
        check_whole(loaded, (self.output_size, self.input_size), "row-parallel")
        self._store(param, 0, narrow(loaded, 1, self.tp_rank * size, size), "row shard")

    def forward(self, x, out: torch.Tensor | None = None):
        """x [T, in/N] -> partial sums [T, out]. `out` receives them (a communicator's staging
        buffer: the reduction needs no copy-in)."""
        bias = self.bias if self.tp_rank == 0 else None
        return self._matmul(x, bias, out=out)                       # [T, out] partial sums


class VocabParallelEmbedding(TPLayer):
    """Embedding table split along the vocabulary: rank r holds rows
    [r * V_pad / N, (r + 1) * V_pad / N) of the table padded to V_pad (a multiple of N).

    Each rank looks up the ids it owns and writes zeros for the others: the sum over ranks is the
    embedding, and the schedule reduces it (fused with the first layer's input norm).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype=None, device=None):
        super().__init__(params_dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = _param((self.num_embeddings_per_partition, embedding_dim),
                             self.params_dtype, self.device)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        rows = max(0, self.vocab_end - self.vocab_start)
        check_whole(loaded, (self.num_embeddings, self.embedding_dim), "vocabulary")
        param.data.zero_()
        if rows:
            copy_checked(param.data[:rows], narrow(loaded, 0, self.vocab_start, rows),
                         "vocabulary shard")

    def forward(self, ids):                                         # ids: [T]
        """This rank's partial embedding [T, D] (the full one at TP 1)."""
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(mask, 0, ids - self.vocab_start)
        y = F.embedding(local, self.weight)                         # [T, D]
        return y.masked_fill_(mask.unsqueeze(-1), 0)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split along the vocabulary like the embedding (and able to share
    its weight: tied embeddings). Returns full logits [B, V] on every rank."""

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden, comm: Communicator):                  # hidden: [B, D]
        logits = F.linear(hidden, self.weight)                      # [B, V_pad / N]
        logits = comm.all_gather_last_dim(logits)                   # [B, V_pad]
        return logits[..., : self.num_embeddings]                   # [B, V]
