"""The two transports of the all-reduce kernels: how a rank reaches every rank's buffer.

N = ranks, E = elements per 16-byte vector (8 for bf16/fp16, 4 for fp32), V = vectors per row.

One Python body per kernel; a *transport* supplies the only things that differ between the
p2p and the multimem kernels (docs/architecture.md, "Kernels"):

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
weight scale, barriers, timeouts) is the same code for both transports: the kernel bodies in
`allreduce_norm_fused.py` and `allreduce_norm_plain.py`, the barriers in `allreduce_norm_sync.py`.

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

Barrier protocol (graph-safe, no host epoch): see `allreduce_norm.py`.
"""
from __future__ import annotations

from weavelm.kernels.common import codec, device

cuda = None  # numba.cuda, bound by make_transport: a module global, so the simulator can swap it


def make_transport(kind: str, dt: str, world: int, scatter: bool = False):
    """(load_issue, load_reduce, store_all, signal_all, E, W) for transport `kind` ("p2p" |
    "multimem"); W = u32 words one load_issue slot takes in `raw`. scatter (p2p only): the
    peers' partials of this rank's rows were pushed into this rank's inbox first (see
    `allreduce_norm_fused.make_fused_kernel`), so load_issue reads them locally."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    cuda = numba_cuda()
    unpack, _, epv = codec(dt)
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
    return device(load_issue), device(load_reduce), device(store_all), device(signal_all), epv, nw
