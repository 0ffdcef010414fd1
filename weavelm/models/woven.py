"""WovenDecoderLayer and the schedules that run a stack of them: the heart of TokenWeave.

T = tokens in the step, D = hidden size, N = TP ranks, rows(T) = this rank's share of T rows.

A decoder layer is two blocks, attention and MLP, each ending in a row-parallel GEMM that leaves
partial sums; what differs between modes is how those partial sums are reduced:

* `baseline`  all-reduce, then fused residual-add + RMSNorm on all T rows (what vLLM does).
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

The stack takes the vocabulary-parallel embedding's *partial sums* (this rank's rows of the
table, zeros elsewhere). baseline all-reduces them; fused and weave reduce them with the same
fused op as every block, with a zero residual and the first layer's input norm as its norm (each
rank keeps its rows of the sum as its residual shard), and the weave hides half B's embedding
reduction behind half A's first attention block. The final model norm is the "next norm" of the
last layer's MLP reduction. So neither costs an extra collective or a separate norm.
"""
from __future__ import annotations

import enum

import torch
from torch import nn

from weavelm.kernels.rmsnorm import fused_add_rms_norm
from weavelm.parallel.communicator import get_communicator, row_range
from weavelm.parallel.sm_carveout import gemm_sm_carveout


# CTAs of the fused kernel while the other half computes. 8 was the best of 4/8/16 at every
# size from 1K to 16K tokens under CUDA graphs on 4xH100 (benchmarks/RESULTS.md, round 3); the
# weave's GEMMs leave that many SMs free (gemm_sm_carveout).
WEAVE_CTAS = 8


class Mode(str, enum.Enum):
    BASELINE = "baseline"
    FUSED = "fused"
    WEAVE = "weave"
    NOCOMM = "nocomm"


def parse_mode(mode) -> Mode:
    from weavelm.errors import WeavelmError
    try:
        return Mode(mode)
    except ValueError:
        raise WeavelmError(f"unknown mode {mode!r}: choose one of "
                           f"{', '.join(m.value for m in Mode)}") from None


