"""The fused all-reduce + residual add + RMSNorm kernel: one body for both transports.

Host side (plans, launchers, the barrier protocol): `allreduce_norm.py`; transports:
`allreduce_norm_transport.py`; barriers: `allreduce_norm_sync.py`.
"""
from __future__ import annotations

import math

from weavelm.kernels.allreduce_norm_sync import make_sync
from weavelm.kernels.allreduce_norm_transport import make_transport
from weavelm.kernels.common import ELEMS, MAX_BLOCK, codec

cuda = None  # numba.cuda, bound by make_fused_kernel: a module global, so the simulator can swap it


def rows_per_iter(kind: str, dt: str, world: int, vpt: int, has_residual: bool = True) -> int:
    """R, the token rows one CTA iteration of the fused kernel loads before it uses any.

    The loads of an iteration (R * vpt vectors x N ranks for p2p, x 1 for multimem) are all in
    flight at once, their words held in registers until used, and the R rows' fp32 values stay
    in registers across the block reduction; at 512 threads a thread has 128 registers. Largest
    power of two R <= 8 with loads + vpt * (ranks loaded) <= 20 (the second term: the hoisted
    per-rank 64-bit addresses) and R * vpt * E <= 32, checked against ptxas (no spills) in
    tests/kernels/test_allreduce_norm_ptx.py. p2p, 4 ranks: hidden 4096 bf16 (vpt 1) R = 4;
    hidden 5120-8192 (vpt 2) R = 1 (8 peer loads in flight; R = 2 needs 2 more registers than
    there are with the residual).
    """
    epv = ELEMS[dt]
    nl = world if kind == "p2p" else 1
    r = 8
    while r > 1 and (r * vpt * nl + vpt * nl > 20 or r * vpt * epv > 32):
        r //= 2
    return r


