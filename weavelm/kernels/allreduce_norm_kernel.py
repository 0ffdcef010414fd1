"""The fused all-reduce (+ residual + RMSNorm) kernel bodies and their two transports.

N = ranks, E = elements per 16-byte vector (8 for bf16/fp16, 4 for fp32), V = vectors per row.

One Python body per kernel; a *transport* supplies the only things that differ between the
p2p and the multimem kernels (DESIGN.md, "One fused kernel body, two transports"):

    load_issue(ptrs, mc, off, me, my_base, in_addr, in_stride, raw, s)
                                         start the load(s) of the 16-byte vector at byte offset
                                         `off` of every rank's buffer into slot s of `raw`
                                         (u32 registers; W words a slot); me .. in_stride only
                                         for p2p's scatter variant (the peers' vectors were
                                         pushed into this rank's inbox: local loads from
                                         in_addr + p * in_stride, own from my_base + off)
    load_reduce(raw, s, acc)             acc[0:E] = fp32 sum over ranks of slot s
    store_all(ptrs, mc, off, w)          write the 4 words `w` at `off` into every rank's buffer
    signal_all(ptrs, mc, off)            add 1 (relaxed, system scope) to the u32 at `off` in
                                         every rank's buffer (the barrier fences just before:
                                         fence + strong write = one release for all ranks)

(load_issue + load_reduce is the old single load_reduce, split so that a kernel issues the loads
of several vectors before it waits for the first: the stall of a load is at its first use.)
`ptrs` holds the N buffer base addresses (a per-thread array the kernel fills once from the
device table of peer pointers), `mc` is the multicast base address (0 and unused for p2p).
p2p loops over `ptrs` with 16-byte volatile loads (W = 4N) / plain stores / `red.relaxed.sys`;
multimem issues one `multimem.ld_reduce` (W = 4) / `multimem.st` / `multimem.red.relaxed` on
`mc + off`. Everything else (index math, residual add, fp32 sum of squares, block reduction,
weight scale, barriers, timeouts) is this module's code, shared verbatim.

Memory model of the peer loads. They are `ld.volatile` (= relaxed, system scope; each access
goes to the owner's memory, never an L1 line). After the start barrier the rows a rank reads are
stable: their writers (the peers' GEMMs) finished before each peer's release-add, which our
thread t < N observed with `ld.acquire.sys`; bar.sync then orders every thread of the CTA after
that acquire (release -> acquire -> bar.sync is causality order in the PTX model), so every later
load sees the partials. During the kernel a row is written only by its owner, after the owner
read it (the stored value depends on the loads), so no load races with a store. Nothing orders
the loads among themselves: relaxed loads to different addresses may all be in flight at once
(the hardware waits at the first use of a result, not at the next load), which is what the
R-rows-per-iteration layout of the fused kernel exploits. `volatile` only keeps the compiler
from merging or reordering them; we issue them in the order we want them sent.

Barrier protocol (graph-safe, no host epoch): see `weavelm/kernels/allreduce_norm.py`.
"""
from __future__ import annotations

import math

from weavelm.kernels.allreduce_norm_layout import (
    EPOCH_OFF, ERR_OFF, MAX_BLOCK, MAX_RANKS,
)

cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


# ----------------------------------------------------------------------------- transports