class WovenDecoderLayer(nn.Module):
    """A pre-norm decoder layer of any family: `self_attn` and `mlp` return partial sums.

    `self_attn(positions, x, cache, batch, rotary)` and `mlp(x)` must end in a RowParallelLinear
    with reduce_results=False; the schedule reduces. Attribute names follow Hugging Face.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, input_layernorm: nn.Module,
                 post_attention_layernorm: nn.Module):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp


class _Half:
    """One half of the batch in the fused/weave schedules: its tokens and residual rows."""

    def __init__(self, x, residual_rows, positions, batch, slot=0):
        self.x, self.residual_rows = x, residual_rows
        self.positions, self.batch = positions, batch
        self.slot = slot          # the communicator's staging region for this half
        self.ready = None         # CUDA event: x is valid


def _record(t: torch.Tensor, stream) -> None:
    """Tell the caching allocator that `stream` uses `t` (views of symmetric memory, which the
    allocator does not own, need nothing)."""
    try:
        t.record_stream(stream)
    except RuntimeError:
        pass


class StackRunner:
    """Runs a stack of WovenDecoderLayers in one of the modes. Owns the side stream."""

    def __init__(self, layers: nn.ModuleList, final_norm: nn.Module):
        self.layers, self.final_norm = layers, final_norm
        self._comm_stream = None
        # CTAs for the fused kernel while the other half computes (few: the GEMMs keep the
        # rest of the GPU); None = WEAVE_CTAS. Set by benchmarks and tuning.
        self.weave_ctas: int | None = None
        # SMs the weave's GEMMs leave to the communication kernel: "auto" = one per CTA of the
        # fused kernel (a persistent GEMM CTA cannot share an SM with it), 0 = none.
        self.weave_sm_carveout: int | str = "auto"

    def _norm_after(self, i: int, block: str):
        """The norm that follows layer i's `block` ("attn" or "mlp")."""
        if block == "attn":
            return self.layers[i].post_attention_layernorm
        return self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.final_norm

    # -- baseline and nocomm: all rows, replicated residual ---------------------------------
    def run_replicated(self, h, positions, cache, batch, rotary, reduce: bool):
        comm = get_communicator()
        if reduce:
            h = comm.all_reduce(h)                   # the embedding's partial sums
        residual = h.clone()                                             # [T, D]
        x = self.layers[0].input_layernorm(h)
        for i, layer in enumerate(self.layers):
            for block in ("attn", "mlp"):
                if block == "attn":
                    partial = layer.self_attn(positions, x, cache, batch, rotary)
                else:
                    partial = layer.mlp(x)
                if reduce:
                    partial = comm.all_reduce(partial)
                norm = self._norm_after(i, block)
                x, residual = fused_add_rms_norm(partial, residual, norm.weight, norm.eps)
        return x                                                         # [T, D]

    # -- fused and weave: sequence-sharded residual -----------------------------------------
    def _start_half(self, h, positions, batch, slot=0) -> _Half:
        """A half whose residual shard starts at zero: its first reduction (of the embedding's
        partial sums `h`, see `_embed`) makes the shard the embedding rows."""
        comm = get_communicator()
        lo, hi = row_range(h.shape[0], comm.rank, comm.world_size)
        return _Half(h, h.new_zeros(hi - lo, h.shape[1]), positions, batch, slot)

    def _embed(self, half: _Half, ctas=None):
        """Reduce the half's embedding partial sums, add them to its zero residual shard and
        apply the first layer's input norm: one fused op, like every block's reduction."""
        self._reduce(half, half.x, self.layers[0].input_layernorm, ctas)

    def _block(self, half: _Half, i: int, block: str, cache, rotary):
        """Run a block; its row-parallel GEMM writes straight into the communicator's staging
        slot for this half when the backend has one (no copy before the fused kernel)."""
        layer = self.layers[i]
        comm = get_communicator()
        out = None
        if hasattr(comm, "staging") and half.x.is_cuda:
            out = comm.staging(half.x.shape[0], half.x.shape[1], half.x.dtype, slot=half.slot)
        if block == "attn":
            return layer.self_attn(half.positions, half.x, cache, half.batch, rotary, out=out)
        return layer.mlp(half.x, out=out)

    def _reduce(self, half: _Half, partial, norm, ctas=None):
        half.x = get_communicator().reduce_scatter_add_rms_norm_all_gather(
            partial, half.residual_rows, norm.weight, norm.eps, ctas=ctas, slot=half.slot)

    def run_fused(self, h, positions, cache, batch, rotary):
        half = self._start_half(h, positions, batch)
        comm = get_communicator()
        if hasattr(comm, "reserve_slots"):
            comm.reserve_slots(h.shape[0], h.shape[1], h.dtype, slots=1)
        self._embed(half)
        for i in range(len(self.layers)):
            for block in ("attn", "mlp"):
                self._reduce(half, self._block(half, i, block, cache, rotary),
                             self._norm_after(i, block))
        return half.x.clone()           # fused backends return a view of their staging buffer

    def run_weave(self, h, positions, cache, batch, rotary, split: int):
        batch_a, batch_b = batch.split(split)
        a = self._start_half(h[:split], positions[:split], batch_a, slot=0)
        b = self._start_half(h[split:], positions[split:], batch_b, slot=1)
        comm = get_communicator()
        if hasattr(comm, "reserve_slots"):       # fused backends: one staging region per half
            comm.reserve_slots(max(split, h.shape[0] - split), h.shape[1], h.dtype, slots=2)
        if not h.is_cuda:
            # Same order of operations without streams: CPU runs (and tests) follow the schedule.
            for half in (a, b):
                self._embed(half)
            for i in range(len(self.layers)):
                for block in ("attn", "mlp"):
                    for half in (a, b):
                        self._reduce(half, self._block(half, i, block, cache, rotary),
                                     self._norm_after(i, block))
            return torch.cat([a.x, b.x])
        return self._run_weave_cuda(a, b, cache, rotary)

    def _side_stream(self, device):
        if self._comm_stream is None:
            low, high = torch.cuda.Stream.priority_range()
            self._comm_stream = torch.cuda.Stream(device=device, priority=high)
        return self._comm_stream

    def _carveout(self) -> int:
        comm = get_communicator()
        if self.weave_sm_carveout != "auto":
            return int(self.weave_sm_carveout)
        # Only the fused kernels have a known CTA count; NCCL picks its own.
        return (self.weave_ctas or WEAVE_CTAS) if hasattr(comm, "ctas") else 0

    def _run_weave_cuda(self, a: _Half, b: _Half, cache, rotary):
        with gemm_sm_carveout(self._carveout()):
            return self._weave_cuda_schedule(a, b, cache, rotary)

    def _weave_cuda_schedule(self, a: _Half, b: _Half, cache, rotary):
        compute = torch.cuda.current_stream()
        side = self._side_stream(a.x.device)
        for half in (a, b):
            _record(half.residual_rows, side)
        # The embedding's reductions: A's has nothing to hide behind (the standalone-best CTA
        # count), B's hides behind A's first attention block.
        embedded = torch.cuda.Event()
        embedded.record(compute)
        for half, ctas in ((a, None), (b, self.weave_ctas or WEAVE_CTAS)):
            _record(half.x, side)
            with torch.cuda.stream(side):
                side.wait_event(embedded)
                self._embed(half, ctas)
                half.ready = torch.cuda.Event()
                half.ready.record(side)
            _record(half.x, compute)
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            for block in ("attn", "mlp"):
                for half in (a, b):
                    # the very last reduction has nothing left to hide behind: the
                    # communicator's default (standalone-best) CTA count
                    ctas = None if (i, block, half) == (last, "mlp", b) else \
                        self.weave_ctas or WEAVE_CTAS
                    if half.ready is not None:
                        compute.wait_event(half.ready)
                    partial = self._block(half, i, block, cache, rotary)     # compute stream
                    produced = torch.cuda.Event()
                    produced.record(compute)
                    _record(partial, side)
                    with torch.cuda.stream(side):
                        side.wait_event(produced)
                        self._reduce(half, partial, self._norm_after(i, block), ctas)  # side stream
                        half.ready = torch.cuda.Event()
                        half.ready.record(side)
                    _record(half.x, compute)
        for half in (a, b):
            compute.wait_event(half.ready)
        return torch.cat([a.x, b.x])

    def run(self, mode: Mode, h, positions, cache, batch, rotary, split: int | None):
        """h [T, D]: the vocabulary-parallel embedding's partial sums on this rank (not yet
        all-reduced; each schedule reduces them its own way, nocomm not at all)."""
        if mode is Mode.BASELINE:
            return self.run_replicated(h, positions, cache, batch, rotary, reduce=True)
        if mode is Mode.NOCOMM:
            return self.run_replicated(h, positions, cache, batch, rotary, reduce=False)
        if mode is Mode.FUSED or split is None or not 0 < split < h.shape[0]:
            return self.run_fused(h, positions, cache, batch, rotary)
        return self.run_weave(h, positions, cache, batch, rotary, split)
