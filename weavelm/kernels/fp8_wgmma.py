"""FP8 products on Hopper's warpgroup tensor cores for 16-64 tokens (decode at batch 16-64).

The contract of `fp8_mma.fp8_mma_cuda`:

    y = fp8_wgmma_cuda(xq, xs, codes, ws, dtype)     # [M, N] in dtype (bf16 / fp16), M <= 64

xq [M, K] and codes [N, K] float8_e4m3fn, xs [M] and ws [N] float32; products summed by the
tensor cores 128 of K at a time (their FP8 accumulation keeps ~14 bits) and those sums added in
fp32, scaled once, rounded once.

Why: at 16-64 tokens a layer is bound by reading its weights, and neither cuBLASLt's row-wise
FP8 GEMM (`_scaled_mm`: 0.52-0.63 of the copy rate for Llama-3-8B's down projection at 16-64
tokens, its 128 x 128 tiles leave the 4,096-row layers 32 CTAs) nor `fp8_mma` (sm_90 has no
FP8 `mma.sync`: its operands go through f16, and every warp converts every token row) keeps
the copy rate there (benchmarks/RESULTS.md, FP8 tensor-core kernel). `wgmma` takes e4m3
operands natively.

How ("swap AB"): the weights are the product's A (64 rows a warpgroup, M = 64), the tokens its
B (N = n, the tokens rounded up to 8), so the instruction is as wide as the batch.
* A from registers, straight from global memory: in a step of 128 bytes of K a thread loads
  bytes 16q..16q+15 and 64+16q..64+16q+15 of each of its two rows (g and g + 8 of its warp's
  16), so each load instruction reads whole sectors (64 bytes a row: the weights bypass L1, a
  half-read sector would be fetched from L2 twice). The fragment wants k = 4q..4q+3 (a0) and
  16+4q..16+4q+3 (a2) of each k32 product; a sum does not care about the order of its terms,
  so product i takes the thread's words 2i and 2i + 1 (of the 8 it loaded, in order) as those,
  and the tokens are laid out in shared memory under the same permutation of k.
* B from shared memory (K-major, no swizzle: 8 x 16-byte core matrices), AHEAD + 1 steps of
  the tokens in a ring of buffers, copied there by the CTA's threads in 4-byte `cp.async`s
  (no registers held while they fly: `stage_tokens`, issued with the next step's weight
  loads) and read by the tensor cores after the wait, `fence.proxy.async` and a barrier. The
  CTA's two warpgroups share the copy.
* Steps in flight: the weights of AHEAD steps past the one in use are in registers (a ring of
  AHEAD + 1 slots, the loop unrolled over it so that every slot index is a constant) and their
  tokens in shared memory (as many buffers, one `cp.async` group a step, waited for one step
  before use): AHEAD = 2 holds 16 more registers a thread and, with two CTAs an SM, ~48 KB of
  weight loads in flight an SM instead of ~32.
* Split K as in `fp8_mma`: S slices (of the layer's shape only, never of the tokens); each
  CTA stores fp32 partials, counts itself, and the last of a row group's S CTAs adds them in
  slice order, scales, rounds and stores (a counter back at 0 for the next call).
"""
from __future__ import annotations

import torch

from weavelm.kernels.common import DTYPES, remember, sm_count

MIN_TOKENS, MAX_TOKENS = 1, 64
STEP = 128                      # bytes of K a step: four k32 products
WG_ROWS = 64                    # weight rows a warpgroup
WGS = 2                         # warpgroups a CTA (they share the tokens' copy)
CTA_ROWS = WG_ROWS * WGS
THREADS = 128 * WGS
AHEAD = 1                       # steps of weights (registers) and tokens in flight past the
                                # one in use (2: more bytes in flight, 16 registers more)
CTAS_PER_SM = 2                 # split K until the grid has this many CTAs an SM ...
MAX_SPLIT = 8                   # ... in at most this many slices
SIGNATURE = "void(" + ", ".join(["uint64"] * 7 + ["int64"] * 4) + ")"
_plans: dict = {}
_work: dict = {}                # (never emptied: captured graphs point at these)