def make_fused_kernel(kind: str, dt: str, world: int, vpt: int, push: bool, has_residual: bool,
                      rows: int | None = None, scatter: bool = False):
    """The fused all-reduce + residual + RMSNorm kernel (Python function, not yet jitted).

    push=True  ("sharded", TokenWeave): rows [row_start, row_start + n_rows) are this rank's;
               the normalised rows go to every rank's buffer in place (x_off + row * row_bytes).
    push=False ("one-shot"): every rank does all rows and writes them to its local `out_ptr`.
    Residual rows are at res_ptr + (row - row_start) * row_bytes (updated in place).

    scatter=True (p2p, push only): NVLink carries only stores. Phase 0: each rank stores its
    partials of every peer's rows into that peer's inbox (slot = this rank: inbox_off +
    (rank * max_rows + local row) * row_bytes); barrier 1 then means "every peer's partials of
    my rows are in my inbox", and A reads them locally. Remote loads must wait a round trip, so
    a few CTAs keep too few in flight to fill NVLink (benchmarks/probe_p2p_bandwidth.py); stores
    need no registers while in flight. Local row i of every rank is handled by CTA i mod G on
    every rank, so the per-CTA barriers order each inbox row's write before its read. An inbox
    is rewritten only by the next launch, which starts after the end barrier, when every rank
    has read its inbox.

    CTA b handles rows b, b + G, b + 2G, ... (G = gridDim.x), R = `rows` of them per iteration
    (default `rows_per_iter`): rows r, r + G, ..., r + (R-1)G. An iteration
      A. issues every load of its R rows (peers' partials via the transport) into registers
         before it uses any: R * vpt * N 16-byte loads in flight per thread;
      B. loads the residual, reduces over ranks, adds the residual (stored back), sums
         squares per row;
      C. one block reduction for all R rows (one __syncthreads; double-buffered shared words);
      D. normalises and stores (push: to every rank) each row.
    Software-pipelined: A of the next iteration is issued right after B (its registers are free
    once B consumed them), so its loads fly during this iteration's C and D; a CTA no longer
    waits a full remote round trip per iteration (the gain: benchmarks/HISTORY.md, round 3).
    Row r goes to the same CTA as with R = 1; missing rows (past n_rows) are skipped.
    """
    global cuda
    from numba import float32, int64, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    if scatter and (kind != "p2p" or not push):
        raise ValueError("scatter is a p2p push-mode variant")
    load_issue, load_reduce, store_all, signal_all, epv, nw = make_transport(kind, dt, world,
                                                                             scatter)
    prologue, barrier, epilogue = make_sync(signal_all, world)
    cuda = numba_cuda()
    unpack, pack, _ = codec(dt)
    R = rows if rows is not None else rows_per_iter(kind, dt, world, vpt, has_residual)
    simulator = ptx.SIMULATOR
    sim_slots = 2 * R * MAX_BLOCK if simulator else 1
    nslot = R * vpt                  # (row, vector) pairs of one iteration
    nws = 2 * R * 32
    # A issues all R * vpt * N loads up front while they fit the registers (the budget of
    # rows_per_iter); beyond (e.g. hidden 16384 bf16 at 4+ ranks) each vector's N loads are
    # issued just before their use, as with one load_reduce
    nl = world if kind == "p2p" else 1
    early = (R + 1) * vpt * nl <= 20
    nbuf = nslot * epv
    nraw = nslot * nw
    nres = vpt * 4 if has_residual else 1
    SR = max(1, 4 // vpt) if scatter else 1   # rows per step of the scatter phase
    nsc = SR * vpt * 4
    n = world
    load_nc, load, store = ptx.load_v4_u32_nc, ptx.load_v4_u32, ptx.store_v4_u32
    ld64 = ptx.load_u64_nc

    def fused_allreduce_rmsnorm(tab, my_base, mc, rank, x_off, sig, res_ptr, w_ptr, out_ptr,
                                row_start, n_rows, n_vec, eps, timeout_ns, err_host, inbox_off,
                                n_total):
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        ctl = cuda.shared.array(2, int64)
        # [parity][row k][warp]: warp partials; two buffers alternate between iterations, so an
        # iteration's writes never meet the previous one's reads (its __syncthreads lies between)
        warp_sums = cuda.shared.array(nws, float32)
        thread_sums = cuda.shared.array(sim_slots, float32)  # simulator only
        ptrs = cuda.local.array(n, int64)
        raw = cuda.local.array(nraw, uint32)   # loaded words of the iteration (registers)
        rsw = cuda.local.array(nres, uint32)   # loaded residual words
        scw = cuda.local.array(nsc, uint32)    # scatter phase: words in flight
        h = cuda.local.array(nbuf, float32)    # h = sum + residual (fp32) of every slot
        ss = cuda.local.array(R, float32)
        rstd = cuda.local.array(R, float32)
        a = cuda.local.array(epv, float32)
        b = cuda.local.array(epv, float32)
        if prologue(tab, ptrs, my_base, sig, ctl):
            return
        row_bytes = n_vec * 16
        grid = cuda.gridDim.x
        if scatter:
            # Phase 0: my partials of peer j's rows -> slot `rank` of j's inbox (stores only)
            per, extra = n_total // n, n_total % n
            max_rows = per + (1 if extra > 0 else 0)
            in_stride = max_rows * row_bytes
            for q in range(1, n):
                # peers in rotating order (rank + q): at each step every rank sends to a
                # different one, not all to rank 0 first. The base comes from the global table:
                # a run-time index into ptrs would move ptrs to local memory.
                jr = rank + q
                if jr >= n:
                    jr -= n
                j_start = jr * per + min(jr, extra)
                j_rows = per + (1 if jr < extra else 0)
                src = my_base + x_off + j_start * row_bytes
                dst = ld64(tab + jr * 8) + inbox_off + rank * in_stride
                i = cuda.blockIdx.x
                while i < j_rows:
                    # SR rows' vectors loaded before any is stored: several local loads in
                    # flight per thread (stores need no registers once issued)
                    for k in range(SR):
                        ik = i + k * grid
                        if ik < j_rows:
                            for j in range(vpt):
                                v = tid + j * nthreads
                                if v < n_vec:
                                    w = load(src + ik * row_bytes + v * 16)
                                    sc = 4 * (k * vpt + j)
                                    scw[sc] = w[0]
                                    scw[sc + 1] = w[1]
                                    scw[sc + 2] = w[2]
                                    scw[sc + 3] = w[3]
                    for k in range(SR):  # then every store, in the same (row, vector) order
                        ik = i + k * grid
                        if ik < j_rows:
                            row_dst = dst + ik * row_bytes
                            for j in range(vpt):
                                v = tid + j * nthreads
                                if v < n_vec:
                                    sc = 4 * (k * vpt + j)
                                    store(row_dst + v * 16, scw[sc], scw[sc + 1], scw[sc + 2],
                                          scw[sc + 3])
                    i += SR * grid
        else:
            in_stride = 0
        in_base = my_base + inbox_off
        # barrier 1: partials ready (pull) / every peer's partials in my inbox (scatter)
        if barrier(ptrs, mc, my_base, rank, sig, 1, timeout_ns, err_host, ctl):
            return
        inv_d = float32(1.0) / float32(n_vec * epv)
        eps32 = float32(eps)
        lane = tid & 31
        nwarps = nthreads >> 5
        par = 0
        r = cuda.blockIdx.x
        prev = -1                # iteration whose C and D are pending
        while True:
            # A. every load of iteration r's R rows first: independent addresses, all in flight
            #    at once. Issued before C and D of the previous iteration (prev), so they fly
            #    while its block reduction and stores run (raw is free once B consumed it).
            for k in range(R):
                rk = r + k * grid
                if early and rk < n_rows:
                    xrow = x_off + (row_start + rk) * row_bytes
                    for j in range(vpt):
                        v = tid + j * nthreads
                        if v < n_vec:
                            load_issue(ptrs, mc, xrow + v * 16, rank, my_base,
                                       in_base + rk * row_bytes + v * 16, in_stride, raw,
                                       k * vpt + j)
            if prev >= 0:
                # C. one block reduction for prev's R rows -> rstd[k], identical in every thread
                if simulator:
                    for k in range(R):
                        thread_sums[(par * R + k) * MAX_BLOCK + tid] = ss[k]
                    cuda.syncthreads()
                    for k in range(R):
                        t = float32(0.0)
                        for i in range(nthreads):
                            t += thread_sums[(par * R + k) * MAX_BLOCK + i]
                        rstd[k] = float32(1.0) / float32(math.sqrt(t * inv_d + eps32))
                else:
                    for k in range(R):
                        t = ss[k]
                        m = 16
                        while m > 0:
                            t += cuda.shfl_xor_sync(0xFFFFFFFF, t, m)
                            m >>= 1
                        if lane == 0:
                            warp_sums[(par * R + k) * 32 + (tid >> 5)] = t
                    cuda.syncthreads()
                    for k in range(R):
                        # every warp sums the warp partials by the same butterfly: equal bits
                        t = warp_sums[(par * R + k) * 32 + lane] if lane < nwarps \
                            else float32(0.0)
                        m = 16
                        while m > 0:
                            t += cuda.shfl_xor_sync(0xFFFFFFFF, t, m)
                            m >>= 1
                        rstd[k] = float32(1.0) / float32(math.sqrt(t * inv_d + eps32))
                par ^= 1
                # D. normalise and store prev's rows
                for j in range(vpt):
                    v = tid + j * nthreads
                    if v < n_vec:
                        unpack(load_nc(w_ptr + v * 16), a)
                        for k in range(R):
                            rk = prev + k * grid
                            if rk < n_rows:
                                s = k * vpt + j
                                for e in range(epv):
                                    b[e] = h[s * epv + e] * rstd[k] * a[e]
                                wy = pack(b)
                                if push:
                                    store_all(ptrs, mc,
                                              x_off + (row_start + rk) * row_bytes + v * 16, wy)
                                else:
                                    store(out_ptr + rk * row_bytes + v * 16,
                                          wy[0], wy[1], wy[2], wy[3])
            if r >= n_rows:
                break
            # B. reduce over ranks, + residual (stored back), sum of squares per row
            for k in range(R):
                ss[k] = float32(0.0)
                rk = r + k * grid
                if has_residual and rk < n_rows:
                    # row k's residual: issued here, not in A, so that only one row's residual
                    # words are live (registers)
                    for j in range(vpt):
                        v = tid + j * nthreads
                        if v < n_vec:
                            w = load(res_ptr + rk * row_bytes + v * 16)
                            rsw[4 * j] = w[0]
                            rsw[4 * j + 1] = w[1]
                            rsw[4 * j + 2] = w[2]
                            rsw[4 * j + 3] = w[3]
                if rk < n_rows:
                    for j in range(vpt):
                        v = tid + j * nthreads
                        if v < n_vec:
                            s = k * vpt + j
                            if not early:  # one vector's N loads at a time (wide rows)
                                load_issue(ptrs, mc, x_off + (row_start + rk) * row_bytes
                                           + v * 16, rank, my_base,
                                           in_base + rk * row_bytes + v * 16, in_stride, raw, s)
                            load_reduce(raw, s, a)
                            if has_residual:
                                unpack((rsw[4 * j], rsw[4 * j + 1], rsw[4 * j + 2],
                                        rsw[4 * j + 3]), b)
                                for e in range(epv):
                                    a[e] += b[e]
                                wr = pack(a)
                                store(res_ptr + rk * row_bytes + v * 16,
                                      wr[0], wr[1], wr[2], wr[3])
                            for e in range(epv):
                                h[s * epv + e] = a[e]
                                ss[k] += a[e] * a[e]
            prev = r
            r += R * grid
        epilogue(ptrs, mc, my_base, rank, sig, 2, timeout_ns, err_host, ctl)  # all done

    fused_allreduce_rmsnorm.__name__ = (f"fused_ar_rmsnorm_{kind}_{dt}_n{world}_v{vpt}_r{R}_"
                                        f"{'scatter' if scatter else 'push' if push else 'oneshot'}"
                                        f"{'_res' if has_residual else ''}")
    return fused_allreduce_rmsnorm
