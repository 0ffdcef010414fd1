"""RMSNorm and fused residual-add + RMSNorm.

T = tokens, D = hidden size, V = 16-byte vectors per row (D * itemsize / 16),
E = elements per vector (8 for bf16/fp16, 4 for fp32).

Public entry points dispatch on the device: CUDA tensors go to the Numba kernel, CPU tensors to the
torch reference beside it. Layout of this file: references, dispatchers, launchers, kernel.
"""
from __future__ import annotations

import logging
import math

import torch

from weavelm.kernels.common import (DTYPES, MAX_BLOCK, MAX_VEC, MAX_VPT, codec, remember, row_shape,
                                    sm_count)

log = logging.getLogger(__name__)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, accumulated in fp32.  x: [T, D]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, out: torch.Tensor | None = None,
                           inplace_residual: bool = True):
    """h = x + residual (fp32); residual <- h (in x.dtype); y = rms_norm(h) * weight.

    Returns (y, new_residual). With `inplace_residual` the new residual is written into `residual`.
    """
    h = x.float() + residual.float()
    new_residual = residual if inplace_residual else torch.empty_like(residual)
    new_residual.copy_(h)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        out = torch.empty_like(x)
    out.copy_(y)
    return out, new_residual


def rms_norm(x, weight, eps, out=None):
    """RMSNorm of x: [..., D]. CUDA tensors -> Numba kernel, others -> `rms_norm_ref`."""
    if x.is_cuda and supported(x):
        return rms_norm_cuda(x, weight, eps, out)
    return rms_norm_ref(x, weight, eps, out)


def fused_add_rms_norm(x, residual, weight, eps, out=None, inplace_residual=True):
    """(y, new_residual) = RMSNorm(x + residual). CUDA -> Numba kernel, others -> reference."""
    if x.is_cuda and supported(x):
        return fused_add_rms_norm_cuda(x, residual, weight, eps, out, inplace_residual)
    return fused_add_rms_norm_ref(x, residual, weight, eps, out, inplace_residual)


# ----------------------------------------------------------------------------- launchers

VPT_CLASSES = (4, MAX_VPT)  # shape classes: max 16-byte vectors per thread (one compile each)
SIGNATURE = "void(uint64, uint64, uint64, uint64, uint64, int64, int64, float64, uint64)"
_warned: set = set()


def supported(x: torch.Tensor) -> bool:
    """Whether the kernel handles x's dtype and hidden size (the dispatchers fall back if not)."""
    d = x.shape[-1] if x.dim() else 0
    ok = x.dtype in DTYPES and d % 8 == 0 and 0 < d * x.element_size() // 16 <= MAX_VEC
    if not ok and (x.dtype, d) not in _warned:
        _warned.add((x.dtype, d))
        log.warning("rmsnorm: no kernel for dtype %s, hidden %d; using the torch reference",
                    x.dtype, d)
    return ok


