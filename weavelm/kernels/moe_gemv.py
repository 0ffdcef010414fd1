"""Mixture-of-experts compute for a few tokens (decode): two GEMV kernels that stream each
active expert's weights once.

T = tokens (1..8), D = hidden size, E = experts, K = experts per token, I = expert intermediate
size on this rank, n = T * K routed (token, slot) pairs, L = lanes per row, TMAX = T rounded up
to 1, 2, 4 or 8 (a compile-time class).

    h = moe_gate_up_cuda(x, w13, ids)                   [T, K, I] fp32: silu(x w1_e^T) * (x w3_e^T)
    y = moe_down_cuda(h, w2, weights, ids, out)         [T, D]: sum_k weights[t, k] * h[t, k] w2_e^T
    y = moe_gemv(x, w13, w2, weights, ids, out)         both: `moe_experts` for T <= 8

x [T, D]; w13 [E, 2I, D] (gate rows, then up rows); w2 [E, D, I]; ids [T, K] int64 or int32
(distinct per token, as top-k gives them); weights [T, K] fp32; e = ids[t, k].

Why: at batch 1 an MoE block is K matrix-vector products per projection, bound by reading the K
active experts' weights (3 I D each). The grouped-GEMM path sorts, gathers and runs GEMM tiles
of 64-128 rows for 1-8 rows (about half the copy bandwidth: benchmarks/RESULTS.md, MoE). Here:

1. `moe_gate_up`: a work unit is (expert, P consecutive i): the 2P rows gate_i.., up_i.. of w13[e].
   A row slot of L lanes streams them with 16-byte loads L vectors apart (coalesced 512-byte
   warp loads; `ld.global.nc.L1::no_allocate`, so x and h keep L1), U columns of every row
   loaded before the first is used (2P x U loads in flight per lane), against x of every token
   routed to e (read through L1, shared by the 2P rows), fp32 accumulation, a shuffle sum over
   the L lanes; lane 0 writes silu(gate) * up for each token.
2. `moe_down`: a unit is R consecutive output rows d; for each distinct expert, the R rows of
   w2[e] against h[t, k] * weights[t, k] of each token routed there, summed over the experts in
   registers, so the top-k weighting and the combine cost no pass of their own; one write per
   token of the R outputs in the activation dtype.

Expert ids are read on the device (each CTA builds the table of distinct experts in shared
memory: an expert that several tokens share is read once for all of them), so there is no host
sync and decode stays capturable in a CUDA graph. The grid depends only on the shapes (T, K, E,
D, I), never on the routing: units go to row slots in balanced contiguous ranges, and the grid is
at most the CTAs that fit on the GPU at once (the driver's occupancy of the compiled kernel),
the fewest that keep each row slot's rounds of units (`_plan`). `unsupported` says why an
input does not fit; `moe_experts` then takes its grouped path.

Why these launch shapes: a GEMV reads each weight once, so it runs at the memory rate only
if every SM keeps enough independent loads in flight to cover the memory latency (Little's law)
and spends few instructions per loaded vector; hence several 16-byte loads per lane issued
before any is used, and small units, so that the last ones leave a short tail. The prediction
made from this before the kernels were measured: benchmarks/HISTORY.md; the measurement:
benchmarks/RESULTS.md (MoE).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from weavelm.kernels.common import DTYPES, ELEMS, remember, sm_count

MAX_TOKENS = 8
NMAX = 64                       # T * K <= NMAX (moe_gemv_kernels.NMAX)
WARPS = 4                       # per CTA (~90 registers at T = 1: 5 CTAs, 20 warps per SM)
# per TMAX class: (P intermediates per unit, U columns in flight) of the gate/up kernel and
# (R rows per unit, U) of the down kernel: 2P x U and R x U loads in flight per lane (8 at
# T <= 2, 92-106 registers: 5 and 4 CTAs per SM). Small units keep the tail short: at T = 1 the
# mixtral-8x7b gate/up has 28672 units, 11 rounds on 2607 row slots (one warp each), the down
# 2048 units, one per warp.
GATE_UP = {1: (1, 4), 2: (1, 4), 4: (2, 2), 8: (1, 2)}
DOWN = {1: (2, 4), 2: (2, 4), 4: (2, 2), 8: (2, 2)}
SIG_GATE_UP = "void(" + ", ".join(["uint64"] * 4 + ["int64"] * 6) + ")"
SIG_DOWN = "void(" + ", ".join(["uint64"] * 5 + ["int64"] * 6) + ")"


# ----------------------------------------------------------------------------- references

def moe_gate_up_ref(x, w13, ids) -> torch.Tensor:
    """[T, K, I]: silu(x w1_e^T) * (x w3_e^T), in float64 for float64 inputs, else float32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    inter = w13.shape[1] // 2
    gu = torch.einsum("tkod,td->tko", w13[ids.long()].to(acc), x.to(acc))    # [T, K, 2I]
    return F.silu(gu[..., :inter]) * gu[..., inter:]


