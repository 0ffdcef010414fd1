"""FP8 tensor-core products for 5-16 tokens (decode at batch 5-16): y = (xq * xs) (codes * ws)^T.

The contract of `fp8_gemv.fp8_gemv_cuda`, for more tokens:

    y = fp8_mma_cuda(xq, xs, codes, ws, dtype)      # [M, N] in dtype (bf16 / fp16), M <= 64

xq [M, K] and codes [N, K] float8_e4m3fn, xs [M] and ws [N] float32; products summed in fp32 by
the tensor cores, scaled once, rounded once: `torch._scaled_mm`'s numbers with row-wise scales,
up to the order of the fp32 sums. A token's row does not depend on the other tokens.

Why: at a few tokens a linear layer is bound by reading its weights, and cuBLASLt's row-wise
FP8 GEMM reads the narrow ones well below the copy rate there (H100, 8-16 tokens: down
45-47 µs where this kernel takes 35-36; decode at batch 8 / 16 5.87 / 5.92 -> 5.49 / 5.70 ms a
step; benchmarks/RESULTS.md, FP8 tensor-core kernel). From 32 tokens cuBLASLt's Hopper kernels
(wgmma, native FP8) win: `parallel.fp8.MMA_MAX_TOKENS` is where the switch is.

How: `mma.sync.m16n8k16` on f16 operands converted from e4m3 in registers (exact). On sm_90
an e4m3 `mma.sync` is itself an f16 mma after the same conversions (its SASS: F2FP unpacks +
HMMA.16816), so writing them out costs nothing and lets each operand be converted once per step
instead of once per use. A warp owns 32 rows of `codes` (four tiles of 8) and a slice of K, and
walks it in 64-byte steps: each lane loads 16 bytes of each of its 4 rows
(`ld.global.nc.L1::no_allocate`) and 16 bytes of each token row it needs (through L1, which the
CTA's warps share), all for UNROLL steps before the first mma. Lane t's 16 bytes are
consecutive in memory where the fragments want k = 2t, 2t + 1 and 8 + 2t, 9 + 2t; a sum does
not care about the order of its terms, so both operands take the same permutation of k: four
mma's a step per tile of 16 tokens x 8 rows. The tokens' conversions are what grows with M
(each warp converts every token row), which is why the kernel stops paying at 32 tokens.

Split K: a layer of few rows (o and down of Llama-3-8B: 4,096 rows = 128 warps) leaves too few
weight loads in flight, so `split_k` cuts K into S slices until the grid has WARPS_PER_SM warps
an SM. Each warp stores its fp32 partial sums (a workspace of S x 64 x N, mostly in L2), counts
itself in a per-row-group counter, and the last of the S warps of a row group adds the S
partials in slice order (the same sums whatever order the warps finish in), scales, rounds,
stores, and sets the counter back to 0 for the next call (CUDA graphs replay it as is).
"""
from __future__ import annotations

import torch

from weavelm.kernels.common import DTYPES, remember, sm_count

MAX_TOKENS = 64
STEP = 64                       # bytes of K a warp step: 16 a lane
ROW_TILES = 4                   # tiles of 8 rows a warp: 32 rows
WARP_ROWS = ROW_TILES * 8
WARPS = 4                       # per CTA (all on the same K slice: they share the tokens in L1)
UNROLL = 4                      # steps of weight loads issued before the first is used ...
UNROLL_WIDE = 2                 # ... from 33 tokens (registers: 64 sums a lane at 64 tokens)
WARPS_PER_SM = 4                # split K until the grid has this many warps an SM ...
MAX_SPLIT = 8                   # ... in at most this many slices
EARLY_STEPS = 1                 # PDL builds: weights asked of L2 before the wait (fp8_gemv's)
SIGNATURE = "void(" + ", ".join(["uint64"] * 7 + ["int64"] * 4) + ")"
_plans: dict = {}
_work: dict = {}                # (a plain dict, never emptied: captured graphs point at these)


