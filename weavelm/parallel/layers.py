"""Megatron-style tensor-parallel layers for inference.

N = TP world size, r = this rank. Each layer allocates only its shard and hangs a
`weight_loader(param, loaded, shard_id=None)` on each parameter; that loader is the only code that
slices checkpoint tensors. `loaded` is a torch tensor or a lazily-read safetensors slice (anything
with `get_shape()` and `[...]` indexing), so a rank reads only the bytes of its own shard.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weavelm.parallel.communicator import get_communicator
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


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, "
                         f"model expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Replicated parameters (norms): copy the whole tensor."""
    copy_checked(param.data, materialize(loaded), "replicated parameter")


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class _TPLayer(nn.Module):
    def __init__(self, params_dtype=None, device=None):
        super().__init__()
        state = get_state()
        self.tp_rank, self.tp_size = state.rank, state.world_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.device = device if device is not None else state.device


class ColumnParallelLinear(_TPLayer):
    """Y = XA + b with A split along its second (output) dimension: rank r holds A[:, r-th block].

    With `gather_output` every rank returns the full Y, otherwise its [*, output_size / N] block.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 gather_output: bool = False, params_dtype=None, device=None):
        super().__init__(params_dtype, device)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.tp_size)
        self.gather_output = gather_output
        self.weight = _param((self.output_size_per_partition, input_size), self.params_dtype,
                             self.device)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _param((self.output_size_per_partition,), self.params_dtype, self.device)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        size = param.shape[0]
        copy_checked(param.data, narrow(loaded, 0, self.tp_rank * size, size), "column shard")

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                     # [T, out/N]
        if self.gather_output and self.tp_size > 1:
            y = get_communicator().all_gather_last_dim(y)           # [T, out]
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input packed into one GEMM
    (gate_proj and up_proj -> gate_up_proj). Checkpoint tensor `i` loads with shard_id=i."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype=None, device=None):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, False, params_dtype, device)

    def weight_loader(self, param, loaded, shard_id=None):
        sizes = [divide(s, self.tp_size) for s in self.output_sizes]
        offset, size = sum(sizes[:shard_id]), sizes[shard_id]
        copy_checked(param.data.narrow(0, offset, size),
                     narrow(loaded, 0, self.tp_rank * size, size), f"merged shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed into one column-parallel GEMM, split by attention head.

    Query heads split evenly. KV heads split evenly when N <= kv_heads; when N > kv_heads each KV
    head is replicated on N / kv_heads consecutive ranks (grouped-query attention keeps working).
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, params_dtype=None, device=None):
        tp = get_state().world_size
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp)
        if tp >= num_kv_heads:
            divide(tp, num_kv_heads)
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(num_kv_heads, tp), 1
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        total = (self.q_size + 2 * self.kv_size) * tp
        super().__init__(hidden_size, total, bias, False, params_dtype, device)

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size = self.kv_size
            start = (self.tp_rank // self.kv_replicas) * self.kv_size
        copy_checked(param.data.narrow(0, offset, size), narrow(loaded, 0, start, size),
                     f"qkv shard {shard_id}")


class RowParallelLinear(_TPLayer):
    """Y = XA + b with A split along its first (input) dimension: rank r holds A[r-th block, :].

    With `input_is_parallel` X arrives already split (the output of a ColumnParallelLinear).
    With `reduce_results` the partial products are summed over ranks; without, the caller
    reduces (a fused communicator does the reduction together with residual add and norm) and the
    bias is added on rank 0 only, so the sum over ranks is still XA + b.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 input_is_parallel: bool = True, reduce_results: bool = True,
                 params_dtype=None, device=None):
        super().__init__(params_dtype, device)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.tp_size)
        self.input_is_parallel, self.reduce_results = input_is_parallel, reduce_results
        self.weight = _param((output_size, self.input_size_per_partition), self.params_dtype,
                             self.device)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _param((output_size,), self.params_dtype, self.device)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        size = param.shape[1]
        copy_checked(param.data, narrow(loaded, 1, self.tp_rank * size, size), "row shard")

    def forward(self, x, out: torch.Tensor | None = None):
        """`out` receives the partial sums (a communicator's staging buffer: no copy-in)."""
        if not self.input_is_parallel and self.tp_size > 1:
            size = self.input_size_per_partition
            x = x.narrow(-1, self.tp_rank * size, size)
        add_bias_here = self.bias is not None and (self.reduce_results or self.tp_rank == 0)
        if out is not None and not self.reduce_results:
            y = torch.matmul(x, self.weight.t(), out=out)           # [T, out] partial sums
            if add_bias_here:
                y.add_(self.bias)
            return y
        y = F.linear(x, self.weight)                                # [T, out] partial sums
        if self.reduce_results:
            y = get_communicator().all_reduce(y)
        if add_bias_here:
            y = y + self.bias
        return y


class VocabParallelEmbedding(_TPLayer):
    """Embedding table split along the vocabulary: rank r holds rows
    [r * V_pad / N, (r + 1) * V_pad / N) of the table padded to V_pad (a multiple of N).

    Each rank looks up the ids it owns, writes zeros for the others, and the results are summed.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype=None, device=None,
                 reduce_results: bool = True):
        super().__init__(params_dtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.reduce_results = reduce_results
        self.weight = _param((self.num_embeddings_per_partition, embedding_dim),
                             self.params_dtype, self.device)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        rows = max(0, self.vocab_end - self.vocab_start)
        shape = loaded_shape(loaded)
        if shape[0] != self.num_embeddings:
            raise ValueError(f"vocabulary shard: checkpoint has {shape[0]} rows, model expects "
                             f"{self.num_embeddings}")
        param.data.zero_()
        if rows:
            copy_checked(param.data[:rows], narrow(loaded, 0, self.vocab_start, rows),
                         "vocabulary shard")

    def forward(self, ids, reduce: bool | None = None):             # ids: [T]
        """`reduce=False` leaves this rank's partial embedding (the `nocomm` analysis mode)."""
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        mask = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(mask, 0, ids - self.vocab_start)
        y = F.embedding(local, self.weight)                         # [T, D]
        y.masked_fill_(mask.unsqueeze(-1), 0)
        if self.reduce_results if reduce is None else reduce:
            y = get_communicator().all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split along the vocabulary like the embedding (and able to share
    its weight: tied embeddings). Returns full logits [B, V] on every rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype=None, device=None):
        super().__init__(num_embeddings, embedding_dim, params_dtype, device)

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden):                                      # hidden: [B, D]
        logits = F.linear(hidden, self.weight)                      # [B, V_pad / N]
        logits = get_communicator().all_gather_last_dim(logits)     # [B, V_pad]
        return logits[..., : self.num_embeddings]                   # [B, V]
