"""The schedules that run a model's decoder stack: how each block's partial sums are reduced.

T = tokens in the step, D = hidden size, N = TP ranks, rows(T) = this rank's share of T rows.

A decoder layer is two blocks, attention and MLP, each ending in a row-parallel GEMM that leaves
partial sums (`weavelm.models.decoder`); the modes differ in how those are reduced:

* `baseline`  torch.distributed all-reduce (NCCL; gloo on CPU), then fused residual-add + RMSNorm
              on all T rows (what vLLM does), whatever the executor's communicator.
* `fused`     one fused reduce-scatter + residual + RMSNorm + all-gather: each rank adds and
              normalises only its own rows, so the residual stream is sequence-sharded.
* `weave`     the batch is split into halves A and B; each half takes the fused path, and each
              half's communication runs on a high-priority side stream while the other half
              computes (events, no host syncs):

                  compute stream      comm stream
                  attn(A)             ...
                  attn(B)             reduce+norm(A, post-attention)
                  mlp(A)              reduce+norm(B, post-attention)
                  mlp(B)              reduce+norm(A, post-MLP -> next layer's input norm)
                  attn(A), next       reduce+norm(B, post-MLP -> next layer's input norm)

              Attention stays exact for a sequence cut by the split: A's attention writes its
              K/V into the cache before B's attention reads them (same compute stream, A first).
* `nocomm`    baseline with every all-reduce removed. Wrong output; for analysis only: it is the
              bound that hiding communication can reach.

The stack starts from the vocabulary-parallel embedding's *partial sums*. baseline all-reduces
them; fused and weave reduce them with the same fused op as every block, with a zero residual
and the first layer's input norm (each rank keeps its rows of the sum as its residual shard),
and the weave hides half B's embedding reduction behind half A's first attention block. The
final model norm is the "next norm" of the last layer's MLP reduction. So neither costs an
extra collective or a separate norm.

A pipeline stage (`weavelm.parallel.pipeline`) runs the same schedules over its own layers.
A stage after the first starts from the residual stream the stage before it sent (`hidden`,
reduced already: no embedding, no reduction; each rank takes its rows as its residual shard);
a stage before the last ends with its residual stream (`last_stage=False`): the last block's
partial sums reduced and added, no norm, all rows on every rank.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from weavelm.errors import WeavelmError
from weavelm.kernels.rmsnorm import fused_add_rms_norm
from weavelm.parallel import fp8
from weavelm.parallel.communicator import (
    Communicator, FusedCollective, TorchCommunicator, row_range,
)
from weavelm.parallel.sm_carveout import gemm_sm_carveout

# CTAs of the fused kernel while the other half computes: the weave's GEMMs leave that many SMs
# free (gemm_sm_carveout), so few enough that the GEMMs keep most of the GPU, yet enough to move
# the half's rows in the time the other half computes. The value was chosen by measurement
# (benchmarks/HISTORY.md, round 3); the prefill it gives is in benchmarks/RESULTS.md.
WEAVE_CTAS = 8


class Mode(str, enum.Enum):
    BASELINE = "baseline"
    FUSED = "fused"
    WEAVE = "weave"
    NOCOMM = "nocomm"


def parse_mode(mode) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise WeavelmError(f"unknown mode {mode!r}: choose one of "
                           f"{', '.join(m.value for m in Mode)}") from None


@dataclass
class ScheduleConfig:
    """Settings of the weave (benchmarks and tuning vary them).

    weave_ctas: CTAs of the fused kernel while the other half computes (few: the GEMMs keep
    the rest of the GPU). sm_carveout: SMs the weave's GEMMs leave to it; "auto" = one per CTA
    (a persistent GEMM CTA cannot share an SM with it), 0 = none.
    """
    weave_ctas: int = WEAVE_CTAS
    sm_carveout: int | str = "auto"


class Step(Protocol):
    """What a step carries for attention besides the hidden states (the models' `StepInput`:
    positions, KV cache, pieces); the weave only cuts it in two."""

    def split(self, n_first: int) -> tuple["Step", "Step"]: ...


class Stack(Protocol):
    """A decoder stack as the executor runs it (`weavelm.models.decoder.WovenDecoder`): the
    embedding's partial sums, layers with their two blocks and norms, the final norm."""

    layers: Sequence
    final_norm: object

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...


class _Half:
    """One half of the batch in the fused/weave schedules: its tokens and residual rows."""

    def __init__(self, x, residual_rows, step: Step, slot=0):
        self.x, self.residual_rows, self.step = x, residual_rows, step
        self.slot = slot          # the communicator's staging region for this half
        self.ready = None         # CUDA event: x is valid


def _record(t: torch.Tensor, stream) -> None:
    """Tell the caching allocator that `stream` uses `t` (views of symmetric memory, which the
    allocator does not own, need nothing)."""
    try:
        t.record_stream(stream)
    except RuntimeError:
        pass