def supported(xq: torch.Tensor, codes: torch.Tensor, dtype) -> bool:
    M, K = xq.shape
    N = codes.shape[0]
    return (1 <= M <= MAX_TOKENS and K % STEP == 0 and N % 8 == 0 and dtype in DTYPES
            and dtype != torch.float32 and xq.is_contiguous() and codes.is_contiguous())


def unroll(tiles: int) -> int:
    return UNROLL if tiles <= 2 else UNROLL_WIDE


def split_k(N: int, K: int, sms: int) -> int:
    """K slices: enough that the grid has WARPS_PER_SM warps an SM (at most MAX_SPLIT, and
    at least UNROLL steps a slice). Of the layer's shape only, never of the tokens: a token's
    row then has the same sums at any batch size."""
    warps = -(-N // WARP_ROWS)
    s = -(-sms * WARPS_PER_SM // warps)
    return max(1, min(s, MAX_SPLIT, K // (STEP * UNROLL)))


def fp8_mma_cuda(xq, xs, codes, ws, dtype, out=None, splits: int | None = None) -> torch.Tensor:
    """Launcher (contract in the module doc; `supported` must hold; `splits` overrides
    `split_k`)."""
    M, K = xq.shape
    N = codes.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=dtype, device=xq.device)
    dev = max(xq.get_device(), 0)              # CPU (-1) only under the simulator
    S = splits or split_k(N, K, sm_count(dev))
    tiles = -(-M // 16)
    kern = _plan(DTYPES[dtype], tiles, dev)
    from weavelm.kernels import launcher
    work, counts = _workspace(N, S, launcher.stream_key(xq, dev))
    grid = -(-N // (WARP_ROWS * WARPS)) * S
    kern.launch(grid, 32 * WARPS, dev, xq.data_ptr(), xs.data_ptr(), codes.data_ptr(),
                ws.data_ptr(), out.data_ptr(), work.data_ptr(), counts.data_ptr(), M, N, K, S)
    return out


def _workspace(N: int, S: int, key: tuple):
    """(fp32 partials [S, 64, N], int32 counters a warp's row group) for layers of N rows."""
    from weavelm.kernels.launcher import split_k_workspace
    groups = -(-N // (WARP_ROWS * WARPS)) * WARPS            # every warp of the grid's rows
    return split_k_workspace(_work, (N,) + key, S * MAX_TOKENS * N, groups)


def _plan(dt: str, tiles: int, device: int):
    key = (dt, tiles, device)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        pdl, u = launcher.pdl_enabled(device), unroll(tiles)
        p = remember(_plans, key, launcher.kernel(
            ("fp8_mma", dt, tiles, u), lambda: _build_kernel(dt, tiles, u, pdl), SIGNATURE,
            max_threads=32 * WARPS, pdl=pdl))
    return p


cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


def _build_kernel(dt: str, tiles: int, steps_ahead: int, pdl: bool = False):
    global cuda
    from numba import float32, int32, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import pdl_entry, warp_mma_fn

    mma = warp_mma_fn("f16")
    cuda = numba_cuda()
    enter = pdl_entry(pdl)
    simulator = ptx.SIMULATOR
    pack2 = ptx.pack_bf16x2 if dt == "bf16" else ptx.pack_f16x2
    load_w, load_x, load_u32 = ptx.load_v4_u32_stream, ptx.load_v4_u32_nc, ptx.load_u32
    load_part, store_u32 = ptx.load_u32_volatile, ptx.store_u32
    as_f32, as_u32 = ptx.u32_as_f32, ptx.f32_as_u32
    count = ptx.atomic_add_acq_rel_sys_u32
    to_f16 = ptx.e4m3x4_to_f16x2
    prefetch = ptx.prefetch_l2
    n_acc = tiles * ROW_TILES * 4                         # [token tile, row tile, 4]
    n_a = steps_ahead * tiles * 8                         # [step, token tile, rows g, g+8]
    n_hw = ROW_TILES * 8
    n_w = steps_ahead * ROW_TILES * 4                          # [step, row tile, word]
    n_frag = 32 * WARPS * 6 if simulator else 1
    n_cd = 32 * WARPS * 4 if simulator else 1
    early = EARLY_STEPS if pdl else 0

    def fp8_mma_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, work_ptr, cnt_ptr, M, N, K, S):
        tid = cuda.threadIdx.x
        lane, wid = tid & 31, tid >> 5
        g, t = lane >> 2, lane & 3
        ctas_n = (N + WARP_ROWS * WARPS - 1) // (WARP_ROWS * WARPS)
        ks = cuda.blockIdx.x // ctas_n                    # this CTA's slice of K
        rg = (cuda.blockIdx.x % ctas_n) * WARPS + wid      # this warp's group of 32 rows
        r0 = rg * WARP_ROWS
        steps = K // STEP
        s0, s1 = ks * steps // S, (ks + 1) * steps // S
        if early > 0:                                     # the first weights, to L2
            for j in range(ROW_TILES):
                row = r0 + j * 8 + g
                if row < N:
                    for e in range(early):
                        if s0 + e < s1:
                            prefetch(w_ptr + row * K + (s0 + e) * STEP + t * 16)
        enter()
        frag = cuda.shared.array(n_frag, uint32)          # simulator: the lanes' fragments
        cd = cuda.shared.array(n_cd, float32)             # simulator: their sums
        bcast = cuda.shared.array(WARPS, int32)          # simulator: lane 0's count
        acc = cuda.local.array(n_acc, float32)
        wv = cuda.local.array(n_w, uint32)
        av = cuda.local.array(n_a, uint32)                # [step, token tile, 8 words]
        hw = cuda.local.array(n_hw, uint32)               # a step's weights in f16 [tile, 8]
        ha = cuda.local.array(8, uint32)                  # token row g's 16 bytes in f16
        hb = cuda.local.array(8, uint32)                  # and row g + 8's
        for i in range(n_acc):
            acc[i] = float32(0.0)
        s = s0
        while s < s1:
            for u in range(steps_ahead):                       # the weight loads first
                for j in range(ROW_TILES):
                    row = r0 + j * 8 + g
                    o = (u * ROW_TILES + j) * 4
                    if s + u < s1 and row < N:
                        w = load_w(w_ptr + row * K + (s + u) * STEP + t * 16)
                        wv[o], wv[o + 1], wv[o + 2], wv[o + 3] = w[0], w[1], w[2], w[3]
                    else:
                        wv[o], wv[o + 1], wv[o + 2], wv[o + 3] = 0, 0, 0, 0
            for u in range(steps_ahead):                  # then the tokens' (L1 / L2), so
                for mt in range(tiles):                   # no load waits inside the mma's
                    o = (u * tiles + mt) * 8
                    kb = (s + u) * STEP + t * 16
                    m = mt * 16 + g
                    if s + u < s1 and m < M:
                        x = load_x(xq_ptr + m * K + kb)
                        av[o], av[o + 1], av[o + 2], av[o + 3] = x[0], x[1], x[2], x[3]
                    else:
                        av[o], av[o + 1], av[o + 2], av[o + 3] = 0, 0, 0, 0
                    if s + u < s1 and m + 8 < M:
                        x = load_x(xq_ptr + (m + 8) * K + kb)
                        av[o + 4], av[o + 5], av[o + 6], av[o + 7] = x[0], x[1], x[2], x[3]
                    else:
                        av[o + 4], av[o + 5], av[o + 6], av[o + 7] = 0, 0, 0, 0
            for u in range(steps_ahead):
                if s + u < s1:                            # the same for the whole CTA
                    for j in range(ROW_TILES):            # weights to f16, once a step
                        o = (u * ROW_TILES + j) * 4
                        for q in range(4):
                            hw[j * 8 + 2 * q], hw[j * 8 + 2 * q + 1] = to_f16(wv[o + q])
                    for mt in range(tiles):
                        x = (u * tiles + mt) * 8          # av[x..x+3]: token row g, x+4..: g+8
                        for q in range(4):
                            ha[2 * q], ha[2 * q + 1] = to_f16(av[x + q])
                            hb[2 * q], hb[2 * q + 1] = to_f16(av[x + 4 + q])
                        for j in range(ROW_TILES):
                            a = (mt * ROW_TILES + j) * 4
                            c0, c1, c2, c3 = acc[a], acc[a + 1], acc[a + 2], acc[a + 3]
                            # mma i takes the lane's bytes 4i, 4i + 1 as k = 2t, 2t + 1 and
                            # 4i + 2, 4i + 3 as k = 8 + 2t, 9 + 2t (rows g, g + 8 alike)
                            for i in range(4):
                                c0, c1, c2, c3 = mma(ha[2 * i], hb[2 * i], ha[2 * i + 1],
                                                     hb[2 * i + 1], hw[j * 8 + 2 * i],
                                                     hw[j * 8 + 2 * i + 1], c0, c1, c2, c3,
                                                     frag, cd, tid)
                            acc[a], acc[a + 1], acc[a + 2], acc[a + 3] = c0, c1, c2, c3
            s += steps_ahead

        # acc[(mt, j, i)]: token mt * 16 + g + 8 * (i >> 1), row r0 + 8j + 2t + (i & 1)
        last = True
        if S > 1:
            for mt in range(tiles):
                for j in range(ROW_TILES):
                    for i in range(4):
                        m = mt * 16 + g + 8 * (i >> 1)
                        n = r0 + j * 8 + 2 * t + (i & 1)
                        if m < M and n < N:
                            store_u32(work_ptr + ((ks * M + m) * N + n) * 4,
                                      as_u32(acc[(mt * ROW_TILES + j) * 4 + i]))
            cuda.threadfence()
            if not simulator:                             # every lane's stores before the count
                cuda.syncwarp()
            old = int32(0)
            if lane == 0:
                old = int32(count(cnt_ptr + rg * 4, 1))
            if simulator:
                if lane == 0:
                    bcast[wid] = old
                cuda.syncthreads()
                old = bcast[wid]
            else:
                old = cuda.shfl_sync(0xFFFFFFFF, old, 0)
                cuda.syncwarp()                           # (shuffles do not order memory)
            last = old == S - 1
            if last:                                      # every slice's partials, in order
                cuda.threadfence()
                for i in range(n_acc):
                    acc[i] = float32(0.0)
                for k in range(S):                        # (constant indices below: the sums
                    for mt in range(tiles):               # stay in registers)
                        for j in range(ROW_TILES):
                            for i in range(4):
                                m = mt * 16 + g + 8 * (i >> 1)
                                n = r0 + j * 8 + 2 * t + (i & 1)
                                if m < M and n < N:
                                    acc[(mt * ROW_TILES + j) * 4 + i] += as_f32(
                                        load_part(work_ptr + ((k * M + m) * N + n) * 4))
                if lane == 0:
                    store_u32(cnt_ptr + rg * 4, 0)
        if last:
            for j in range(ROW_TILES):
                n = r0 + j * 8 + 2 * t
                if n < N:
                    w0 = as_f32(load_u32(ws_ptr + n * 4))
                    w1 = as_f32(load_u32(ws_ptr + n * 4 + 4))
                    for mt in range(tiles):
                        for h in range(2):
                            m = mt * 16 + g + 8 * h
                            if m < M:
                                sx = as_f32(load_u32(xs_ptr + m * 4))
                                a = (mt * ROW_TILES + j) * 4 + 2 * h
                                store_u32(y_ptr + (m * N + n) * 2,
                                          pack2(acc[a] * sx * w0, acc[a + 1] * sx * w1))

    fp8_mma_kernel.__name__ = f"fp8_mma_{dt}_t{tiles}_u{steps_ahead}"
    return fp8_mma_kernel
