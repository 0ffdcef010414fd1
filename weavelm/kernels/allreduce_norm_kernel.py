"""The fused all-reduce (+ residual + RMSNorm) kernel bodies and their two transports.

N = ranks, E = elements per 16-byte vector (8 for bf16/fp16, 4 for fp32), V = vectors per row.

One Python body per kernel; a *transport* supplies the only three things that differ between the
p2p and the multimem kernels (DESIGN.md, "One fused kernel body, two transports"):

    load_reduce(ptrs, mc, off, acc)      acc[0:E] = fp32 sum over ranks of the 16-byte vector at
                                         byte offset `off` of every rank's buffer
    store_all(ptrs, mc, off, w)          write the 4 words `w` at `off` into every rank's buffer
    signal_all(ptrs, mc, off)            add 1 (release, system scope) to the u32 at `off` in
                                         every rank's buffer

`ptrs` holds the N buffer base addresses (a per-thread array the kernel fills once from the
device table of peer pointers), `mc` is the multicast base address (0 and unused for p2p).
p2p loops over `ptrs` with 16-byte volatile loads / plain stores / `red.release.sys`; multimem
issues one `multimem.ld_reduce` / `multimem.st` / `multimem.red.release` on `mc + off`.
Everything else (index math, residual add, fp32 sum of squares, block reduction, weight scale,
barriers, timeouts) is this module's code, shared verbatim.

Barrier protocol (graph-safe, no host epoch): see `weavelm/kernels/allreduce_norm.py`.
"""
from __future__ import annotations

import math

from weavelm.kernels.allreduce_norm_layout import (
    EPOCH_OFF, ERR_OFF, MAX_BLOCK, MAX_RANKS,
)

cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


# ----------------------------------------------------------------------------- transports

def make_transport(kind: str, dt: str, world: int):
    """(load_reduce, store_all, signal_all, E) for transport `kind` ("p2p" | "multimem")."""
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
        load = ptx.load_v4_u32_volatile  # peer data: ordered after the barrier, never from L1
        store = ptx.store_v4_u32
        red = ptx.red_add_release_sys_u32

        def load_reduce(ptrs, mc, off, acc):
            tmp = cuda.local.array(epv, float32)
            unpack(load(ptrs[0] + off), acc)
            for p in range(1, n):  # fixed rank order: the same sum on every rank
                unpack(load(ptrs[p] + off), tmp)
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
        mst, mred = ptx.multimem_st_v4_f32, ptx.multimem_red_add_release_u32

        def load_reduce(ptrs, mc, off, acc):
            unpack(ld_reduce(mc + off), acc)  # the switch sums (f32 accumulation, dtype result)

        def store_all(ptrs, mc, off, w):
            mst(mc + off, w[0], w[1], w[2], w[3])

        def signal_all(ptrs, mc, off):
            mred(mc + off, 1)
    else:
        raise ValueError(f"unknown transport {kind!r}")
    return dev(load_reduce), dev(store_all), dev(signal_all), epv


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

        Thread 0 publishes this CTA's prior writes (syncthreads, fence, release-add on every
        rank's slot[b][rank]); thread t < N waits until slot[b][t] reaches the expected count,
        at most `timeout_ns` (%globaltimer); on timeout it records which rank never arrived.
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

