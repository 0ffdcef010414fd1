"""Fused all-reduce + residual add + RMSNorm across GPUs, and plain all-reduce, on symmetric
buffers.

T = tokens, D = hidden size, N = ranks, V = 16-byte vectors per row (D * itemsize / 16),
rows(T) = this rank's balanced contiguous row block (`communicator.row_range`).

Every rank holds a symmetric buffer (same size, mapped by every peer; `parallel/symmetric.py`):
[data | signal area]. Each rank's GEMM writes its partial sums x_r [T, D] into its data region;
the kernels (`allreduce_norm_fused.py`, `allreduce_norm_plain.py`; their transports and barriers
in `allreduce_norm_transport.py` and `allreduce_norm_sync.py`) then run on every rank with the
same grid:

* fused, push ("sharded", TokenWeave): rank r sums rows(T) of x over all ranks (fp32, fixed rank
  order), adds its residual rows, normalises, and stores the normalised rows into EVERY rank's
  buffer in place. After the kernel each buffer holds the full normalised [T, D]; the residual
  is sequence-sharded: [rows(T), D] (or a full [T, D] of which only rows(T) are updated).
  p2p reads the peers' partials with remote loads; its "scatter" variant (`inbox_off`) first has
  every rank store its partials of each peer's rows into that peer's inbox, so NVLink carries
  only stores and the reduction reads local memory.
* fused, one-shot: every rank sums all T rows from all buffers and writes the normalised rows to
  a local `out`; a replicated residual [T, D] is updated in full on every rank. No remote writes,
  N-fold reads: for small T (decode).
* all-reduce, two-shot (push): rank r sums its 1/N share of the vectors and stores the sums into
  every buffer: afterwards each buffer holds the sum, in place.
* all-reduce, one-shot: every rank sums everything into a local `out`.

Rows (vectors) of different ranks are disjoint, so "in place" is safe: only the owner of a row
reads or writes it during the kernel.

Barriers (start: every peer's partials are written; end: every peer has finished reading my buffer
and writing into it). Per CTA b, on the signal areas: thread 0 of CTA b fences once (system scope)
and then adds 1 (relaxed) to slot[b][me] on every rank (fence + strong write is a release in the
PTX model; a `red.release` per rank would fence again before each add); threads t < N wait
(acquire) until their own slot[b][t] reaches the count this CTA expects. The expected count is this
CTA's own epoch, kept in device memory and advanced by the kernel itself, so nothing is passed from
the host: repeated launches and CUDA-graph replays stay in step. Requirements: every rank launches
the same sequence of these kernels with the same grids (the launchers derive grids from T, N and
the CTA count only), and one stream per buffer runs them. Spins are bounded by `%globaltimer`: on
timeout the kernel records (rank waited for, barrier, CTA) in the sticky error word of its signal
area and in an optional host-mapped word, and exits; later launches exit at once until the signal
areas are reset. The host raises `WeavelmError` naming the rank (`fused_communicator`).

CPU: references only; the kernels also run in numba's CUDA simulator (`tests/kernels`).
"""
from __future__ import annotations

import os

from dataclasses import dataclass

import torch

from weavelm.kernels.allreduce_norm_layout import MAX_CTAS, MAX_RANKS, SIG_BYTES
from weavelm.kernels.common import (  # DTYPES, MAX_VEC: re-exported for the communicators
    DTYPES, MAX_BLOCK, MAX_VEC, MAX_VPT, remember, row_shape, warps_for,
)

__all__ = ["Peers", "DTYPES", "TRANSPORTS", "fused_ref", "allreduce_ref", "launch_fused",
           "launch_allreduce", "fused_kernel", "allreduce_kernel", "plan_fused",
           "plan_allreduce", "SIG_BYTES", "MAX_CTAS", "MAX_RANKS", "MAX_VEC"]

TRANSPORTS = ("p2p", "multimem")
VPT_CLASSES = (1, 2, 4, MAX_VPT)  # 16-byte vectors per thread: one compile each

