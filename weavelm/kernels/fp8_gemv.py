"""FP8 matrix-vector products for a few tokens (decode): y = (xq * xs) (codes * ws)^T.

M = tokens (1..MAX_TOKENS), N = output rows, K = inputs, Kv = K / 16 (16-byte vectors of FP8).

    y = fp8_gemv_cuda(xq, xs, codes, ws, dtype)     # [M, N] in dtype (bf16 / fp16 / fp32)

xq [M, K] and codes [N, K] float8_e4m3fn, xs [M] and ws [N] float32 (per-token and per-row
scales: `fp8.quantize_rows`); sums in fp32, scaled once, rounded once. The numbers of
`torch._scaled_mm` with row-wise scales, up to the order of the fp32 sums.

Why: at 1-4 tokens a linear layer is bound by reading its weights, and cuBLASLt's FP8 GEMM
reads them at well under the copy rate there (qkv of Llama-3-8B at one token: 17 µs for 25 MB,
where 1 byte per weight at the copy rate takes 10; the down projection no faster than bf16:
benchmarks/RESULTS.md, FP8). Here a warp streams ROWS rows of `codes`, each lane one 16-byte
vector (16 weights) of each row per step with `ld.global.nc.L1::no_allocate`, all ROWS loads
issued before the first is used; the tokens' vectors of the same columns come through L1 (every
warp reads them), are unpacked once per step for the ROWS rows, and each lane keeps M x ROWS
fp32 partial sums, reduced over the warp with shuffles at the end of the rows.

Fused input rounding (one token): `fp8_gemv_fused(x, codes, ws)` takes the activation row x
[1, K] in bf16 / fp16 and rounds it itself, bit for bit as `fp8_quant` does: each CTA reduces
|x|'s maximum (scale = max / 448), divides and rounds the row once into shared memory, and its
warps read the codes from there instead of from the rounding kernel's output. That saves the
rounding kernel's launch (~3.2-3.8 µs a projection on an H100 / H200, as much as the o
projection's GEMV). Rounding in the loop instead, each warp dividing its own copy, was slower
than the two kernels (the divisions outweigh the launch; RESULTS.md, FP8).

Gated (one token, the gate_up projection of an FP8 MLP): `fp8_gemv_gated(x, codes, ws)` takes
codes [2I, K] = [gate | up] and writes silu(gate) * up [1, I] instead of [gate | up]: each group
of ROWS rows is gate rows j, j + 1 and up rows j, j + 1, and the epilogue rounds both products
to x's dtype (the bits the plain form would store), then forms the product as
`activation.silu_and_mul` does. Each CTA also writes the largest |product| it stored, so that
`fp8_quant.round_spread` rounds the product to FP8 over many CTAs: one CTA rounding a row of
14,336 (the gated `fp8_quant` kernel, 5.9 µs on an H100) cost more than the GEMV's epilogue and
the spread rounding together.

Split K: a layer of few rows (o and down of Llama-3-8B: 4,096) gives too few warps to keep
enough loads in flight, so `kw` warps of a CTA share each group of ROWS rows, warp j taking the
vectors j, j + kw, ... of each row; their sums meet in shared memory. `kw` grows with the layer's
row count (`split_k`).
"""
from __future__ import annotations

import torch

from weavelm.kernels.common import DTYPES, remember, sm_count