def make_fused_kernel(kind: str, dt: str, world: int, vpt: int, push: bool, has_residual: bool):
    """The fused all-reduce + residual + RMSNorm kernel (Python function, not yet jitted).

    push=True  ("sharded", TokenWeave): rows [row_start, row_start + n_rows) are this rank's;
               the normalised rows go to every rank's buffer in place (x_off + row * row_bytes).
    push=False ("one-shot"): every rank does all rows and writes them to its local `out_ptr`.
    Residual rows are at res_ptr + (row - row_start) * row_bytes (updated in place).
    """
    global cuda
    from numba import float32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.rmsnorm import _codec

    load_reduce, store_all, signal_all, epv = make_transport(kind, dt, world)
    prologue, barrier, epilogue = _make_sync(signal_all, world)
    load_ptrs = _load_ptrs(world)
    cuda = numba_cuda()
    unpack, pack, _ = _codec(dt)
    simulator = ptx.SIMULATOR
    sim_slots = MAX_BLOCK if simulator else 1
    nbuf = vpt * epv
    n = world
    load_nc, load, store = ptx.load_v4_u32_nc, ptx.load_v4_u32, ptx.store_v4_u32

    def fused_allreduce_rmsnorm(tab, my_base, mc, rank, x_off, sig, res_ptr, w_ptr, out_ptr,
                                row_start, n_rows, n_vec, eps, timeout_ns, err_host):
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        ctl = cuda.shared.array(2, int64)
        warp_sums = cuda.shared.array(33, float32)  # [32 warp partials, row total]
        thread_sums = cuda.shared.array(sim_slots, float32)  # simulator only
        ptrs = cuda.local.array(n, int64)
        h = cuda.local.array(nbuf, float32)  # this thread's part of h = sum + residual (fp32)
        a = cuda.local.array(epv, float32)
        b = cuda.local.array(epv, float32)
        load_ptrs(tab, ptrs)
        prologue(my_base, sig, ctl)
        if ctl[0] != 0:
            return
        barrier(ptrs, mc, my_base, rank, sig, 1, timeout_ns, err_host, ctl)  # partials ready
        if ctl[0] != 0:
            return
        inv_d = float32(1.0) / float32(n_vec * epv)
        eps32 = float32(eps)
        row_bytes = n_vec * 16
        r = cuda.blockIdx.x
        while r < n_rows:
            xrow = x_off + (row_start + r) * row_bytes
            rrow = res_ptr + r * row_bytes
            ss = float32(0.0)
            for j in range(vpt):
                v = tid + j * nthreads
                if v < n_vec:
                    load_reduce(ptrs, mc, xrow + v * 16, a)
                    if has_residual:
                        unpack(load(rrow + v * 16), b)
                        for e in range(epv):
                            a[e] += b[e]
                        wr = pack(a)
                        store(rrow + v * 16, wr[0], wr[1], wr[2], wr[3])
                    for e in range(epv):
                        h[j * epv + e] = a[e]
                        ss += a[e] * a[e]
            # block sum of ss -> warp_sums[32]
            if simulator:
                thread_sums[tid] = ss
                cuda.syncthreads()
                if tid == 0:
                    t = float32(0.0)
                    for i in range(nthreads):
                        t += thread_sums[i]
                    warp_sums[32] = t
            else:
                lane = tid & 31
                k = 16
                while k > 0:
                    ss += cuda.shfl_xor_sync(0xFFFFFFFF, ss, k)
                    k >>= 1
                if lane == 0:
                    warp_sums[tid >> 5] = ss
                cuda.syncthreads()
                if tid < 32:
                    t = warp_sums[lane] if lane < (nthreads >> 5) else float32(0.0)
                    k = 16
                    while k > 0:
                        t += cuda.shfl_xor_sync(0xFFFFFFFF, t, k)
                        k >>= 1
                    if lane == 0:
                        warp_sums[32] = t
            cuda.syncthreads()
            rstd = float32(1.0) / float32(math.sqrt(warp_sums[32] * inv_d + eps32))
            for j in range(vpt):
                v = tid + j * nthreads
                if v < n_vec:
                    unpack(load_nc(w_ptr + v * 16), a)
                    for e in range(epv):
                        b[e] = h[j * epv + e] * rstd * a[e]
                    wy = pack(b)
                    if push:
                        store_all(ptrs, mc, xrow + v * 16, wy)
                    else:
                        store(out_ptr + r * row_bytes + v * 16, wy[0], wy[1], wy[2], wy[3])
            r += cuda.gridDim.x  # warp_sums[32] is rewritten only after the next row's 1st sync
        barrier(ptrs, mc, my_base, rank, sig, 2, timeout_ns, err_host, ctl)  # all done
        if ctl[0] == 0:
            epilogue(my_base, sig, 2, ctl)

    fused_allreduce_rmsnorm.__name__ = (f"fused_ar_rmsnorm_{kind}_{dt}_n{world}_v{vpt}_"
                                        f"{'push' if push else 'oneshot'}"
                                        f"{'_res' if has_residual else ''}")
    return fused_allreduce_rmsnorm


# ----------------------------------------------------------------------------- plain all-reduce

def make_allreduce_kernel(kind: str, dt: str, world: int, push: bool):
    """Plain sum all-reduce over a flat range of 16-byte vectors (no norm).

    push=True  (two-shot): vectors [v_start, v_start + n_vecs) are this rank's share; their sums
               go to every rank's buffer in place: after the kernel every buffer holds the sum.
    push=False (one-shot): every rank sums all vectors from all buffers into its local out_ptr.
    """
    global cuda
    from numba import float32, int64

    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels import ptx
    from weavelm.kernels.rmsnorm import _codec

    load_reduce, store_all, signal_all, epv = make_transport(kind, dt, world)
    prologue, barrier, epilogue = _make_sync(signal_all, world)
    load_ptrs = _load_ptrs(world)
    cuda = numba_cuda()
    _, pack, _ = _codec(dt)
    n = world
    store = ptx.store_v4_u32

    def allreduce(tab, my_base, mc, rank, x_off, sig, out_ptr, v_start, n_vecs, timeout_ns,
                  err_host):
        ctl = cuda.shared.array(2, int64)
        ptrs = cuda.local.array(n, int64)
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
            off = (v_start + i) * 16
            load_reduce(ptrs, mc, x_off + off, a)
            w = pack(a)
            if push:
                store_all(ptrs, mc, x_off + off, w)
            else:
                store(out_ptr + i * 16, w[0], w[1], w[2], w[3])
            i += stride
        barrier(ptrs, mc, my_base, rank, sig, 2, timeout_ns, err_host, ctl)
        if ctl[0] == 0:
            epilogue(my_base, sig, 2, ctl)

    allreduce.__name__ = f"allreduce_{kind}_{dt}_n{world}_{'twoshot' if push else 'oneshot'}"
    return allreduce