# All 8-byte parameters (launcher.py): pointers uint64, sizes int64, eps float64.
FUSED_SIGNATURE = ("void(uint64, uint64, uint64, int64, int64, int64, uint64, uint64, uint64, "
                   "int64, int64, int64, float64, int64, uint64, int64, int64)")
ALLREDUCE_SIGNATURE = ("void(uint64, uint64, uint64, int64, int64, int64, uint64, int64, int64, "
                       "int64, uint64)")


@dataclass(frozen=True)
class Peers:
    """What a kernel needs to reach every rank's buffer (from `SymmetricBuffer.peers()`)."""
    tab: int       # device address of int64[N]: every rank's buffer base address
    my_base: int   # this rank's buffer base address
    mc: int        # multicast base address; 0 unless the multimem transport is in use
    rank: int
    world: int
    sig_off: int   # byte offset of the signal area in every buffer
    err_host: int  # host-mapped u32 the kernel copies its first error into (0: none)
    device: int    # CUDA device index (0 under the simulator)


# ----------------------------------------------------------------------------- references

def fused_ref(partials, residual, weight, eps, out_dtype=None):
    """(y, new_residual) of the fused kernel from the N ranks' partial sums [T, D] (fp32 sum in
    rank order, + residual in fp32, new residual rounded once, y from the fp32 value)."""
    s = partials[0].float()
    for p in partials[1:]:
        s = s + p.float()
    dtype = out_dtype or partials[0].dtype
    h = s + residual.float() if residual is not None else s
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(dtype), (h.to(residual.dtype) if residual is not None else None)


def allreduce_ref(partials):
    """fp32 sum in rank order, rounded once to the input dtype."""
    s = partials[0].float()
    for p in partials[1:]:
        s = s + p.float()
    return s.to(partials[0].dtype)


# ----------------------------------------------------------------------------- kernels and plans

def _check_shape(dt: str, n_vec: int, world: int, ctas: int) -> None:
    if not 1 <= world <= MAX_RANKS:
        raise ValueError(f"allreduce_norm: world size {world} outside 1..{MAX_RANKS}")
    if not 0 < n_vec <= MAX_VEC:
        raise ValueError(f"allreduce_norm: a row of {n_vec} 16-byte vectors is outside "
                         f"1..{MAX_VEC}")
    if not 1 <= ctas <= MAX_CTAS:
        raise ValueError(f"allreduce_norm: CTA count {ctas} outside 1..{MAX_CTAS}")


def fused_kernel(kind: str, dt: str, world: int, vpt: int, push: bool, has_residual: bool,
                 rows: int | None = None, scatter: bool = False):
    """The cached launcher.Kernel of one fused variant (compiled on first use). rows: token rows
    per CTA iteration (default `allreduce_norm_fused.rows_per_iter`); scatter: p2p's
    stores-only variant (`make_fused_kernel`)."""
    from weavelm.kernels import launcher
    from weavelm.kernels.allreduce_norm_fused import make_fused_kernel, rows_per_iter

    if rows is None:
        # WEAVELM_FUSED_ROWS overrides the plan's choice (benchmarks compare R values).
        rows = int(os.environ.get("WEAVELM_FUSED_ROWS") or 0) or \
            rows_per_iter(kind, dt, world, vpt, has_residual)
    return launcher.kernel(("ar_norm", kind, dt, world, vpt, push, has_residual, rows, scatter),
                           lambda: make_fused_kernel(kind, dt, world, vpt, push, has_residual,
                                                     rows, scatter),
                           FUSED_SIGNATURE, max_threads=MAX_BLOCK)


def allreduce_kernel(kind: str, dt: str, world: int, push: bool):
    """The cached launcher.Kernel of one plain all-reduce variant (compiled on first use)."""
    from weavelm.kernels import launcher
    from weavelm.kernels.allreduce_norm_plain import make_allreduce_kernel

    return launcher.kernel(("allreduce", kind, dt, world, push),  # unroll: vecs_per_iter
                           lambda: make_allreduce_kernel(kind, dt, world, push),
                           ALLREDUCE_SIGNATURE, max_threads=MAX_BLOCK)


_plans: dict = {}