MAX_TOKENS = 4
ROWS = 4                        # output rows per warp at a time
WARPS = 8                       # per CTA
WAVES = 4                       # grid cap: CTAs per SM (a grid-stride loop does the rest)
WIDE = 4096                     # row groups from which one warp per group keeps the copy rate
MIN_STEPS = 4                   # vectors per lane and row a split must leave each warp
# The fused form's row in shared memory (K bytes), and where it stops paying: each CTA rounds
# the whole row before its first weight load, which at K = 14,336 (down) cost more than the
# rounding kernel's launch (H200: 25.6 µs against 15.5 + 3.8); at K = 4,096 it saves 1.5-2.1 µs.
FUSED_MAX_K = 8192
# Built for programmatic dependent launch, each warp asks L2 for this many steps of its first
# rows' weights before it waits for the kernel before (the weights are no kernel's output), so
# that the weight stream starts while that kernel (an RMSNorm, the attention) finishes. H100,
# FP8 decode step at batch 1 (profile_decode.py): 3,638 µs at 0, 3,549 at 1, 3,584-3,586 at 2-3,
# 3,619 at 4; bench_decode at batch 1: 271.1 tok/s at 1, 268.7 at 2 (RESULTS.md, PDL).
EARLY_STEPS = 1                 # (read at build, not in the kernel key: set before a build)
SIGNATURE = "void(" + ", ".join(["uint64"] * 5 + ["int64"] * 3) + ")"
_plans: dict = {}


def supported(xq: torch.Tensor, codes: torch.Tensor, dtype) -> bool:
    M, K = xq.shape
    N = codes.shape[0]
    return (1 <= M <= MAX_TOKENS and K % 16 == 0 and N % ROWS == 0 and dtype in DTYPES
            and dtype != torch.float32 and xq.is_contiguous() and codes.is_contiguous())


def fp8_gemv_ref(xq, xs, codes, ws, dtype) -> torch.Tensor:
    return ((xq.float() * xs[:, None]) @ (codes.float() * ws[:, None]).t()).to(dtype)


def split_k(N: int, K: int) -> int:
    """Warps per group of ROWS rows (a power of two up to WARPS): 1 for a wide layer, else the
    most that leave each warp MIN_STEPS vectors of each row (H100, bench_fp8_linear.py
    --gemv-sweep: o 4096 x 4096 best at 2, down 4096 x 14336 at 4, gate_up 28672 rows at 1)."""
    kw = 1
    if N // ROWS >= WIDE:
        return kw
    while kw < WARPS and K // 16 >= 32 * 2 * kw * MIN_STEPS:
        kw *= 2
    return kw


def fp8_gemv_cuda(xq, xs, codes, ws, dtype, out=None, kw: int | None = None) -> torch.Tensor:
    """Launcher (contract in the module doc; `supported` must hold; `kw` overrides `split_k`)."""
    return _launch(PLAIN, xq, xs, codes, ws, dtype, out, kw)


def fused_supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] == 1 \
        and x.shape[1] <= FUSED_MAX_K and supported(x, codes, x.dtype)


def fp8_gemv_fused(x, codes, ws, out=None, kw: int | None = None) -> torch.Tensor:
    """y [1, N] in x's dtype = (x rounded to FP8 as `fp8_quant` does) (codes * ws)^T, the
    rounding done inside (`fused_supported` must hold)."""
    assert fused_supported(x, codes), "fp8_gemv_fused: one bf16/fp16 row of at most FUSED_MAX_K"
    return _launch(FUSED, x, x, codes, ws, x.dtype, out, kw)


def gated_supported(x: torch.Tensor, codes: torch.Tensor) -> bool:
    # 2I rows in groups of gate j, j + 1 and up j, j + 1; I % 8 == 0 for round_spread's vectors
    return fused_supported(x, codes) and codes.shape[0] % 16 == 0


