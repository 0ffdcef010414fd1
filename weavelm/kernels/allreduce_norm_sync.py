"""The barriers of the all-reduce kernels: entry, the barrier among every rank's CTA b, and exit.

Protocol (graph-safe, no host epoch) and signal-area layout: see `allreduce_norm.py` and
`allreduce_norm_layout.py`.
"""
from __future__ import annotations

from weavelm.kernels.allreduce_norm_layout import EPOCH_OFF, ERR_OFF, MAX_RANKS
from weavelm.kernels.common import device

cuda = None  # numba.cuda, bound by make_sync: a module global, so the simulator can swap it


def make_sync(signal_all, world: int):
    """(prologue, barrier, epilogue) device functions shared by both kernels; `signal_all` is the
    transport's (`allreduce_norm_transport.make_transport`).

    Signal area of each rank (u32 words from `sig`): slots[b][src] = how many barriers CTA b of
    rank src has signalled to this rank; epoch[b] = how many this rank's CTA b has passed; err =
    first timeout's code. `ctl` is a shared int64[2]: [abort flag, epoch at kernel start].
    prologue and barrier return the abort flag: the kernel returns at once when it is set.
    """
    global cuda
    from numba import int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    cuda = numba_cuda()
    n = world
    acquire, timer = ptx.load_acquire_sys_u32, ptx.globaltimer_ns
    cas, fence = ptx.atomic_cas_sys_u32, ptx.fence_acq_rel_sys
    ld_v, st_v, ld64 = ptx.load_u32_volatile, ptx.store_u32_volatile, ptx.load_u64_nc

    def prologue(tab, ptrs, my_base, sig, ctl):
        """Fill `ptrs` from the device table `tab` of the N buffer addresses; read this CTA's
        epoch and the sticky error word. Abort (ctl[0] = 1) if an earlier launch timed out: a
        broken communicator must fail fast, not wait again."""
        for p in range(n):
            ptrs[p] = ld64(tab + p * 8)
        if cuda.threadIdx.x == 0:
            ctl[0] = 1 if ld_v(my_base + sig + ERR_OFF) != 0 else 0
            ctl[1] = int64(ld_v(my_base + sig + EPOCH_OFF + cuda.blockIdx.x * 4))
        cuda.syncthreads()
        return ctl[0] != 0

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
        return ctl[0] != 0

    barrier = device(barrier)

    def epilogue(ptrs, mc, my_base, rank, sig, k, timeout_ns, err_host, ctl):
        """The launch's last barrier, number k (every peer is done with my buffer), then this
        CTA's new epoch, k barriers on (skipped after a timeout: the error is sticky anyway)."""
        if not barrier(ptrs, mc, my_base, rank, sig, k, timeout_ns, err_host, ctl) \
                and cuda.threadIdx.x == 0:
            st_v(my_base + sig + EPOCH_OFF + cuda.blockIdx.x * 4, (ctl[1] + k) & 0xFFFFFFFF)

    return device(prologue), barrier, device(epilogue)