def supported(xq: torch.Tensor, codes: torch.Tensor, dtype) -> bool:
    M, K = xq.shape
    N = codes.shape[0]
    return (MIN_TOKENS <= M <= MAX_TOKENS and K % STEP == 0 and N % 8 == 0
            and dtype in DTYPES and dtype != torch.float32 and xq.is_contiguous()
            and codes.is_contiguous())


def split_k(N: int, K: int, sms: int) -> int:
    """K slices: enough that the grid has CTAS_PER_SM CTAs an SM (at most MAX_SPLIT, at least
    one step a slice). Of the layer's shape only: a token's sums do not depend on the batch."""
    ctas = -(-N // CTA_ROWS)
    s = -(-sms * CTAS_PER_SM // ctas)
    return max(1, min(s, MAX_SPLIT, K // STEP))


def fp8_wgmma_cuda(xq, xs, codes, ws, dtype, out=None, splits: int | None = None):
    """Launcher (contract in the module doc; `supported` must hold; `splits` overrides
    `split_k`)."""
    M, K = xq.shape
    N = codes.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=dtype, device=xq.device)
    dev = max(xq.get_device(), 0)              # CPU (-1) only under the simulator
    S = splits or split_k(N, K, sm_count(dev))
    kern = _plan(DTYPES[dtype], -(-M // 8), dev)
    from weavelm.kernels import launcher
    work, counts = _workspace(N, S, launcher.stream_key(xq, dev))
    grid = -(-N // CTA_ROWS) * S
    kern.launch(grid, THREADS, dev, xq.data_ptr(), xs.data_ptr(), codes.data_ptr(),
                ws.data_ptr(), out.data_ptr(), work.data_ptr(), counts.data_ptr(), M, N, K, S)
    return out


def _workspace(N: int, S: int, key: tuple):
    """(fp32 partials [S, 64, N], int32 counters a CTA row group) for layers of N rows."""
    from weavelm.kernels.launcher import split_k_workspace
    return split_k_workspace(_work, (N,) + key, S * MAX_TOKENS * N, -(-N // CTA_ROWS))


def _plan(dt: str, n8: int, device: int):
    key = (dt, n8, AHEAD, device)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        pdl = launcher.pdl_enabled(device)
        p = remember(_plans, key, launcher.kernel(
            ("fp8_wgmma", dt, n8, AHEAD), lambda: _build_kernel(dt, n8, pdl, AHEAD), SIGNATURE,
            max_threads=THREADS, min_blocks=CTAS_PER_SM, pdl=pdl))
    return p


def warpgroup_steps_fn(n: int):
    """steps(acc, wa, o, d0, d1, d2, d3, frag, cd, tok, tid): `ptx_wgmma.wgmma_fp8_steps(n)`
    on the weight words wa[o:o + 16] (row g: words 0-7, row g + 8: 8-15; product i takes words
    2i, 2i + 1 of each), B at descriptors d0-d3, its fresh sums added to the thread's fp32
    accumulators acc [n / 2] (the products' own accumulation keeps ~14 bits: 128 of K at a
    time, as CUTLASS's FP8 main loop). Under the
    simulator the threads leave their fragments in frag / cd between barriers and thread 0 of
    each warpgroup runs the model, so every thread of the CTA must call it alike."""
    from weavelm.kernels import ptx, ptx_wgmma
    from weavelm.kernels.common import device

    acc = n // 2
    if ptx.SIMULATOR:
        from numba import float32
        model = ptx_wgmma.sim_wgmma_fp8_steps

        def steps_sim(c, wa, o, d0, d1, d2, d3, frag, cd, tok, tid):
            for i in range(4):
                frag[tid * 16 + 4 * i:tid * 16 + 4 * i + 4] = (
                    wa[o + 2 * i], wa[o + 8 + 2 * i], wa[o + 2 * i + 1], wa[o + 9 + 2 * i])
            cuda.syncthreads()
            if tid & 127 == 0:
                model(frag, cd, tok, (d0, d1, d2, d3), n, tid)
            cuda.syncthreads()
            for v in range(acc):
                c[v] = float32(c[v] + cd[tid * acc + v])
            cuda.syncthreads()
        return device(steps_sim)

    hw = ptx_wgmma.wgmma_fp8_steps(n)
    words = ", ".join(f"wa[o + {2 * i}], wa[o + {8 + 2 * i}], wa[o + {2 * i + 1}], "
                      f"wa[o + {9 + 2 * i}]" for i in range(4))
    src = (f"def steps_hw(c, wa, o, d0, d1, d2, d3, frag, cd, tok, tid):\n"
           f"    r = hw({words}, d0, d1, d2, d3, 1)\n"
           + "".join(f"    c[{v}] += r[{v}]\n" for v in range(acc)))
    ns = {"hw": hw}
    exec(src, ns)                                  # constant indices: all in registers
    return device(ns["steps_hw"])


def _numba_cuda():
    from weavelm.kernels._numba_compat import numba_cuda
    return numba_cuda()


cuda = None  # numba.cuda, bound by the builder: a module global, so the simulator can swap it


def _build_kernel(dt: str, n8: int, pdl: bool = False, ahead: int = 1):
    global cuda
    from numba import float32, int32, uint32, uint64

    from weavelm.kernels import ptx, ptx_wgmma
    from weavelm.kernels.common import device, pdl_entry

    cuda = _numba_cuda()
    enter = pdl_entry(pdl)
    simulator = ptx.SIMULATOR
    n = 8 * n8                                            # the product's width: tokens, padded
    acc_n = n // 2
    steps4 = warpgroup_steps_fn(n)
    pack2 = ptx.pack_bf16x2 if dt == "bf16" else ptx.pack_f16x2
    load_w, load_u32, prefetch = ptx.load_v4_u32_stream, ptx.load_u32, ptx.prefetch_l2
    load_part, store_u32 = ptx.load_u32_volatile, ptx.store_u32
    as_f32, as_u32 = ptx.u32_as_f32, ptx.f32_as_u32
    count = ptx.atomic_add_acq_rel_sys_u32
    fence_async = ptx_wgmma.fence_proxy_async_shared
    cp_async, commit = ptx_wgmma.cp_async_4, ptx_wgmma.cp_async_commit
    wait_keep, wait_all = ptx_wgmma.cp_async_wait(ahead - 1), ptx_wgmma.cp_async_wait(0)
    shared_address = ptx_wgmma.shared_address
    chunks = n * 8                                        # 16-byte token chunks a step
    per_thread = -(-chunks // THREADS)
    buf_words = n * 32                                    # a step of tokens: n x 128 bytes
    ring = ahead + 1                                      # steps held: the one in use + ahead
    tok_words = ring * buf_words
    ring_words = ring * 16
    lbo = n8 * 128                                        # between a product's two k halves
    product_bytes = 2 * lbo                               # between a step's products
    fields = uint64(((lbo >> 4) << 16) | ((128 >> 4) << 32))   # SBO: 8 rows of 16 bytes
    n_frag = THREADS * 16 if simulator else 1
    n_cd = THREADS * acc_n if simulator else 1
    n_x = THREADS if simulator else 1

    if simulator:                                          # (no alignment in the simulator)
        def token_buffers():
            return cuda.shared.array(tok_words, uint32)
    else:                                                  # descriptors drop 4 address bits
        def token_buffers():
            return cuda.shared.array(tok_words, uint32, alignment=128)
    token_buffers = device(token_buffers)

    def load_weights(w_ptr, dst, slot, row_a, q, s, N, K):
        """The thread's 2 x 16 bytes of rows row_a and row_a + 8 in step s (0 past the last)."""
        for h in range(2):
            row = row_a + 8 * h
            for u in range(2):
                if row < N:
                    w = load_w(w_ptr + row * K + s * STEP + u * 64 + q * 16)
                    for e in range(4):
                        dst[slot * 16 + h * 8 + u * 4 + e] = w[e]
                else:
                    for e in range(4):
                        dst[slot * 16 + h * 8 + u * 4 + e] = 0

    if simulator:                                          # copies at once, in the thread
        def copy4(tok, at, src, size):
            tok[at >> 2] = load_u32(src) if size > 0 else uint32(0)
    else:
        def copy4(tok, at, src, size):
            cp_async(shared_address(tok) + at, src, size)
    copy4 = device(copy4)

    def stage_tokens(tok, xq_ptr, tid, dst, s, M, K):
        """The tokens' step s into buffer dst, in 4-byte copies (zeros past the last token).
        Word e of 16-byte chunk `part` = 4u + q' of a token's step is word 4u + e of thread q'
        in `load_weights`: product i = 2u + e // 2, k half e % 2, so it goes to that product's
        half, the core matrix of its 8 tokens, byte 4 q' of its row."""
        for j in range(per_thread):
            c = tid + j * THREADS
            m, part = c >> 3, c & 7
            if c < chunks:
                size = 4 if m < M else 0
                src = xq_ptr + (m * K + s * STEP + part * 16 if m < M else 0)
                for e in range(4):
                    at = (dst * buf_words * 4 + (2 * (part >> 2) + (e >> 1)) * product_bytes
                          + (e & 1) * lbo + (m >> 3) * 128 + (m & 7) * 16 + (part & 3) * 4)
                    copy4(tok, at, src + e * 4, size)

    def staged(more):
        """This thread's copies of the step after the one just used are done, to be seen by
        the tensor cores after the next barrier: all but the `ahead - 1` newest groups where
        `more` (a group went out for every step ahead), else all."""
        if more:
            wait_keep()
        else:
            wait_all()
        fence_async()

    def desc(o):
        return fields | uint64((o >> 4) & 0x3FFF)

    load_weights, stage_tokens = device(load_weights), device(stage_tokens)
    staged, desc = device(staged), device(desc)

    def fp8_wgmma_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, work_ptr, cnt_ptr, M, N, K, S):
        tid = cuda.threadIdx.x
        wt, lane = tid & 127, tid & 31
        g, q = lane >> 2, lane & 3
        ctas_n = (N + CTA_ROWS - 1) // CTA_ROWS
        ks = cuda.blockIdx.x // ctas_n                    # this CTA's slice of K
        cg = cuda.blockIdx.x % ctas_n                     # and its group of rows
        row_a = cg * CTA_ROWS + (tid >> 7) * WG_ROWS + (wt >> 5) * 16 + g
        steps = K // STEP
        s0, s1 = ks * steps // S, (ks + 1) * steps // S
        if pdl:                                           # the first weights, to L2 during the
            for h in range(2):                            # kernel before (as fp8_mma's)
                if row_a + 8 * h < N:
                    for u in range(2):
                        prefetch(w_ptr + (row_a + 8 * h) * K + s0 * STEP + u * 64 + q * 16)
        enter()
        tok = token_buffers()                             # `ring` steps of tokens
        frag = cuda.shared.array(n_frag, uint32)          # simulator: the threads' fragments
        cd = cuda.shared.array(n_cd, float32)             # simulator: their sums
        xch = cuda.shared.array(n_x, float32)             # simulator: the pair exchange
        bcast = cuda.shared.array(1, int32)
        acc = cuda.local.array(acc_n, float32)
        wring = cuda.local.array(ring_words, uint32)      # weight words, a slot a step
        for a in range(n8):                               # (small nested loops: unrolled,
            for v in range(4):                            # so every array stays in registers)
                acc[4 * a + v] = float32(0.0)
        base = shared_address(tok)
        for r in range(ahead):                            # the first steps (s0 < s1: S <= steps)
            if s0 + r < s1:
                load_weights(w_ptr, wring, r, row_a, q, s0 + r, N, K)
                stage_tokens(tok, xq_ptr, tid, r, s0 + r, M, K)
                commit()
        staged(s0 + ahead - 1 < s1)                       # step s0's in place
        cuda.syncthreads()
        s = s0
        while s < s1:                                     # step s + r in slot r (unrolled, so
            for r in range(ring):                         # the slots stay in registers)
                if s + r < s1:
                    nxt = s + r + ahead
                    slot = (r + ahead) % ring             # the slot read a step ago
                    if nxt < s1:                          # its next loads first
                        stage_tokens(tok, xq_ptr, tid, slot, nxt, M, K)
                        commit()
                        load_weights(w_ptr, wring, slot, row_a, q, nxt, N, K)
                    o = base + r * (buf_words * 4)
                    steps4(acc, wring, r * 16, desc(o), desc(o + product_bytes),
                           desc(o + 2 * product_bytes), desc(o + 3 * product_bytes),
                           frag, cd, tok, tid)
                    staged(nxt < s1)                      # step s + r + 1's in place
                    cuda.syncthreads()
            s += ring

        # acc[v]: row row_a + 8 (v >> 1 & 1), token 8 (v >> 2) + 2 q + (v & 1)
        last = True
        if S > 1:
            for a in range(n8):
                for v in range(4):
                    m = 8 * a + 2 * q + (v & 1)
                    row = row_a + 8 * (v >> 1)
                    if m < M and row < N:
                        store_u32(work_ptr + ((ks * M + m) * N + row) * 4, as_u32(acc[4 * a + v]))
            cuda.threadfence()
            cuda.syncthreads()                            # every partial before the count
            if tid == 0:
                bcast[0] = int32(count(cnt_ptr + cg * 4, 1))
            cuda.syncthreads()
            last = bcast[0] == S - 1
            if last:                                      # every slice's partials, in order
                cuda.threadfence()
                for a in range(n8):
                    for v in range(4):
                        acc[4 * a + v] = float32(0.0)
                for k in range(S):
                    for a in range(n8):
                        for v in range(4):
                            m = 8 * a + 2 * q + (v & 1)
                            row = row_a + 8 * (v >> 1)
                            if m < M and row < N:
                                acc[4 * a + v] += as_f32(load_part(
                                    work_ptr + ((k * M + m) * N + row) * 4))
                if tid == 0:
                    store_u32(cnt_ptr + cg * 4, 0)
        if last:
            # pairs of rows (g, g + 1) of one token to a thread: the even-g thread of a pair
            # stores token 2q's, the odd one token 2q + 1's, each as one 4-byte word
            odd = g & 1
            pick = uint32(0xFFFFFFFF) * uint32(odd)       # all ones where odd
            for a in range(n8):
                for h in range(2):
                    v = 4 * a + 2 * h
                    # (a select of bits: `acc[v] if odd else acc[v + 1]` becomes a dynamic
                    # index, and the whole array goes to local memory)
                    send = as_f32((as_u32(acc[v]) & pick) | (as_u32(acc[v + 1]) & ~pick))
                    if simulator:
                        xch[tid] = send
                        cuda.syncthreads()
                        got = xch[tid ^ 4]
                        cuda.syncthreads()
                    else:
                        got = cuda.shfl_xor_sync(0xFFFFFFFF, send, 4)
                    m = 8 * a + 2 * q + odd
                    r0 = row_a + 8 * h - odd
                    lo = got if odd else acc[v]
                    hi = acc[v + 1] if odd else got
                    if m < M and r0 < N:
                        sx = as_f32(load_u32(xs_ptr + m * 4))
                        w0 = as_f32(load_u32(ws_ptr + r0 * 4))
                        w1 = as_f32(load_u32(ws_ptr + r0 * 4 + 4))
                        store_u32(y_ptr + (m * N + r0) * 2, pack2(lo * sx * w0, hi * sx * w1))

    fp8_wgmma_kernel.__name__ = f"fp8_wgmma_{dt}_n{n}"
    return fp8_wgmma_kernel