class Executor:
    """Runs one model's decoder stack in any mode; owns the weave's side stream.

    `comm` serves fused and weave; baseline always all-reduces through torch.distributed, so a
    run's baseline is the same unfused reference whichever backend `comm` is.
    """

    def __init__(self, model: Stack, comm: Communicator, config: ScheduleConfig | None = None):
        self.model, self.comm = model, comm
        self.torch_comm = comm if isinstance(comm, TorchCommunicator) else \
            TorchCommunicator(comm.state)
        self.layers, self.final_norm = model.layers, model.final_norm
        self.config = config or ScheduleConfig()
        self._comm_stream = None

    def run(self, ids, step: Step, mode: Mode = Mode.BASELINE, split: int | None = None,
            hidden: torch.Tensor | None = None, last_stage: bool = True) -> torch.Tensor:
        """ids [T] -> final-normed hidden states [T, D], identical on every rank.

        Pipeline stages: `hidden` [T, D] (the previous stage's residual stream) replaces the
        embedding of `ids`; `last_stage=False` returns this stage's residual stream [T, D]
        instead of the final-normed states."""
        mode = parse_mode(mode)
        self._from_stage, self._last_stage = hidden is not None, last_stage
        h = self.model.embed(ids) if hidden is None else hidden    # [T, D]
        if mode in (Mode.BASELINE, Mode.NOCOMM):
            return self._run_replicated(h, step, reduce=mode is Mode.BASELINE)
        if mode is Mode.FUSED or split is None or not 0 < split < h.shape[0]:
            return self._run_fused(h, step)
        return self._run_weave(h, step, split)

    def _ends_stage(self, i: int, block: str) -> bool:
        """Layer i's `block` is the last of a stage that hands its residual stream on."""
        return not self._last_stage and i == len(self.layers) - 1 and block == "mlp"

    def _stage_end(self, half: "_Half", partial) -> torch.Tensor:
        """The half's residual stream after its last block: reduce-scatter the partial sums,
        add them to the residual shard, gather all rows (no norm: the next stage has it)."""
        half.residual_rows += self.torch_comm.reduce_scatter(partial)
        return self.torch_comm.all_gather(half.residual_rows, partial.shape[0])

    def _norm_after(self, i: int, block: str):
        """The norm that follows layer i's `block` ("attn" or "mlp")."""
        if block == "attn":
            return self.layers[i].post_attention_layernorm
        return self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.final_norm

    def _add_norm(self, i: int, block: str, partial, residual):
        """(x, residual) for the block after layer i's `block`: the residual add and its norm,
        the output rounded to FP8 in the same kernel where that block's only reader of x is an
        FP8 projection that would round it separately (`fp8.NORM_ROUNDS`)."""
        norm = self._norm_after(i, block)
        if fp8.NORM_ROUNDS:
            nxt = self.layers[i].mlp if block == "attn" else (
                self.layers[i + 1].self_attn if i + 1 < len(self.layers) else None)
            lin = getattr(nxt, "fp8_input", None)
            if lin is not None and fp8.rounds_separately(partial, lin.weight):
                return fp8.add_rms_norm_rounded(partial, residual, norm.weight, norm.eps)
        return fused_add_rms_norm(partial, residual, norm.weight, norm.eps)

    def _blocks(self):
        """(layer index, block name) in execution order."""
        return [(i, block) for i in range(len(self.layers)) for block in ("attn", "mlp")]

    def _block(self, i: int, block: str, x, step: Step, out=None):
        layer = self.layers[i]
        return layer.attention_block(x, step, out) if block == "attn" else layer.mlp_block(x, out)

    # -- baseline and nocomm: all rows, replicated residual ---------------------------------
    def _run_replicated(self, h, step: Step, reduce: bool):
        if reduce and not self._from_stage:
            h = self.torch_comm.all_reduce(h)
        residual = h.clone()                                             # [T, D]
        x = self.layers[0].input_layernorm(h)
        for i, block in self._blocks():
            partial = self._block(i, block, x, step)
            if reduce:
                partial = self.torch_comm.all_reduce(partial)
            if self._ends_stage(i, block):
                return residual.add_(partial)
            x, residual = self._add_norm(i, block, partial, residual)
        return x                                                         # [T, D]

    # -- fused and weave: sequence-sharded residual -----------------------------------------
    def _start_half(self, h, step: Step, slot=0) -> _Half:
        """A half whose residual shard starts at zero: its first reduction (of the embedding's
        partial sums `h`, see `_embed`) makes the shard the embedding rows. From a previous
        stage's residual stream (reduced already): the shard is this rank's rows of it and the
        input is its first layer's norm, no reduction."""
        lo, hi = row_range(h.shape[0], self.comm.rank, self.comm.world_size)
        if self._from_stage:
            return _Half(self.layers[0].input_layernorm(h), h[lo:hi].clone(), step, slot)
        return _Half(h, h.new_zeros(hi - lo, h.shape[1]), step, slot)

    def _embed(self, half: _Half, ctas=None):
        """Reduce the half's embedding partial sums, add them to its zero residual shard and
        apply the first layer's input norm: one fused op, like every block's reduction."""
        self._reduce(half, half.x, self.layers[0].input_layernorm, ctas)

    def _block_partials(self, half: _Half, i: int, block: str):
        """Run a block for a half; a fused backend's GEMM writes straight into the half's
        staging slot (no copy before the fused kernel)."""
        out = None
        if isinstance(self.comm, FusedCollective) and half.x.is_cuda:
            out = self.comm.staging(half.x.shape[0], half.x.shape[1], half.x.dtype,
                                    slot=half.slot)
        return self._block(i, block, half.x, half.step, out)

    def _reduce(self, half: _Half, partial, norm, ctas=None):
        half.x = self.comm.reduce_scatter_add_rms_norm_all_gather(
            partial, half.residual_rows, norm.weight, norm.eps, ctas=ctas, slot=half.slot)

    def _reserve(self, rows: int, h, slots: int) -> None:
        if isinstance(self.comm, FusedCollective):    # one staging region per half in flight
            self.comm.reserve_slots(rows, h.shape[1], h.dtype, slots=slots)

    def _run_fused(self, h, step: Step):
        half = self._start_half(h, step)
        self._reserve(h.shape[0], h, slots=1)
        if not self._from_stage:
            self._embed(half)
        for i, block in self._blocks():
            partial = self._block_partials(half, i, block)
            if self._ends_stage(i, block):
                return self._stage_end(half, partial)
            self._reduce(half, partial, self._norm_after(i, block))
        return half.x.clone()           # fused backends return a view of their staging buffer

    def _run_weave(self, h, step: Step, split: int):
        step_a, step_b = step.split(split)
        a = self._start_half(h[:split], step_a, slot=0)
        b = self._start_half(h[split:], step_b, slot=1)
        self._reserve(max(split, h.shape[0] - split), h, slots=2)
        if not h.is_cuda:
            # Same order of operations without streams: CPU runs (and tests) follow the schedule.
            for half in (a, b) if not self._from_stage else ():
                self._embed(half)
            for i, block in self._blocks():
                for half in (a, b):
                    partial = self._block_partials(half, i, block)
                    if self._ends_stage(i, block):
                        half.x = self._stage_end(half, partial)
                    else:
                        self._reduce(half, partial, self._norm_after(i, block))
            return torch.cat([a.x, b.x])
        with gemm_sm_carveout(self._carveout()):
            return self._weave_cuda(a, b)

    def _side_stream(self, device):
        if self._comm_stream is None:
            low, high = torch.cuda.Stream.priority_range()
            self._comm_stream = torch.cuda.Stream(device=device, priority=high)
        return self._comm_stream

    def _carveout(self) -> int:
        if self.config.sm_carveout != "auto":
            return int(self.config.sm_carveout)
        # Only the fused kernels have a known CTA count; NCCL picks its own.
        return self.config.weave_ctas if isinstance(self.comm, FusedCollective) else 0

    def _weave_cuda(self, a: _Half, b: _Half):
        compute = torch.cuda.current_stream()
        side = self._side_stream(a.x.device)
        ctas = self.config.weave_ctas
        for half in (a, b):
            _record(half.residual_rows, side)
        # The embedding's reductions: A's has nothing to hide behind (the standalone-best CTA
        # count, None), B's hides behind A's first attention block.
        embedded = torch.cuda.Event()
        embedded.record(compute)
        for half, half_ctas in ((a, None), (b, ctas)) if not self._from_stage else ():
            _record(half.x, side)
            with torch.cuda.stream(side):
                side.wait_event(embedded)
                self._embed(half, half_ctas)
                half.ready = torch.cuda.Event()
                half.ready.record(side)
            _record(half.x, compute)
        for half in (a, b) if self._from_stage else ():   # its input is normed already
            half.ready = embedded
        last = (len(self.layers) - 1, "mlp")
        for i, block in self._blocks():
            for half in (a, b):
                # the very last reduction has nothing left to hide behind: the communicator's
                # default (standalone-best) CTA count
                half_ctas = None if ((i, block) == last and half is b) else ctas
                compute.wait_event(half.ready)
                partial = self._block_partials(half, i, block)              # compute stream
                if self._ends_stage(i, block):      # on the compute stream: nothing follows
                    half.x = self._stage_end(half, partial)
                    half.ready = None
                    continue
                produced = torch.cuda.Event()
                produced.record(compute)
                _record(partial, side)
                with torch.cuda.stream(side):
                    side.wait_event(produced)
                    self._reduce(half, partial, self._norm_after(i, block), half_ctas)
                    half.ready = torch.cuda.Event()
                    half.ready.record(side)
                _record(half.x, compute)
        for half in (a, b):
            if half.ready is not None:
                compute.wait_event(half.ready)
        return torch.cat([a.x, b.x])
