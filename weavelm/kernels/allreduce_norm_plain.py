"""The plain sum all-reduce kernel (no norm): the fused kernel's transports and barriers, no rows.

Host side (plans, launchers, the barrier protocol): `allreduce_norm.py`.
"""
from __future__ import annotations

from weavelm.kernels.allreduce_norm_sync import make_sync
from weavelm.kernels.allreduce_norm_transport import make_transport
from weavelm.kernels.common import codec

cuda = None  # numba.cuda, bound by the builder: a module global, so the simulator can swap it


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

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    load_issue, load_reduce, store_all, signal_all, epv, nw = make_transport(kind, dt, world)
    prologue, barrier, epilogue = make_sync(signal_all, world)
    cuda = numba_cuda()
    _, pack, _ = codec(dt)
    U = unroll if unroll is not None else vecs_per_iter(kind, world)
    nraw = U * nw
    n = world
    store = ptx.store_v4_u32

    def allreduce(tab, my_base, mc, rank, x_off, sig, out_ptr, v_start, n_vecs, timeout_ns,
                  err_host):
        ctl = cuda.shared.array(2, int64)
        ptrs = cuda.local.array(n, int64)
        if prologue(tab, ptrs, my_base, sig, ctl):
            return
        if barrier(ptrs, mc, my_base, rank, sig, 1, timeout_ns, err_host, ctl):
            return
        raw = cuda.local.array(nraw, uint32)  # loaded words of one iteration (registers)
        a = cuda.local.array(epv, float32)
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
        epilogue(ptrs, mc, my_base, rank, sig, 2, timeout_ns, err_host, ctl)

    allreduce.__name__ = (f"allreduce_{kind}_{dt}_n{world}_u{U}_"
                          f"{'twoshot' if push else 'oneshot'}")
    return allreduce