def make_transport(kind: str, dt: str, world: int, scatter: bool = False):
    """(load_issue, load_reduce, store_all, signal_all, E, W) for transport `kind` ("p2p" |
    "multimem"); W = u32 words one load_issue slot takes in `raw`. scatter (p2p only): the
    peers' partials of this rank's rows were pushed into this rank's inbox first (see
    make_fused_kernel), so load_issue reads them locally."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.rmsnorm import _codec

    cuda = numba_cuda()
    dev = cuda.jit(device=True, inline="always")
    unpack, _, epv = _codec(dt)
    n = world

    if kind == "p2p":
        load = ptx.load_v4_u32_volatile  # peer data: strong (relaxed.sys) loads, never from L1
        store = ptx.store_v4_u32
        red = ptx.red_add_relaxed_sys_u32
        nw = 4 * n  # words per loaded vector: one 16-byte vector from each rank

        def load_issue(ptrs, mc, off, me, my_base, in_addr, in_stride, raw, s):
            for p in range(n):
                if scatter:
                    # own partial in place, rank p's in my inbox slot p: every load is local
                    # (in_addr: this vector's address in inbox slot 0). my_base, not ptrs[me]:
                    # LLVM turns ptrs[p] under p == me into a run-time index (local memory).
                    w = load(my_base + off if p == me else in_addr + p * in_stride)
                else:
                    w = load(ptrs[p] + off)
                raw[s * nw + 4 * p] = w[0]
                raw[s * nw + 4 * p + 1] = w[1]
                raw[s * nw + 4 * p + 2] = w[2]
                raw[s * nw + 4 * p + 3] = w[3]

        def load_reduce(raw, s, acc):
            tmp = cuda.local.array(epv, float32)
            unpack((raw[s * nw], raw[s * nw + 1], raw[s * nw + 2], raw[s * nw + 3]), acc)
            for p in range(1, n):  # fixed rank order: the same sum on every rank
                b = s * nw + 4 * p
                unpack((raw[b], raw[b + 1], raw[b + 2], raw[b + 3]), tmp)
                for e in range(epv):
                    acc[e] += tmp[e]

        def store_all(ptrs, mc, off, w):
            for p in range(n):
                store(ptrs[p] + off, w[0], w[1], w[2], w[3])

        def signal_all(ptrs, mc, off):
            for p in range(n):
                red(ptrs[p] + off, 1)

    elif kind == "multimem":
        ld_reduce = {"bf16": ptx.multimem_ld_reduce_add_v4_bf16x2,
                     "f16": ptx.multimem_ld_reduce_add_v4_f16x2,
                     "f32": ptx.multimem_ld_reduce_add_v4_f32}[dt]
        mst, mred = ptx.multimem_st_v4_f32, ptx.multimem_red_add_u32
        nw = 4  # the switch returns the reduced vector

        def load_issue(ptrs, mc, off, me, my_base, in_addr, in_stride, raw, s):
            w = ld_reduce(mc + off)  # the switch sums (f32 accumulation, dtype result)
            raw[s * nw] = w[0]
            raw[s * nw + 1] = w[1]
            raw[s * nw + 2] = w[2]
            raw[s * nw + 3] = w[3]

        def load_reduce(raw, s, acc):
            unpack((raw[s * nw], raw[s * nw + 1], raw[s * nw + 2], raw[s * nw + 3]), acc)

        def store_all(ptrs, mc, off, w):
            mst(mc + off, w[0], w[1], w[2], w[3])

        def signal_all(ptrs, mc, off):
            mred(mc + off, 1)
    else:
        raise ValueError(f"unknown transport {kind!r}")
    return (dev(load_issue), dev(load_reduce), dev(store_all), dev(signal_all), epv,
            nw)


# ----------------------------------------------------------------------------- barrier

def _make_sync(signal_all, world: int):
    """(prologue, barrier, epilogue) device functions shared by every kernel.

    Signal area of each rank (u32 words from `sig`): slots[b][src] = how many barriers CTA b of
    rank src has signalled to this rank; epoch[b] = how many this rank's CTA b has passed; err =
    first timeout's code. `ctl` is a shared int64[2]: [abort flag, epoch at kernel start].
    """
    from numba import int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    dev = numba_cuda().jit(device=True, inline="always")
    n = world
    acquire, timer = ptx.load_acquire_sys_u32, ptx.globaltimer_ns
    cas, fence = ptx.atomic_cas_sys_u32, ptx.fence_acq_rel_sys
    ld_v, st_v = ptx.load_u32_volatile, ptx.store_u32_volatile

    def prologue(my_base, sig, ctl):
        """Read this CTA's epoch and the sticky error word; abort (ctl[0]=1) if an earlier
        launch timed out: a broken communicator must fail fast, not wait again."""
        if cuda.threadIdx.x == 0:
            ctl[0] = 1 if ld_v(my_base + sig + ERR_OFF) != 0 else 0
            ctl[1] = int64(ld_v(my_base + sig + EPOCH_OFF + cuda.blockIdx.x * 4))
        cuda.syncthreads()

    def barrier(ptrs, mc, my_base, rank, sig, k, timeout_ns, err_host, ctl):
        """Barrier number k (1, 2, ...) of this launch among CTA blockIdx.x of every rank.

        Thread 0 publishes this CTA's prior writes (syncthreads, one system fence, then a
        relaxed add on every rank's slot[b][rank]); thread t < N waits until slot[b][t] reaches
        the expected count, at most `timeout_ns` (%globaltimer); on timeout it records which
        rank never arrived.
        """
        cuda.syncthreads()
        tid = cuda.threadIdx.x
        b = cuda.blockIdx.x
        if tid == 0:
            fence()
            signal_all(ptrs, mc, sig + (b * MAX_RANKS + rank) * 4)
        if tid < n:
            expect = (ctl[1] + k) & 0xFFFFFFFF
            addr = my_base + sig + (b * MAX_RANKS + tid) * 4
            t0 = timer()
            while True:
                v = acquire(addr)
                if ((int64(v) - expect) & 0xFFFFFFFF) < 0x80000000:  # v >= expect, wrap-safe
                    break
                if int64(timer() - t0) > timeout_ns:
                    code = 0x80000000 | (k << 16) | ((b & 0xFF) << 8) | tid
                    if cas(my_base + sig + ERR_OFF, 0, code) == 0 and err_host != 0:
                        st_v(err_host, code)  # host-visible copy, readable without a sync
                    ctl[0] = 1
                    break
        cuda.syncthreads()

    def epilogue(my_base, sig, n_barriers, ctl):
        """Store this CTA's new epoch (skipped after a timeout: the error is sticky anyway)."""
        if cuda.threadIdx.x == 0:
            st_v(my_base + sig + EPOCH_OFF + cuda.blockIdx.x * 4,
                 (ctl[1] + n_barriers) & 0xFFFFFFFF)

    return dev(prologue), dev(barrier), dev(epilogue)