def fp8_gemv_gated(x, codes, ws, kw: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(p [1, I] in x's dtype, maxima [CTAs] float32): p = silu(gate) * up of the fused form's
    y = [gate | up] [1, 2I], with each CTA's largest |p| (`gated_supported` must hold)."""
    assert gated_supported(x, codes), "fp8_gemv_gated: one bf16/fp16 row, 2I rows of codes"
    grid = _plan(DTYPES[x.dtype], 1, codes.shape[0], max(x.get_device(), 0),
                 kw or split_k(codes.shape[0], x.shape[1]), GATED)[1]
    maxima = torch.empty(grid, dtype=torch.float32, device=x.device)
    out = torch.empty(1, codes.shape[0] // 2, dtype=x.dtype, device=x.device)
    return _launch(GATED, x, maxima, codes, ws, x.dtype, out, kw), maxima


PLAIN, FUSED, GATED = 0, 1, 2     # the kernel's forms: codes given, row rounded inside, + gated


def _launch(form, x, xs, codes, ws, dtype, out, kw):
    M, K = x.shape
    N = codes.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=dtype, device=x.device)
    dev = max(x.get_device(), 0)               # CPU (-1) only under the simulator
    kern, grid = _plan(DTYPES[dtype], _tmax(M), N, dev, kw or split_k(N, K), form)
    kern.launch(grid, 32 * WARPS, dev, x.data_ptr(), xs.data_ptr(), codes.data_ptr(),
                ws.data_ptr(), out.data_ptr(), M, N, K // 16)
    return out


def _tmax(m: int) -> int:
    return 1 if m == 1 else 2 if m == 2 else 4


def _plan(dt: str, tmax: int, N: int, device: int, kw: int, form: int = PLAIN):
    key = (dt, tmax, N, device, kw, form)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        grid = max(1, min(-(-N * kw // (ROWS * WARPS)), sm_count(device) * WAVES))
        pdl = launcher.pdl_enabled(device)
        k = launcher.kernel(("fp8_gemv", dt, tmax, kw, form),
                            lambda: _build_kernel(dt, tmax, kw, form, pdl), SIGNATURE,
                            max_threads=32 * WARPS, pdl=pdl)
        p = remember(_plans, key, (k, grid))
    return p


cuda = None  # numba.cuda, bound by _build_kernel: a module global, so the simulator can swap it


def _build_kernel(dt: str, tmax: int, kw: int = 1, form: int = PLAIN, pdl: bool = False):
    global cuda
    from numba import float32, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import block_reduce_fn, codec, device, pdl_entry
    from weavelm.kernels.paged_attention_kernels import lane_reduce_fn

    import math

    cuda = numba_cuda()
    fused, gated = form != PLAIN, form == GATED
    lane_sum = lane_reduce_fn(32)
    enter = pdl_entry(pdl)
    block_max = block_reduce_fn(True)
    unpack_x = codec(dt)[0]                               # fused: 8 activations a vector
    pack4 = ptx.pack_e4m3x4
    simulator = ptx.SIMULATOR
    red_n = 32 * WARPS if simulator else 1
    pack2, unpack2 = (ptx.pack_bf16x2, ptx.unpack_bf16x2) if dt == "bf16" else \
        (ptx.pack_f16x2, ptx.unpack_f16x2)
    load_w, load_x, load_u32 = ptx.load_v4_u32_stream, ptx.load_v4_u32_nc, ptx.load_u32
    unpack4, store_u32, as_f32 = ptx.unpack_e4m3x4, ptx.store_u32, ptx.u32_as_f32
    as_u32 = ptx.f32_as_u32
    n_acc, n_x, n_w = tmax * ROWS, tmax * 16, ROWS * 4
    groups = WARPS // kw                                  # row groups a CTA serves at a time
    part_n = WARPS * n_acc if kw > 1 else 1
    max_n = 32 * WARPS if simulator else WARPS
    n_codes = FUSED_MAX_K // 4 if fused else 1
    n_keep = FUSED_MAX_K // (8 * 32 * WARPS) if fused else 1   # 16-byte x vectors a thread
    n_xk, n_scales = n_keep * 8, ROWS + tmax
    assert not fused or tmax == 1, "the fused form takes one token"
    assert not gated or ROWS == 4, "a gated group is gate rows j, j + 1 and up rows j, j + 1"
    early = EARLY_STEPS if pdl else 0
    prefetch = ptx.prefetch_l2

    def weight_row(row0, r, N):
        """The codes row of slot r of the group at row0: row0 + r, or (gated, N = 2I) gate
        rows j, j + 1 and up rows j, j + 1 for j = row0 / 2."""
        if gated:
            return (row0 >> 1) + (r & 1) + (r >> 1) * (N >> 1)
        return row0 + r
    weight_row = device(weight_row)

    def fp8_gemv_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, Kv):
        tid = cuda.threadIdx.x
        lane = tid & 31
        wid = tid >> 5
        if early > 0:                                     # the first steps' weights, to L2
            row0 = (cuda.blockIdx.x * groups + wid // kw) * ROWS
            if row0 < N:
                for step in range(early):
                    v = (wid % kw + step * kw) * 32 + lane
                    if v < Kv:
                        for r in range(ROWS):
                            prefetch(w_ptr + (weight_row(row0, r, N) * Kv + v) * 16)
        enter()
        xmax = cuda.shared.array(max_n, float32)          # fused: partial maxima
        xcodes = cuda.shared.array(n_codes, uint32)        # fused: the row's codes
        gmax = cuda.shared.array(33, float32)             # gated: the warps' maxima
        h = cuda.local.array(16, float32)
        xk = cuda.local.array(n_xk, float32)              # fused: this thread's activations
        scales = cuda.local.array(n_scales, float32)      # the rows' and tokens' scales
        s_x = float32(0.0)
        kpart = wid % kw                                  # which share of K this warp reads
        group = cuda.blockIdx.x * groups + wid // kw
        if fused:                # the row's |x| maximum, then x / scale -> e4m3, once a CTA
            mx = float32(0.0)                             # the row stays in registers between
            for j in range(n_keep):                       # the two passes (one read of it)
                v = tid + j * 32 * WARPS
                if v < 2 * Kv:
                    unpack_x(load_x(xq_ptr + v * 16), h)
                    for e in range(8):
                        xk[j * 8 + e] = h[e]
                        mx = max(mx, abs(h[e]))
            if simulator:
                xmax[tid] = mx
            else:
                k = 16
                while k > 0:
                    mx = max(mx, cuda.shfl_xor_sync(0xFFFFFFFF, mx, k))
                    k >>= 1
                if lane == 0:
                    xmax[wid] = mx
            cuda.syncthreads()
            t = float32(0.0)
            for i in range(max_n):
                t = max(t, xmax[i])
            s_x = max(t / float32(448.0), float32(1e-12))
            for j in range(n_keep):                       # 8 activations -> 2 words
                v = tid + j * 32 * WARPS
                if v < 2 * Kv:
                    for q in range(2):
                        o = j * 8 + 4 * q
                        xcodes[2 * v + q] = pack4(xk[o] / s_x, xk[o + 1] / s_x,
                                                  xk[o + 2] / s_x, xk[o + 3] / s_x)
            cuda.syncthreads()
        red = cuda.shared.array(red_n, float32)           # simulator: the warp sums
        part = cuda.shared.array(part_n, float32)         # split K: [warp, token x row] sums
        acc = cuda.local.array(n_acc, float32)            # [token, row] partial sums
        xf = cuda.local.array(n_x, float32)               # [token, 16] this step's inputs
        wv = cuda.local.array(n_w, uint32)                # [row, word] this step's weights
        wf = cuda.local.array(16, float32)
        pmax = float32(0.0)                               # gated: largest |product| stored
        ngroups = cuda.gridDim.x * groups
        # every warp runs the same number of rounds (block barriers below and in the simulator)
        rounds = (N // ROWS + ngroups - 1) // ngroups
        for rnd in range(rounds):
            row0 = (rnd * ngroups + group) * ROWS
            for i in range(n_acc):
                acc[i] = float32(0.0)
            writer = lane == 0 and kpart == 0
            if writer and row0 < N:                       # asked for now, used after the loop
                for r in range(ROWS):                     # (not a memory round trip there)
                    scales[r] = as_f32(load_u32(ws_ptr + weight_row(row0, r, N) * 4))
                for m in range(tmax):
                    if not fused and m < M:
                        scales[ROWS + m] = as_f32(load_u32(xs_ptr + m * 4))
            if row0 < N:
                v = kpart * 32 + lane
                while v < Kv:
                    for r in range(ROWS):                 # the loads first: ROWS in flight
                        w = load_w(w_ptr + (weight_row(row0, r, N) * Kv + v) * 16)
                        for q in range(4):
                            wv[r * 4 + q] = w[q]
                    for m in range(tmax):
                        if fused:                         # (one token) its codes, rounded above
                            for q in range(4):
                                a, b, c, d = unpack4(xcodes[4 * v + q])
                                xf[4 * q], xf[4 * q + 1], xf[4 * q + 2], xf[4 * q + 3] = \
                                    a, b, c, d
                        elif m < M:
                            x = load_x(xq_ptr + (m * Kv + v) * 16)
                            for q in range(4):
                                a, b, c, d = unpack4(x[q])
                                xf[m * 16 + 4 * q] = a
                                xf[m * 16 + 4 * q + 1] = b
                                xf[m * 16 + 4 * q + 2] = c
                                xf[m * 16 + 4 * q + 3] = d
                    for r in range(ROWS):
                        for q in range(4):
                            a, b, c, d = unpack4(wv[r * 4 + q])
                            wf[4 * q], wf[4 * q + 1], wf[4 * q + 2], wf[4 * q + 3] = a, b, c, d
                        for m in range(tmax):
                            s = acc[m * ROWS + r]
                            for e in range(16):
                                s += xf[m * 16 + e] * wf[e]
                            acc[m * ROWS + r] = s
                    v += 32 * kw
            for i in range(n_acc):
                acc[i] = lane_sum(acc[i], red, tid)
            if kw > 1:                                    # the group's warps meet
                if lane == 0:
                    for i in range(n_acc):
                        part[wid * n_acc + i] = acc[i]
                cuda.syncthreads()
                if lane == 0 and kpart == 0:
                    for j in range(1, kw):
                        for i in range(n_acc):
                            acc[i] += part[(wid + j) * n_acc + i]
                cuda.syncthreads()
            if gated and writer and row0 < N:            # gate j, j+1 and up j, j+1 rounded
                g0, g1 = unpack2(pack2(acc[0] * s_x * scales[0], acc[1] * s_x * scales[1]))
                u0, u1 = unpack2(pack2(acc[2] * s_x * scales[2], acc[3] * s_x * scales[3]))
                p = pack2(float32(g0 / (float32(1.0) + math.exp(-g0)) * u0),  # silu_and_mul's
                          float32(g1 / (float32(1.0) + math.exp(-g1)) * u1))  # arithmetic
                store_u32(y_ptr + row0, p)                # [1, I]: element row0 / 2, 2 bytes
                p0, p1 = unpack2(p)
                pmax = max(pmax, max(abs(p0), abs(p1)))
            elif writer and row0 < N:
                for m in range(tmax):
                    if m < M:
                        sx = s_x if fused else scales[ROWS + m]
                        out = y_ptr + (m * N + row0) * 2
                        for r in range(0, ROWS, 2):
                            y0 = acc[m * ROWS + r] * sx * scales[r]
                            y1 = acc[m * ROWS + r + 1] * sx * scales[r + 1]
                            store_u32(out + r * 2, pack2(y0, y1))

        if gated:                                         # the CTA's largest |product|
            block_max(pmax, gmax, xmax, tid, 32 * WARPS)  # (xmax: the simulator's slots)
            if tid == 0:
                store_u32(xs_ptr + cuda.blockIdx.x * 4, as_u32(gmax[32]))

    fp8_gemv_kernel.__name__ = f"fp8_gemv_{dt}_t{tmax}_k{kw}" + \
        ("", "_fused", "_gated")[form]
    return fp8_gemv_kernel
