"""Tensor-parallel mixture-of-experts weights, and the replicated router.

N = TP world size, r = this rank, E = experts, D = hidden size, I = expert intermediate size.

Every rank holds every expert, each split 1/N along I, as Megatron splits a dense MLP: the
gate and up projections (w1, w3) column-parallel, packed into one [E, 2I/N, D] parameter, and
the down projection (w2) row-parallel, [E, D, I/N]. An expert's output on rank r is then its
partial sum, and so is the weighted sum over the experts a token is routed to: the MoE block
ends, like a dense MLP, in one reduction of partial sums that the schedules fuse with the
residual add and the next norm. (Expert parallelism, each rank holding E/N whole experts, would
need an all-to-all of tokens instead; see docs/architecture.md.)

Checkpoints store one tensor per expert and projection; the family's packed-module table maps
`experts.<e>.w1` to shard id (e, 0), `experts.<e>.w3` to (e, 1) and `experts.<e>.w2` to
(e, None), and each loader reads only this rank's slice of that expert.
"""
from __future__ import annotations

import torch
from torch import nn

from weavelm.errors import check
from weavelm.kernels.common import FP8
from weavelm.parallel.fp8 import building_quantization, quantize_rows
from weavelm.parallel.layers import (
    TPLayer, check_whole, copy_checked, default_weight_loader, narrow,
)
from weavelm.parallel.state import divide


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class ReplicatedLinear(TPLayer):
    """Y = XA with A whole on every rank (the MoE router: every rank routes every token the
    same way). Its weight is marked `replicated` (random initialisers draw it once)."""

    def __init__(self, input_size: int, output_size: int, params_dtype=None, device=None):
        super().__init__(params_dtype, device)
        self.weight = _param((output_size, input_size), self.params_dtype, self.device)
        self.weight.weight_loader = default_weight_loader
        self.weight.replicated = True

    def forward(self, x):
        return torch.matmul(x, self.weight.t())                     # [T, out]


class _ExpertParallel(TPLayer):
    """E experts' slices of one projection, each expert split 1/N along I, as one `weight`
    [E, ...] loaded from the shard ids (e, p) for each part p of PARTS.

    With quantization="fp8" (`fp8.fp8_layers("fp8")`) `weight` holds float8_e4m3fn codes
    and `weight_scale` [E, rows] a float32 scale per row of each expert's shard, every shard
    quantized as it loads (the dense layers' scheme: a row-parallel shard's rows over its own
    columns)."""
    PARTS: tuple = ()

    def __init__(self, num_experts: int, intermediate_size: int, params_dtype, device):
        super().__init__(params_dtype, device)
        self.quantization = building_quantization()
        check(self.quantization in (None, "fp8"),
              "FP8 checkpoints of mixture-of-experts models do not load yet: load the model's "
              "bf16/fp16 original with quantization='fp8' (--quantization fp8), which "
              "quantizes its experts at load")
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.size_per_partition = divide(intermediate_size, self.tp_size)

    def _make_weight(self, *shape):
        """`weight` [E, *shape], loaded by this layer's weight_loader."""
        fp8 = self.quantization == "fp8"
        self.weight = _param((self.num_experts, *shape), FP8 if fp8 else self.params_dtype,
                             self.device)
        self.weight.weight_loader = self.weight_loader
        self.weight.shard_ids = tuple((e, p) for e in range(self.num_experts)
                                      for p in self.PARTS)
        scale = torch.ones(self.num_experts, shape[0], dtype=torch.float32,
                           device=self.device) if fp8 else None
        self.register_buffer("weight_scale", scale, persistent=False)
        if fp8:
            self.weight.store_rows = self._store_all   # fill_random: draw, then quantize

    def _store(self, expert: int, offset: int, shard, what: str) -> None:
        """A checkpoint shard into rows offset.. of expert's weight (quantized for FP8)."""
        dst = self.weight.data[expert].narrow(0, offset, shard.shape[0])
        if self.weight_scale is None:
            copy_checked(dst, shard, what)
            return
        if tuple(dst.shape) != tuple(shard.shape):
            raise ValueError(f"{what}: checkpoint shard has shape {tuple(shard.shape)}, model "
                             f"expects {tuple(dst.shape)}")
        codes, scale = quantize_rows(shard.to(self.weight.device))
        dst.copy_(codes)
        self.weight_scale[expert, offset:offset + shard.shape[0]].copy_(scale)

    def _store_all(self, offset: int, rows: torch.Tensor) -> None:
        """Every expert's full-precision shard at once ([E, rows, cols]), quantized."""
        for e in range(rows.shape[0]):
            self._store(e, offset, rows[e], f"expert {e}")


class MergedExpertColumnParallel(_ExpertParallel):
    """E experts' gate and up projections, each split along its output (I) dimension: rank r
    holds rows [r I/N, (r+1) I/N) of every expert's w1, then of its w3, as `weight`
    [E, 2I/N, D]. Loads from shard id (e, 0) (w1) and (e, 1) (w3)."""
    PARTS = (0, 1)

    def __init__(self, num_experts: int, input_size: int, intermediate_size: int,
                 params_dtype=None, device=None):
        super().__init__(num_experts, intermediate_size, params_dtype, device)
        self.input_size = input_size
        self._make_weight(2 * self.size_per_partition, input_size)

    def weight_loader(self, param, loaded, shard_id=None):
        expert, j = _expert_shard(shard_id, self.num_experts, self.PARTS)
        check_whole(loaded, (self.intermediate_size, self.input_size), f"expert {expert} w{j}")
        size = self.size_per_partition
        self._store(expert, j * size, narrow(loaded, 0, self.tp_rank * size, size),
                    f"expert {expert} shard")


class ExpertRowParallel(_ExpertParallel):
    """E experts' down projections, each split along its input (I) dimension: rank r holds
    columns [r I/N, (r+1) I/N) of every expert's w2 as `weight` [E, D, I/N]. Loads from shard
    id (e, None)."""
    PARTS = (None,)

    def __init__(self, num_experts: int, intermediate_size: int, output_size: int,
                 params_dtype=None, device=None):
        super().__init__(num_experts, intermediate_size, params_dtype, device)
        self.output_size = output_size
        self._make_weight(output_size, self.size_per_partition)

    def weight_loader(self, param, loaded, shard_id=None):
        expert, _ = _expert_shard(shard_id, self.num_experts, self.PARTS)
        check_whole(loaded, (self.output_size, self.intermediate_size), f"expert {expert} w2")
        size = self.size_per_partition
        self._store(expert, 0, narrow(loaded, 1, self.tp_rank * size, size),
                    f"expert {expert} shard")


def _expert_shard(shard_id, num_experts: int, parts: tuple):
    ok = (isinstance(shard_id, tuple) and len(shard_id) == 2
          and isinstance(shard_id[0], int) and shard_id[1] in parts)
    if not ok:
        raise ValueError(f"expert weight needs a shard id (expert, part), got {shard_id!r}")
    if not 0 <= shard_id[0] < num_experts:
        raise ValueError(f"expert index {shard_id[0]} is outside the model's {num_experts} "
                         f"experts")
    return shard_id