def _check(name: str, t: torch.Tensor, x: torch.Tensor, dev: int, shape) -> int:
    """t's address, after cheap checks (hot path); the clear error is built only on failure."""
    if t.dtype is x.dtype and t.shape == shape and t.get_device() == dev and t.is_contiguous():
        p = t.data_ptr()
        if not p % 16:
            return p
        raise ValueError(f"rmsnorm: {name} must be 16-byte aligned (data_ptr % 16 == {p % 16})")
    if t.dtype != x.dtype:
        raise TypeError(f"rmsnorm: {name} has dtype {t.dtype}, expected {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"rmsnorm: {name} is on {t.device}, expected {x.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"rmsnorm: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    raise ValueError(f"rmsnorm: {name} must be contiguous (strides {t.stride()})")


def _check_x(x: torch.Tensor):
    """(address, D, device index) of x: [..., D] with clear errors for what the kernel can't take.
    Any device the kernel can address: CUDA on a GPU, CPU under the CUDA simulator."""
    if x.dtype not in DTYPES:
        raise TypeError(f"rmsnorm: dtype {x.dtype} not supported (bf16, fp16, fp32)")
    d = x.shape[-1] if x.dim() else 0
    if d % 8 or d == 0:
        raise ValueError(f"rmsnorm: hidden size {d} must be a positive multiple of 8")
    if d * x.element_size() // 16 > MAX_VEC:
        raise ValueError(f"rmsnorm: hidden size {d} exceeds the kernel's {MAX_VEC} 16-byte "
                         "vectors per row")
    dev = x.get_device()
    return _check("x", x, x, dev, x.shape), d, dev


def _run(x, d: int, dev: int, has_residual: bool, *args, scale_ptr: int = 0) -> None:
    """Launch on args = (x, residual, weight, out, new_residual) addresses + eps; with
    `scale_ptr` the rounded variant (out: FP8 codes, scale_ptr: their row scales)."""
    rows = x.numel() // d
    if rows:
        n_vec = d * x.element_size() // 16
        dev = max(dev, 0)  # CPU (-1) only under the simulator
        kern, grid, block = _plan_for(DTYPES[x.dtype], has_residual, n_vec, rows, dev,
                                      bool(scale_ptr))
        kern.launch(grid, block, dev, *args[:5], rows, n_vec, float(args[5]), scale_ptr)


_plans: dict = {}


def _plan_for(dt: str, has_residual: bool, n_vec: int, rows: int, device: int,
              rounded: bool = False):
    """(Kernel, grid, block): block = warps to cover the row with <= vpt vectors per thread;
    grid = one CTA per row, capped so CTAs grid-stride over rows beyond a few waves."""
    key = (dt, has_residual, n_vec, rows, device, rounded)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher

        vpt, block = row_shape(n_vec, VPT_CLASSES, MAX_BLOCK)
        grid = min(rows, _max_ctas(device, block))
        pdl = launcher.pdl_enabled(device)
        k = launcher.kernel(("rmsnorm", dt, has_residual, vpt) + (("fp8",) if rounded else ()),
                            lambda: _build_kernel(dt, has_residual, vpt, pdl, rounded),
                            SIGNATURE,
                            max_threads=MAX_BLOCK, pdl=pdl)
        p = remember(_plans, key, (k, grid, block))
    return p


def _max_ctas(device: int, block: int) -> int:
    """Grid cap: enough CTAs to fill every SM with its 2048 threads, twice over."""
    return sm_count(device) * 2 * max(1, 2048 // block)


def rms_norm_cuda(x, weight, eps, out=None):
    """Launcher of the plain RMSNorm kernel (same contract as `rms_norm_ref`)."""
    xp, d, dev = _check_x(x)
    wp = _check("weight", weight, x, dev, (d,))
    if out is None:
        out = torch.empty_like(x)  # contiguous, allocator-aligned: nothing to check
        op = out.data_ptr()
    else:
        op = _check("out", out, x, dev, x.shape)
    _run(x, d, dev, False, xp, 0, wp, op, 0, eps)
    return out


def fused_add_rms_norm_cuda(x, residual, weight, eps, out=None, inplace_residual=True):
    """Launcher of the fused kernel (same contract as `fused_add_rms_norm_ref`).

    `out` may alias x: each element of x is read once, by the thread that later writes it."""
    xp, d, dev = _check_x(x)
    rp = _check("residual", residual, x, dev, x.shape)
    wp = _check("weight", weight, x, dev, (d,))
    if out is None:
        out = torch.empty_like(x)
        op = out.data_ptr()
    else:
        op = _check("out", out, x, dev, x.shape)
    if inplace_residual:
        new_residual, nrp = residual, rp
    else:
        new_residual = torch.empty_like(residual)
        nrp = new_residual.data_ptr()
    _run(x, d, dev, True, xp, rp, wp, op, nrp, eps)
    return out, new_residual


def fused_add_rms_norm_rounded_cuda(x, residual, weight, eps):
    """(codes [T, D] float8_e4m3fn, scales [T] float32, residual): the fused kernel with its
    output rounded to FP8 a row in the same kernel (residual updated in place), the numbers
    of `fp8_quant.quantize_rows_cuda(fused_add_rms_norm_cuda(x, residual, ...)[0])` bit for
    bit: y rounded to x's dtype first, scale = max |y| / 448, codes = y / scale in e4m3. An
    FP8 projection's input without the rounding kernel between (decode at 2-64 tokens)."""
    xp, d, dev = _check_x(x)
    rp = _check("residual", residual, x, dev, x.shape)
    wp = _check("weight", weight, x, dev, (d,))
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _run(x, d, dev, True, xp, rp, wp, codes.data_ptr(), rp, eps, scale_ptr=scale.data_ptr())
    return codes, scale, residual


# ----------------------------------------------------------------------------- kernel

cuda = None  # numba.cuda, bound by _build_kernel: a module global, so the simulator can swap it


def _build_kernel(dt: str, has_residual: bool, vpt: int, pdl: bool = False,
                  rounded: bool = False):
    """The kernel's Python function for one dtype, variant and shape class (not yet jitted);
    `rounded`: the output row rounded to FP8 (codes at out, the row's scale at scale_ptr)."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels.common import block_reduce_fn, pdl_entry, row_rounding_fn
    from weavelm.kernels._numba_compat import numba_cuda

    cuda = numba_cuda()
    unpack, pack, epv = codec(dt)
    simulator = ptx.SIMULATOR  # no warp shuffles there: the block sum goes through shared memory
    sim_slots = MAX_BLOCK if simulator else 1
    nbuf = vpt * epv
    load_nc, load, store = ptx.load_v4_u32_nc, ptx.load_v4_u32, ptx.store_v4_u32
    prefetch = ptx.prefetch_l2
    enter = pdl_entry(pdl)
    block_sum = block_reduce_fn(False)
    round_row = row_rounding_fn(vpt, epv)

    def rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, n_vec, eps,
                       scale_ptr):
        """One CTA per row (grid-stride). x, res, out, res_out: [T, D] row-major; w: [D].
        Thread t owns vectors t, t + blockDim, ... (at most vpt) of each row, in registers.
        Every load of a row is issued before its first store (a store between them would make
        each next load wait for the one before: at one token, vpt round trips to memory)."""
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        warp_sums = cuda.shared.array(33, float32)  # [32 warp partials, row total]
        thread_sums = cuda.shared.array(sim_slots, float32)  # simulator only
        warp_max = cuda.shared.array(33, float32)   # rounded: [32 warp maxima, row maximum]
        h = cuda.local.array(nbuf, float32)  # this thread's part of h = x + residual (fp32)
        a = cuda.local.array(epv, float32)  # one vector of x / weight
        b = cuda.local.array(epv, float32)  # one vector of residual / output
        inv_d = float32(1.0) / float32(n_vec * epv)
        eps32 = float32(eps)
        row_bytes = n_vec * 16
        for j in range(vpt):             # the weight is read after the row's sum: ask L2 for
            v = tid + j * nthreads       # it now (between steps it leaves L2 for other weights)
            if v < n_vec:
                prefetch(w_ptr + v * 16)
        enter()                          # (the weight is no earlier kernel's output)
        row = cuda.blockIdx.x
        while row < n_rows:
            base = row * row_bytes
            ss = float32(0.0)
            for j in range(vpt):
                v = tid + j * nthreads
                if v < n_vec:
                    off = base + v * 16
                    unpack(load_nc(x_ptr + off), a)  # x is read once: read-only path
                    if has_residual:
                        unpack(load(res_ptr + off), b)  # may be overwritten: coherent load
                        for e in range(epv):
                            a[e] += b[e]
                    for e in range(epv):
                        h[j * epv + e] = a[e]
                        ss += a[e] * a[e]
            if has_residual:                 # the row's loads are all issued: now the stores
                for j in range(vpt):
                    v = tid + j * nthreads
                    if v < n_vec:
                        for e in range(epv):
                            a[e] = h[j * epv + e]
                        r = pack(a)
                        store(res_out_ptr + base + v * 16, r[0], r[1], r[2], r[3])
            # the row's sum of squares -> warp_sums[32] (rewritten only after the next row's
            block_sum(ss, warp_sums, thread_sums, tid, nthreads)       # first barrier)
            rstd = float32(1.0) / float32(math.sqrt(warp_sums[32] * inv_d + eps32))
            m = float32(0.0)
            for j in range(vpt):
                v = tid + j * nthreads
                if v < n_vec:
                    unpack(load_nc(w_ptr + v * 16), a)
                    for e in range(epv):
                        b[e] = h[j * epv + e] * rstd * a[e]
                    r = pack(b)
                    if rounded:                      # y as the dtype holds it, kept for codes
                        unpack(r, b)
                        for e in range(epv):
                            h[j * epv + e] = b[e]
                            m = max(m, abs(b[e]))
                    else:
                        store(out_ptr + base + v * 16, r[0], r[1], r[2], r[3])
            if rounded:                              # fp8_quant's rounding of the row
                round_row(h, m, warp_max, thread_sums, tid, nthreads, n_vec, row, out_ptr,
                          scale_ptr)
            row += cuda.gridDim.x

    rmsnorm_kernel.__name__ = (f"rmsnorm_{dt}_{'res' if has_residual else 'plain'}_v{vpt}"
                               + ("_fp8" if rounded else ""))
    return rmsnorm_kernel