def moe_down_ref(h, w2, weights, ids, dtype=None) -> torch.Tensor:
    """[T, D]: sum_k weights[t, k] * h[t, k] w2_e^T, accumulated as h's dtype (>= float32),
    returned as `dtype` (default w2's)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    y = torch.einsum("tkdi,tki->tkd", w2[ids.long()].to(acc), h.to(acc))      # [T, K, D]
    return (y * weights.to(acc)[..., None]).sum(1).to(dtype or w2.dtype)


# ----------------------------------------------------------------------------- support

def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _why(T, D, E, inter, K, dtype, device, tensors: dict) -> str | None:
    """Shared checks: sizes, dtype, device and layout of the operands (None: all fit)."""
    if not (device.type == "cuda" or (_simulator() and device.type == "cpu")):
        return f"operands on {device}, not a CUDA device"
    if dtype not in DTYPES:
        return f"dtype {dtype}: the kernels take bf16, fp16, fp32"
    if not 1 <= T <= MAX_TOKENS or not 1 <= T * K <= NMAX:
        return f"{T} tokens x {K} experts each: the kernels take 1..{MAX_TOKENS} tokens, " \
               f"T * K <= {NMAX}"
    if D % 8 or inter % 8 or inter == 0 or E == 0:
        return f"hidden {D} and intermediate slice {inter} must be positive multiples of 8"
    want = {"x": ((T, D), dtype), "w13": ((E, 2 * inter, D), dtype),
            "w2": ((E, D, inter), dtype), "ids": ((T, K), None), "weights": ((T, K), None),
            "out": ((T, D), dtype), "h": ((T, K, inter), torch.float32)}
    for name, t in tensors.items():
        shape, dt = want[name]
        if tuple(t.shape) != shape:
            return f"{name} has shape {tuple(t.shape)}, expected {shape}"
        if dt is not None and t.dtype != dt:
            return f"{name} has dtype {t.dtype}, expected {dt}"
        if t.device != device:
            return f"{name} is on {t.device}, expected {device}"
        if not t.is_contiguous() or t.data_ptr() % 16:
            return f"{name} must be contiguous and 16-byte aligned"
    if "ids" in tensors and tensors["ids"].dtype not in (torch.int64, torch.int32):
        return f"ids must be int64 or int32, got {tensors['ids'].dtype}"
    if "weights" in tensors and tensors["weights"].dtype != torch.float32:
        return f"weights must be float32, got {tensors['weights'].dtype}"
    return None


def unsupported(x, w13, w2, weights, ids, out=None) -> str | None:
    """Why `moe_gemv` cannot take these operands (None: it can)."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or ids.dim() != 2:
        return "expects x [T, D], w13 [E, 2I, D], w2 [E, D, I], ids [T, K]"
    tensors = dict(x=x, w13=w13, w2=w2, ids=ids, weights=weights)
    if out is not None:
        tensors["out"] = out
    return _why(x.shape[0], x.shape[1], w13.shape[0], w13.shape[1] // 2, ids.shape[1],
                x.dtype, x.device, tensors)


# ----------------------------------------------------------------------------- launchers

def moe_gemv(x, w13, w2, weights, ids, out=None, params: dict | None = None) -> torch.Tensor:
    """`moe_experts` for 1..8 tokens by the two kernels (same contract); `params` overrides
    the launch plan (tests, benchmarks): warps, lanes, pairs, rows, unroll, max_ctas, for both
    kernels or per kernel under "gate_up" / "down"."""
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        weights = weights.float().contiguous()
    why = unsupported(x, w13, w2, weights, ids, out)
    if why:
        raise ValueError(f"moe_gemv: {why}")
    p = params or {}
    h = moe_gate_up_cuda(x, w13, ids, params=p.get("gate_up", p), checked=True)
    return moe_down_cuda(h, w2, weights, ids, out, params=p.get("down", p), checked=True)


