"""Per-row FP8 (e4m3) quantization in one pass: what an FP8 linear layer does to its input.

R = rows (tokens), K = row length, V = 16-byte vectors per row, E = elements per vector.

    codes, scale = quantize_rows_cuda(x)       # x [R, K] bf16 / fp16 / fp32 on a GPU
    codes, scale = quantize_rows_cuda(x, gated=True)   # x [R, 2K] = [gate | up] -> [R, K]

scale[r] = max(|x[r]|) / 448 (at least 1e-12), codes[r] = x[r] / scale[r] rounded to the
nearest e4m3 (even on ties), saturated to +-448: the numbers of `fp8.quantize_rows`' torch
form, bit for bit (the same float32 division).

Why: as torch ops the row maximum, division, clamp and cast are five passes over the
activations and ~10 µs of launches; at 2,048 tokens of Llama-3-8B they took longer than the FP8
GEMM they feed (benchmarks/RESULTS.md, FP8). One CTA per row reads it once into registers,
reduces the maximum, and writes the codes. Gated (an FP8 down projection's input): the row is
silu(gate) * up, computed and rounded to x's dtype as `activation.silu_and_mul` does, so the
codes equal that kernel's output rounded here, without its round trip through memory.

Spread (one row over many CTAs): `round_spread(p, maxima)` rounds a row whose |maximum| is
known in parts (`fp8_gemv.fp8_gemv_gated` writes one a CTA): each CTA reduces the parts, then
rounds its share of the row. The same numbers as `quantize_rows_cuda(p)`; at one token it
replaces one CTA doing a whole row of 14,336 (benchmarks/RESULTS.md, FP8 decode).
"""
from __future__ import annotations

import torch

from weavelm.kernels.common import DTYPES, MAX_BLOCK, MAX_VEC, MAX_VPT, remember, row_shape

VPT_CLASSES = (4, MAX_VPT)
SIGNATURE = "void(uint64, uint64, uint64, int64, int64)"
SPREAD_SIGNATURE = "void(uint64, uint64, uint64, uint64, int64, int64)"
SPREAD_BLOCK = 128              # threads a CTA, one 16-byte vector (8 activations) each
_plans: dict = {}


def supported(x: torch.Tensor, gated: bool = False) -> bool:
    k = x.shape[-1] // (2 if gated else 1) if x.dim() == 2 else 0
    return (x.dtype in DTYPES and k % 8 == 0 and 0 < k * x.element_size() // 16 <= MAX_VEC
            and x.is_contiguous() and not (gated and x.dtype == torch.float32))