def plan_fused(kind, dt, world, n_vec, max_rows, ctas, push, has_residual, scatter=False):
    """(Kernel, grid, block). grid = min(ctas, rows of the largest rank): the same on every rank.
    block = warps covering a row with <= vpt vectors per thread. Each CTA iteration handles R
    rows (`rows_per_iter`: a compile-time constant of the variant, from N, vpt and the
    transport) with all their loads in flight at once; grid and row-to-CTA map do not depend
    on R."""
    key = ("f", kind, dt, world, n_vec, max_rows, ctas, push, has_residual, scatter)
    p = _plans.get(key)
    if p is None:
        _check_shape(dt, n_vec, world, ctas)
        vpt, block = row_shape(n_vec, VPT_CLASSES)
        grid = max(1, min(ctas, max_rows))
        p = remember(_plans, key, (fused_kernel(kind, dt, world, vpt, push, has_residual,
                                                scatter=scatter), grid, block))
    return p


def plan_allreduce(kind, dt, world, max_vecs, ctas, push):
    """(Kernel, grid, block) for a plain all-reduce whose largest share is max_vecs vectors."""
    key = ("a", kind, dt, world, max_vecs, ctas, push)
    p = _plans.get(key)
    if p is None:
        _check_shape(dt, 1, world, ctas)
        block = warps_for(max_vecs)
        grid = max(1, min(ctas, -(-max_vecs // block)))
        p = remember(_plans, key, (allreduce_kernel(kind, dt, world, push), grid, block))
    return p


# ----------------------------------------------------------------------------- launchers

def launch_fused(peers: Peers, kind: str, dt: str, *, x_off: int, n_vec: int, row_start: int,
                 n_rows: int, max_rows: int, has_residual: bool, res_ptr: int, w_ptr: int,
                 out_ptr: int, eps: float, push: bool, ctas: int, timeout_ns: int,
                 inbox_off: int = -1, n_total: int = 0) -> tuple:
    """Launch the fused kernel on torch's current stream; returns (Kernel, grid, block).

    x_off: byte offset of row 0 of x [T, D] in every buffer. push: rows [row_start, +n_rows) are
    ours, max_rows = the largest rank's count; one-shot: row_start = 0, n_rows = max_rows = T.
    res_ptr: address of the residual row of row_start (any valid address when n_rows == 0);
    has_residual must be the same on every rank (it picks the compiled variant). w_ptr: weight
    [D]; out_ptr: one-shot output [T, D] (unused when push). inbox_off >= 0 (p2p, push): the
    scatter variant, with every rank's inbox at that byte offset (N * max_rows rows) and
    n_total = T.
    """
    scatter = inbox_off >= 0
    if scatter and not (kind == "p2p" and push and n_total > 0
                        and max_rows == -(-n_total // peers.world)):
        raise ValueError("scatter: p2p push mode with n_total = T and max_rows = ceil(T / N)")
    kern, grid, block = plan_fused(kind, dt, peers.world, n_vec, max_rows, ctas, push,
                                   has_residual, scatter)
    kern.launch(grid, block, peers.device, peers.tab, peers.my_base, peers.mc, peers.rank,
                x_off, peers.sig_off, res_ptr, w_ptr, out_ptr, row_start, n_rows, n_vec,
                float(eps), timeout_ns, peers.err_host, max(inbox_off, 0), n_total)
    return kern, grid, block


def launch_allreduce(peers: Peers, kind: str, dt: str, *, x_off: int, v_start: int, n_vecs: int,
                     max_vecs: int, out_ptr: int, push: bool, ctas: int,
                     timeout_ns: int) -> tuple:
    """Launch the plain all-reduce: vectors [v_start, +n_vecs) (push: ours; one-shot: all, with
    out_ptr the local output of vector v_start). Returns (Kernel, grid, block)."""
    kern, grid, block = plan_allreduce(kind, dt, peers.world, max_vecs, ctas, push)
    kern.launch(grid, block, peers.device, peers.tab, peers.my_base, peers.mc, peers.rank,
                x_off, peers.sig_off, out_ptr, v_start, n_vecs, timeout_ns, peers.err_host)
    return kern, grid, block