def moe_gate_up_cuda(x, w13, ids, h=None, params=None, checked=False) -> torch.Tensor:
    """h [T, K, I] fp32 (written where a slot's expert id is in [0, E))."""
    if x.dim() != 2 or w13.dim() != 3 or ids.dim() != 2:
        raise ValueError("moe_gate_up: expects x [T, D], w13 [E, 2I, D], ids [T, K]")
    T, D = x.shape
    E, two_i, _ = w13.shape
    K, inter = ids.shape[1], two_i // 2
    why = None if checked else \
        _why(T, D, E, inter, K, x.dtype, x.device, dict(x=x, w13=w13, ids=ids))
    if why:
        raise ValueError(f"moe_gate_up: {why}")
    if h is None:
        h = torch.empty(T, K, inter, dtype=torch.float32, device=x.device)
    elif h.dtype != torch.float32 or tuple(h.shape) != (T, K, inter) or not h.is_contiguous():
        raise ValueError(f"moe_gate_up: h must be contiguous float32 {(T, K, inter)}")
    dt = DTYPES[x.dtype]
    nvec = D // ELEMS[dt]
    tmax = _tmax(T)
    p = params or {}
    pairs, unroll = p.get("pairs", GATE_UP[tmax][0]), p.get("unroll", GATE_UP[tmax][1])
    if inter % pairs:
        raise ValueError(f"moe_gate_up: intermediate {inter} is not a multiple of {pairs}")
    lanes = p.get("lanes") or _lanes(nvec)
    units = min(T * K, E) * inter // pairs
    kern, grid, block = _plan("gate_up", (dt, tmax, lanes, pairs, unroll), units, lanes,
                              _index(x), p)
    kern.launch(grid, block, _index(x), x.data_ptr(), w13.data_ptr(), ids.data_ptr(),
                h.data_ptr(), T, K, E, nvec, inter, ids.element_size())
    return h


def moe_down_cuda(h, w2, weights, ids, out=None, params=None, checked=False) -> torch.Tensor:
    """out [T, D] = sum_k weights[t, k] * h[t, k] w2_e^T in w2's dtype."""
    if w2.dim() != 3 or ids.dim() != 2:
        raise ValueError("moe_down: expects w2 [E, D, I], ids [T, K]")
    E, D, inter = w2.shape
    T, K = ids.shape
    if not checked:
        tensors = dict(h=h, w2=w2, weights=weights, ids=ids)
        if out is not None:
            tensors["out"] = out
        why = _why(T, D, E, inter, K, w2.dtype, w2.device, tensors)
        if why:
            raise ValueError(f"moe_down: {why}")
    if out is None:
        out = torch.empty(T, D, dtype=w2.dtype, device=w2.device)
    dt = DTYPES[w2.dtype]
    nvec = inter // ELEMS[dt]
    tmax = _tmax(T)
    p = params or {}
    rows, unroll = p.get("rows", DOWN[tmax][0]), p.get("unroll", DOWN[tmax][1])
    if D % rows or rows % 2:
        raise ValueError(f"moe_down: hidden {D} is not a multiple of {rows} rows (even)")
    lanes = p.get("lanes") or _lanes(nvec)
    kern, grid, block = _plan("down", (dt, tmax, lanes, rows, unroll), D // rows, lanes,
                              _index(w2), p)
    kern.launch(grid, block, _index(w2), h.data_ptr(), w2.data_ptr(), ids.data_ptr(),
                weights.data_ptr(), out.data_ptr(), T, K, E, D, nvec, ids.element_size())
    return out


def _tmax(T: int) -> int:
    return next(c for c in (1, 2, 4, 8) if T <= c)


def _lanes(nvec: int) -> int:
    """L: 32 lanes per row, or the largest power of two <= the row's vectors (at least 4)."""
    return 32 if nvec >= 32 else max(4, 1 << (nvec.bit_length() - 1))


def _index(t: torch.Tensor) -> int:
    return max(t.get_device(), 0)           # CPU (-1) only under the simulator


_plans: dict = {}


def _plan(kind: str, shape: tuple, units: int, lanes: int, device: int, p: dict):
    """(Kernel, grid, block): at most the CTAs that fit on the GPU at once, and the fewest that
    still give no row slot more rounds of units (an upper bound over all routings) than that
    many: a balanced last round (mixtral-8x7b at TP 8: 3584 gate/up units, 2 rounds on 1792
    row slots rather than 1.4 on 2640)."""
    key = (kind, shape, units, device, tuple(sorted(p.items())))
    plan = _plans.get(key)
    if plan is None:
        from weavelm.kernels import launcher
        from weavelm.kernels import moe_gemv_kernels as MK

        build = MK._build_gate_up if kind == "gate_up" else MK._build_down
        kern = launcher.kernel(("moe_" + kind, *shape), lambda: build(*shape),
                               SIG_GATE_UP if kind == "gate_up" else SIG_DOWN,
                               max_threads=32 * WARPS)
        block = 32 * min(p.get("warps", WARPS), WARPS)
        fit = sm_count(device) * kern.blocks_per_sm(block, device, default=4)
        fit = max(1, min(p.get("max_ctas", fit), fit))
        per_cta = block // 32 * (32 // lanes)                # row slots
        rounds = -(-units // (fit * per_cta))                # units per row slot, at most
        grid = max(1, -(-units // (rounds * per_cta)))       # fewest CTAs for that
        plan = remember(_plans, key, (kern, grid, block))
    return plan