def quantize_rows_cuda(x: torch.Tensor, gated: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (contiguous, `supported`) -> (codes [R, K] float8_e4m3fn, scales [R] fp32);
    gated: x [R, 2K] = [gate | up], the codes those of silu(gate) * up."""
    R, K = x.shape[0], x.shape[1] // (2 if gated else 1)
    codes = torch.empty(R, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        dev = max(x.get_device(), 0)           # CPU (-1) only under the simulator
        n_vec = K * x.element_size() // 16
        kern, grid, block = _plan(DTYPES[x.dtype], n_vec, R, dev, gated)
        kern.launch(grid, block, dev, x.data_ptr(), codes.data_ptr(), scale.data_ptr(), R, n_vec)
    return codes, scale


def round_spread(p: torch.Tensor, maxima: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p [1, K] bf16 / fp16 (contiguous, K % 8 == 0) and float32 maxima whose largest is
    max(|p|) -> (codes [1, K] float8_e4m3fn, scale [1] float32), as `quantize_rows_cuda(p)`."""
    K = p.shape[1]
    assert p.shape[0] == 1 and K % 8 == 0 and p.dtype in (torch.bfloat16, torch.float16) \
        and p.is_contiguous(), "round_spread: one contiguous bf16/fp16 row of K % 8 == 0"
    codes = torch.empty(1, K, dtype=torch.float8_e4m3fn, device=p.device)
    scale = torch.empty(1, dtype=torch.float32, device=p.device)
    from weavelm.kernels import launcher
    dt = DTYPES[p.dtype]
    dev = max(p.get_device(), 0)
    pdl = launcher.pdl_enabled(dev)
    kern = launcher.kernel(("fp8_round_spread", dt), lambda: _build_spread(dt, pdl),
                           SPREAD_SIGNATURE, max_threads=SPREAD_BLOCK, pdl=pdl)
    n_vec = K // 8
    kern.launch(-(-n_vec // SPREAD_BLOCK), SPREAD_BLOCK, dev, p.data_ptr(),
                maxima.data_ptr(), codes.data_ptr(), scale.data_ptr(), maxima.numel(), n_vec)
    return codes, scale


def _plan(dt: str, n_vec: int, rows: int, device: int, gated: bool = False):
    key = (dt, n_vec, rows, device, gated)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        from weavelm.kernels.rmsnorm import _max_ctas
        vpt, block = row_shape(n_vec, VPT_CLASSES, MAX_BLOCK)
        pdl = launcher.pdl_enabled(device)
        k = launcher.kernel(("fp8_quant", dt, vpt, gated),
                            lambda: _build_kernel(dt, vpt, gated, pdl), SIGNATURE, pdl=pdl,
                            max_threads=MAX_BLOCK)
        p = remember(_plans, key, (k, min(rows, _max_ctas(device, block)), block))
    return p


cuda = None  # numba.cuda, bound by _build_kernel: a module global, so the simulator can swap it


def _build_kernel(dt: str, vpt: int, gated: bool = False, pdl: bool = False):
    global cuda
    import math

    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, pdl_entry, row_rounding_fn

    cuda = numba_cuda()
    unpack, pack, E = codec(dt)
    simulator = ptx.SIMULATOR
    sim_slots = MAX_BLOCK if simulator else 1
    nbuf = vpt * E
    load_nc = ptx.load_v4_u32_nc
    round_row = row_rounding_fn(vpt, E)
    enter = pdl_entry(pdl)

    def fp8_quant_kernel(x_ptr, codes_ptr, scale_ptr, n_rows, n_vec):
        """One CTA per row (grid-stride); thread t holds vectors t, t + blockDim, ... of it."""
        enter()
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        warp_max = cuda.shared.array(33, float32)           # [32 warp maxima, row maximum]
        thread_max = cuda.shared.array(sim_slots, float32)  # simulator only
        h = cuda.local.array(nbuf, float32)
        a = cuda.local.array(E, float32)
        u = cuda.local.array(E, float32)
        row = cuda.blockIdx.x
        while row < n_rows:
            m = float32(0.0)
            for j in range(vpt):
                v = tid + j * nthreads
                if v < n_vec and gated:         # row of [gate | up]: silu(gate) * up
                    src = x_ptr + (row * 2 * n_vec + v) * 16
                    unpack(load_nc(src), a)
                    unpack(load_nc(src + n_vec * 16), u)
                    for e in range(E):          # silu_and_mul's arithmetic and rounding
                        a[e] = a[e] / (float32(1.0) + math.exp(-a[e])) * u[e]
                    unpack(pack(a), a)
                elif v < n_vec:
                    unpack(load_nc(x_ptr + (row * n_vec + v) * 16), a)
                if v < n_vec:
                    for e in range(E):
                        h[j * E + e] = a[e]
                        m = max(m, abs(a[e]))
            round_row(h, m, warp_max, thread_max, tid, nthreads, n_vec, row, codes_ptr,
                      scale_ptr)
            cuda.syncthreads()          # warp_max[32] is rewritten only after every read
            row += cuda.gridDim.x

    fp8_quant_kernel.__name__ = f"fp8_quant_{dt}_v{vpt}" + ("_silu_mul" if gated else "")
    return fp8_quant_kernel


def _build_spread(dt: str, pdl: bool = False):
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import block_reduce_fn, codec, pdl_entry

    cuda = numba_cuda()
    unpack, E = codec(dt)[0], codec(dt)[2]
    simulator = ptx.SIMULATOR
    sim_slots = SPREAD_BLOCK if simulator else 1
    load_nc, load_u32, store_u32 = ptx.load_v4_u32_nc, ptx.load_u32, ptx.store_u32
    pack4, as_f32, as_u32 = ptx.pack_e4m3x4, ptx.u32_as_f32, ptx.f32_as_u32
    block_max = block_reduce_fn(True)
    enter = pdl_entry(pdl)

    def fp8_round_spread_kernel(x_ptr, max_ptr, codes_ptr, scale_ptr, n_max, n_vec):
        """Every CTA reduces the maxima (a few hundred, in L2), then rounds vector
        blockIdx * blockDim + tid of the row."""
        enter()
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        warp_max = cuda.shared.array(33, float32)
        thread_max = cuda.shared.array(sim_slots, float32)
        h = cuda.local.array(E, float32)
        v = cuda.blockIdx.x * nthreads + tid
        if v < n_vec:                                   # the row's vector, asked for first
            unpack(load_nc(x_ptr + v * 16), h)
        m = float32(0.0)
        i = tid
        while i < n_max:
            m = max(m, as_f32(load_u32(max_ptr + i * 4)))
            i += nthreads
        block_max(m, warp_max, thread_max, tid, nthreads)
        s = max(warp_max[32] / float32(448.0), float32(1e-12))
        if v == 0:
            store_u32(scale_ptr, as_u32(s))
        if v < n_vec:
            for q in range(E // 4):
                store_u32(codes_ptr + v * E + 4 * q,
                          pack4(h[4 * q] / s, h[4 * q + 1] / s, h[4 * q + 2] / s,
                                h[4 * q + 3] / s))

    fp8_round_spread_kernel.__name__ = f"fp8_round_spread_{dt}"
    return fp8_round_spread_kernel
