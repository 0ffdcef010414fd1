"""The communicator interface and its reference backend, `torch`.

T = tokens, D = hidden size, N = TP world size.

Every collective a TP model needs goes through one small interface, so that the fused backends
(`p2p`, `multimem`) can replace the unfused reference without touching model code:

* `all_reduce(x)`                                   sum over ranks, [T, D] -> [T, D]
* `reduce_scatter(x)`                               [T, D] -> this rank's rows [rows(T), D]
* `all_gather(x_rows, T)`                           [rows(T), D] -> [T, D]
* `all_gather_last_dim(x)`                          [B, V/N] -> [B, V] (the LM head's logits)
* `reduce_scatter_add_rms_norm_all_gather(...)`     the TokenWeave reordering: each rank adds and
                                                     normalises only its own rows (sequence-sharded
                                                     residual), then everyone gets all rows.

Rows are split among ranks in contiguous, balanced blocks: rank r owns `row_range(T, r, N)`;
T need not divide by N.

The fused backends (`fused_communicator.py`) can do more than this interface: take a GEMM's
output in place (`staging`) and keep two halves of a batch in flight (`reserve_slots`). Those
abilities are the `FusedCollective` protocol below; schedules test for it with `isinstance`.
Backends are created by name in `backends.py`; a communicator is passed to whatever uses it
(there is no process-wide one).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from weavelm.kernels.rmsnorm import fused_add_rms_norm
from weavelm.parallel.state import ParallelState


def row_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the rows `rank` owns when `n_rows` are split in balanced contiguous blocks."""
    base, extra = divmod(n_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Communicator:
    """Collectives over the TP group. Subclasses override what they can do faster."""

    name = "abstract"

    def __init__(self, state: ParallelState):
        self.state = state
        self.rank = state.rank
        self.world_size = state.world_size

    # -- unfused building blocks -------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, x_rows: torch.Tensor, n_rows: int) -> torch.Tensor:
        raise NotImplementedError

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        raise NotImplementedError

    # -- the TokenWeave op (the default composes the building blocks) ------------------------
    def reduce_scatter_add_rms_norm_all_gather(self, x, residual_rows, weight, eps, ctas=None,
                                               slot: int = 0):
        """TokenWeave's reordering of all-reduce -> residual add -> RMSNorm.

        x: [T, D] partial sums; residual_rows: [rows(T), D] this rank's rows, updated in place.
        Returns the normalised [T, D] on every rank. `slot` names an independent staging region
        for backends that return views of one (two halves in flight); `ctas` sizes fused
        kernels. The composed reference ignores both.
        """
        n_rows = x.shape[0]
        rows = self.reduce_scatter(x)                                          # [rows(T), D]
        normed_rows, _ = fused_add_rms_norm(rows, residual_rows, weight, eps, inplace_residual=True)
        return self.all_gather(normed_rows, n_rows)                            # [T, D]


@runtime_checkable
class FusedCollective(Protocol):
    """What a fused backend adds to `Communicator` (p2p and multimem have it, torch has not).

    * `ctas`: CTAs its fused kernel launches with by default (the SMs it takes from GEMMs);
    * `staging(T, D, dtype, slot)`: a [T, D] view of its symmetric buffer for a GEMM to write its
      partial sums into, so the reduction needs no copy-in; `slot` picks one of several
      independent regions (two halves of the weave in flight);
    * `reserve_slots(T, D, dtype, slots)`: size the buffer for `slots` such regions (collective;
      before any CUDA-graph capture).
    """

    ctas: int

    def staging(self, n_tokens: int, hidden: int, dtype: torch.dtype | None = None,
                slot: int = 0) -> torch.Tensor: ...

    def reserve_slots(self, n_tokens: int, hidden: int, dtype: torch.dtype,
                      slots: int = 2) -> None: ...


# torch 2.13 renamed all_gather_into_tensor (which now warns); older releases only have the old.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchCommunicator(Communicator):
    """torch.distributed collectives (NCCL on GPU, gloo on CPU): the unfused reference."""

    name = "torch"

    def all_reduce(self, x):
        if self.world_size > 1:
            dist.all_reduce(x, group=self.state.group)
        return x

    def _padded_rows(self, n_rows: int) -> int:
        return -(-n_rows // self.world_size)

    def reduce_scatter(self, x):
        if self.world_size == 1:
            return x
        n_rows, per_rank = x.shape[0], self._padded_rows(x.shape[0])
        padded = x.new_zeros((per_rank * self.world_size,) + tuple(x.shape[1:]))
        # Each rank's balanced block goes to the front of its padded slot.
        for r in range(self.world_size):
            s, e = row_range(n_rows, r, self.world_size)
            padded[r * per_rank: r * per_rank + (e - s)] = x[s:e]
        out = x.new_empty((per_rank,) + tuple(x.shape[1:]))
        if x.device.type == "cpu":   # gloo has no reduce_scatter: all-reduce, keep our rows
            dist.all_reduce(padded, group=self.state.group)
            out.copy_(padded[self.rank * per_rank:(self.rank + 1) * per_rank])
        else:
            dist.reduce_scatter_tensor(out, padded, group=self.state.group)
        s, e = row_range(n_rows, self.rank, self.world_size)
        return out[: e - s]

    def all_gather(self, x_rows, n_rows):
        if self.world_size == 1:
            return x_rows
        per_rank = self._padded_rows(n_rows)
        padded = x_rows.new_zeros((per_rank,) + tuple(x_rows.shape[1:]))
        padded[: x_rows.shape[0]] = x_rows
        gathered = x_rows.new_empty((per_rank * self.world_size,) + tuple(x_rows.shape[1:]))
        _all_gather_single(gathered, padded, group=self.state.group)
        pieces = []
        for r in range(self.world_size):
            s, e = row_range(n_rows, r, self.world_size)
            pieces.append(gathered[r * per_rank: r * per_rank + (e - s)])
        return torch.cat(pieces, dim=0)

    def all_gather_last_dim(self, x):
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.state.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x, src=0):
        """x from TP rank `src` of this stage on every rank of the stage."""
        if self.world_size > 1:
            dist.broadcast(x, src=self.state.tp_src(src), group=self.state.group)
        return x