def _load_ptrs(world: int):
    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    ld64 = ptx.load_u64_nc
    n = world

    def load_ptrs(tab, ptrs):
        for p in range(n):
            ptrs[p] = ld64(tab + p * 8)
    return numba_cuda().jit(device=True, inline="always")(load_ptrs)


# ----------------------------------------------------------------------------- fused kernel

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
    epv = 4 if dt == "f32" else 8
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
    waits a full remote round trip per iteration (4xH100, 16K tokens: 2370 -> 1640 us at 8
    CTAs, 1559 us at 32 -> 1427 us at 16; benchmarks/RESULTS.md, round 3).
    Row r goes to the same CTA as with R = 1; missing rows (past n_rows) are skipped.
    """
    global cuda
    from numba import float32, int64, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.rmsnorm import _codec

    if scatter and (kind != "p2p" or not push):
        raise ValueError("scatter is a p2p push-mode variant")
    load_issue, load_reduce, store_all, signal_all, epv, nw = make_transport(kind, dt, world,
                                                                             scatter)
    prologue, barrier, epilogue = _make_sync(signal_all, world)
    load_ptrs = _load_ptrs(world)
    cuda = numba_cuda()
    unpack, pack, _ = _codec(dt)
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
        load_ptrs(tab, ptrs)
        prologue(my_base, sig, ctl)
        if ctl[0] != 0:
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
                    for k in range(SR):
                        ik = i + k * grid
                        if ik < j_rows:
                            for j in range(vpt):
                                v = tid + j * nthreads
                                if v < n_vec:
                                    sc = 4 * (k * vpt + j)
                                    store(dst + ik * row_bytes + v * 16, scw[sc], scw[sc + 1],
                                          scw[sc + 2], scw[sc + 3])
                    i += SR * grid
        else:
            in_stride = 0
        in_base = my_base + inbox_off
        # barrier 1: partials ready (pull) / every peer's partials in my inbox (scatter)
        barrier(ptrs, mc, my_base, rank, sig, 1, timeout_ns, err_host, ctl)
        if ctl[0] != 0:
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
        barrier(ptrs, mc, my_base, rank, sig, 2, timeout_ns, err_host, ctl)  # all done
        if ctl[0] == 0:
            epilogue(my_base, sig, 2, ctl)

    fused_allreduce_rmsnorm.__name__ = (f"fused_ar_rmsnorm_{kind}_{dt}_n{world}_v{vpt}_r{R}_"
                                        f"{'scatter' if scatter else 'push' if push else 'oneshot'}"
                                        f"{'_res' if has_residual else ''}")
    return fused_allreduce_rmsnorm


# ----------------------------------------------------------------------------- plain all-reduce

def vecs_per_iter(kind: str, world: int) -> int:
    """U, the vectors one thread of the plain all-reduce loads before it uses any: the largest
    power of two <= 4 with U * N (p2p) or U (multimem) loads <= 16 in flight."""
    per = world if kind == "p2p" else 1
    u = 4
    while u > 1 and u * per > 16:
        u //= 2
    return u


def make_allreduce_kernel(kind: str, dt: str, world: int, push: bool, unroll: int | None = None):
    """Plain sum all-reduce over a flat range of 16-byte vectors (no norm).

    push=True  (two-shot): vectors [v_start, v_start + n_vecs) are this rank's share; their sums
               go to every rank's buffer in place: after the kernel every buffer holds the sum.
    push=False (one-shot): every rank sums all vectors from all buffers into its local out_ptr.
    Thread i handles vectors i, i + S, i + 2S, ... (S = all threads of the grid), U = `unroll`
    (default `vecs_per_iter`) of them per iteration, all loaded before any is used.
    """
    global cuda
    from numba import float32, int64, uint32

    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels import ptx
    from weavelm.kernels.rmsnorm import _codec

    load_issue, load_reduce, store_all, signal_all, epv, nw = make_transport(kind, dt, world)
    prologue, barrier, epilogue = _make_sync(signal_all, world)
    load_ptrs = _load_ptrs(world)
    cuda = numba_cuda()
    _, pack, _ = _codec(dt)
    U = unroll if unroll is not None else vecs_per_iter(kind, world)
    nraw = U * nw
    n = world
    store = ptx.store_v4_u32

    def allreduce(tab, my_base, mc, rank, x_off, sig, out_ptr, v_start, n_vecs, timeout_ns,
                  err_host):
        ctl = cuda.shared.array(2, int64)
        ptrs = cuda.local.array(n, int64)
        raw = cuda.local.array(nraw, uint32)
        a = cuda.local.array(epv, float32)
        load_ptrs(tab, ptrs)
        prologue(my_base, sig, ctl)
        if ctl[0] != 0:
            return
        barrier(ptrs, mc, my_base, rank, sig, 1, timeout_ns, err_host, ctl)
        if ctl[0] != 0:
            return
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while i < n_vecs:
            for u in range(U):
                iu = i + u * stride
                if iu < n_vecs:
                    load_issue(ptrs, mc, x_off + (v_start + iu) * 16, 0, 0, 0, 0, raw, u)
            for u in range(U):
                iu = i + u * stride
                if iu < n_vecs:
                    load_reduce(raw, u, a)
                    w = pack(a)
                    if push:
                        store_all(ptrs, mc, x_off + (v_start + iu) * 16, w)
                    else:
                        store(out_ptr + iu * 16, w[0], w[1], w[2], w[3])
            i += U * stride
        barrier(ptrs, mc, my_base, rank, sig, 2, timeout_ns, err_host, ctl)
        if ctl[0] == 0:
            epilogue(my_base, sig, 2, ctl)

    allreduce.__name__ = (f"allreduce_{kind}_{dt}_n{world}_u{U}_"
                          f"{'twoshot' if push else 'oneshot'}")
    return allreduce
