"""The device code of the small-batch MoE GEMV kernels (weavelm/kernels/moe_gemv.py holds the
contract, the references, the launchers and why the kernels look as they do; names as there).

Both kernels start alike: the CTA reads the n = T * K expert ids into shared memory and builds
the table of distinct experts (`experts[u]`, u < nu, in order of first use) and, per distinct
expert and token, the slot that routes the token there (`slot_of[u * TMAX + t]`, -1 if none).
An expert several tokens share is then streamed once for all of them. Ids outside [0, E) route
nowhere. Then the CTA's row slots (groups of L lanes, 32 / L per warp) take balanced contiguous
ranges of the work units, all in lockstep (the simulator's warp sums are block barriers), and
each lane streams 16-byte vectors L apart along the rows of its unit, `unroll` columns of every
row loaded before any is used.
"""
from __future__ import annotations

import math

NMAX = 64                       # routed (token, slot) pairs per launch: T * K <= NMAX
SIM_THREADS = 1024              # the simulator's block sums: one float per thread

cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


def _helpers(dt: str, tmax: int, lanes: int, rows: int):
    """(table, slot_range, columns, fma_rows, sum_rows, unpack, E): device functions of both
    kernels, for `rows` rows per work unit."""
    global cuda
    from numba import int32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, device
    from weavelm.kernels.paged_attention_kernels import lane_reduce_fn

    cuda = numba_cuda()
    unpack, _, E = codec(dt)
    lane_sum = lane_reduce_fn(lanes)
    load_u32 = ptx.load_u32
    n_tab = NMAX * tmax

    def table(ids_ptr, id_bytes, n, K, n_exp):
        """Builds the routing tables in shared memory (all threads call it); returns (nu,
        experts, slot_of)."""
        ids = cuda.shared.array(NMAX, int32)
        first = cuda.shared.array(NMAX, int32)
        rank = cuda.shared.array(NMAX, int32)
        experts = cuda.shared.array(NMAX, int64)
        slot_of = cuda.shared.array(n_tab, int32)
        nu = cuda.shared.array(1, int32)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        for i in range(tid, n_tab, nthreads):
            slot_of[i] = -1
        for j in range(tid, n, nthreads):
            e = int64(load_u32(ids_ptr + j * id_bytes))   # low word (little-endian int64)
            ids[j] = int32(e) if e < n_exp else -1
        cuda.syncthreads()
        for j in range(tid, n, nthreads):                 # first pair routed to j's expert
            f = -1
            if ids[j] >= 0:
                f = j
                for i in range(j):
                    if f == j and ids[i] == ids[j]:
                        f = i
            first[j] = f
        cuda.syncthreads()
        for j in range(tid, n, nthreads):                 # distinct experts, numbered in order
            if first[j] == j:
                u = 0
                for i in range(j):
                    if first[i] == i:
                        u += 1
                rank[j] = u
                experts[u] = int64(ids[j])
        if tid == 0:
            c = 0
            for i in range(n):
                if first[i] == i:
                    c += 1
            nu[0] = c
        cuda.syncthreads()
        for j in range(tid, n, nthreads):
            f = first[j]
            if f >= 0:
                t = j // K
                slot_of[rank[f] * tmax + t] = j - t * K
        cuda.syncthreads()
        return nu[0], experts, slot_of

    def slot_range(units):
        """(lo, hi, iterations): this row slot's balanced contiguous range of `units` work
        units; iterations is the same for every thread of the grid (ceil(units / slots))."""
        tid = cuda.threadIdx.x
        warps = cuda.blockDim.x >> 5
        slot = (cuda.blockIdx.x * warps + (tid >> 5)) * (32 // lanes) + (tid & 31) // lanes
        nslots = cuda.gridDim.x * warps * (32 // lanes)
        return slot * units // nslots, (slot + 1) * units // nslots, \
            (units + nslots - 1) // nslots

    def columns(wv, j, ws, wf):
        """ws[r * E:(r + 1) * E] <- column j of the step's raw vectors wv ([column, row]) of
        every row r, unpacked (once for all tokens)."""
        for r in range(rows):
            o = (j * rows + r) * 4
            unpack((wv[o], wv[o + 1], wv[o + 2], wv[o + 3]), wf)
            for e in range(E):
                ws[r * E + e] = wf[e]

    def fma_rows(acc, t, ws, wf):
        """acc[t * rows + r] += ws[r] . wf for every row r (wf: token t's E elements)."""
        for r in range(rows):
            s = acc[t * rows + r]
            for e in range(E):
                s += ws[r * E + e] * wf[e]
            acc[t * rows + r] = s

    def sum_rows(acc, t, red, tid):
        """Token t's lane partials acc[t * rows + r] -> their sums over the row slot (every
        thread of the CTA calls it)."""
        for r in range(rows):
            acc[t * rows + r] = lane_sum(acc[t * rows + r], red, tid)

    return (device(table), device(slot_range), device(columns), device(fma_rows),
            device(sum_rows), unpack, E)


def _build_gate_up(dt: str, tmax: int, lanes: int, pairs: int, unroll: int):
    """h[t, k, i] = silu(w1[e] x[t])_i * (w3[e] x[t])_i for the slots (t, k) routed to e.

    Unit = (distinct expert u, `pairs` consecutive i): 2 * pairs rows of w13[e] (gate rows
    i.., up rows I + i..), each D long. Kernel arguments: x [T, D], w13 [E, 2I, D], ids [T, K],
    h [T, K, I] fp32; T, K, E, Dv (16-byte vectors per row), I, id_bytes (4 or 8)."""
    from numba import float32, int32, int64, uint32

    from weavelm.kernels import ptx

    rows = 2 * pairs
    table, slot_range, columns, fma_rows, sum_rows, unpack, E = _helpers(dt, tmax, lanes, rows)
    nw = unroll * rows * 4                                 # words a lane loads per step
    red_n = SIM_THREADS if ptx.SIMULATOR else 1
    n_acc, n_w = tmax * rows, rows * E                     # compile-time array sizes
    load_w, load_x = ptx.load_v4_u32_stream, ptx.load_v4_u32_nc
    store_u32, as_u32 = ptx.store_u32, ptx.f32_as_u32

    def moe_gate_up_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, T, K, n_exp, Dv, I, id_bytes):
        tid = cuda.threadIdx.x
        red = cuda.shared.array(red_n, float32)
        acc = cuda.local.array(n_acc, float32)       # [token, row] lane partials
        ws = cuda.local.array(n_w, float32)           # one column of every row, unpacked
        wv = cuda.local.array(nw, uint32)                  # [column, row] raw weight vectors
        wf = cuda.local.array(E, float32)
        kt = cuda.local.array(tmax, int32)

        nu, experts, slot_of = table(ids_ptr, id_bytes, T * K, K, n_exp)
        q = tid & (lanes - 1)
        groups = I // pairs
        lo, hi, iters = slot_range(nu * groups)
        row_bytes = Dv * 16
        up = I * row_bytes                                  # gate row i -> up row I + i
        steps = (Dv + lanes * unroll - 1) // (lanes * unroll)
        for it in range(iters):
            unit = lo + it
            active = unit < hi
            u = unit // groups if active else 0
            g = unit - u * groups
            base = w_ptr + (experts[u] * 2 * I + g * pairs) * row_bytes
            for t in range(tmax):
                kt[t] = slot_of[u * tmax + t] if active else -1
            for i in range(n_acc):
                acc[i] = float32(0.0)
            for c in range(steps):
                v0 = c * (lanes * unroll) + q
                for j in range(unroll):                     # every load of the step first
                    v = v0 + j * lanes
                    for r in range(rows):
                        o = (j * rows + r) * 4
                        if active and v < Dv:
                            a = base + (r if r < pairs else r - pairs) * row_bytes + v * 16
                            if r >= pairs:
                                a += up
                            w = load_w(a)
                            wv[o], wv[o + 1], wv[o + 2], wv[o + 3] = w[0], w[1], w[2], w[3]
                for j in range(unroll):                     # then every token against them
                    v = v0 + j * lanes
                    if active and v < Dv:
                        columns(wv, j, ws, wf)
                        for t in range(tmax):
                            if kt[t] >= 0:
                                unpack(load_x(x_ptr + t * row_bytes + v * 16), wf)
                                fma_rows(acc, t, ws, wf)
            for t in range(tmax):
                if t < T:                                   # uniform: every lane sums
                    sum_rows(acc, t, red, tid)
                    k = int64(kt[t])
                    if q == 0 and k >= 0:
                        for p in range(pairs):
                            gate = acc[t * rows + p]
                            hv = gate / (float32(1.0) + math.exp(-gate)) * acc[t * rows + pairs + p]
                            store_u32(h_ptr + ((t * K + k) * I + g * pairs + p) * 4, as_u32(hv))

    moe_gate_up_kernel.__name__ = f"moe_gate_up_{dt}_t{tmax}_l{lanes}_p{pairs}_u{unroll}"
    return moe_gate_up_kernel


def _build_down(dt: str, tmax: int, lanes: int, rows: int, unroll: int):
    """out[t, d] = sum over slots k of weights[t, k] * (w2[ids[t, k]] h[t, k])_d.

    Unit = `rows` consecutive d; for each distinct expert, the unit's rows of w2[e], each I
    long, against h of every token routed there (fp32, scaled by the token's weight as it is
    loaded), summed over the experts in registers: the combine needs no second pass and no
    atomics. Kernel arguments: h [T, K, I] fp32, w2 [E, D, I], ids [T, K], weights [T, K]
    fp32, out [T, D]; T, K, E, D, Iv (16-byte vectors of w2 per row), id_bytes."""
    from numba import float32, int32, int64, uint32

    from weavelm.kernels import ptx

    table, slot_range, columns, fma_rows, sum_rows, _, E = _helpers(dt, tmax, lanes, rows)
    nw = unroll * rows * 4
    red_n = SIM_THREADS if ptx.SIMULATOR else 1
    n_acc, n_w = tmax * rows, rows * E                     # compile-time array sizes
    itemsize = 16 // E
    load_w, load_h, load_u32 = ptx.load_v4_u32_stream, ptx.load_v4_u32_nc, ptx.load_u32
    store_u32, as_u32, as_f32 = ptx.store_u32, ptx.f32_as_u32, ptx.u32_as_f32
    pack2 = ptx.pack_bf16x2 if dt == "bf16" else ptx.pack_f16x2

    def moe_down_kernel(h_ptr, w_ptr, ids_ptr, wt_ptr, out_ptr, T, K, n_exp, D, Iv, id_bytes):
        tid = cuda.threadIdx.x
        red = cuda.shared.array(red_n, float32)
        tot = cuda.local.array(n_acc, float32)       # [token, row] lane partials
        ws = cuda.local.array(n_w, float32)           # one column of every row, unpacked
        wv = cuda.local.array(nw, uint32)
        wf = cuda.local.array(E, float32)
        kt = cuda.local.array(tmax, int32)
        wt = cuda.local.array(tmax, float32)

        nu, experts, slot_of = table(ids_ptr, id_bytes, T * K, K, n_exp)
        q = tid & (lanes - 1)
        lo, hi, iters = slot_range(D // rows)
        row_bytes = Iv * 16
        inter = Iv * E                                      # I
        steps = (Iv + lanes * unroll - 1) // (lanes * unroll)
        for it in range(iters):
            unit = lo + it
            active = unit < hi
            d0 = unit * rows if active else 0
            for i in range(n_acc):
                tot[i] = float32(0.0)
            for u in range(nu):
                base = w_ptr + (experts[u] * D + d0) * row_bytes
                for t in range(tmax):
                    k = int64(slot_of[u * tmax + t])
                    kt[t] = k
                    wt[t] = as_f32(load_u32(wt_ptr + (t * K + k) * 4)) if k >= 0 \
                        else float32(0.0)
                for c in range(steps):
                    v0 = c * (lanes * unroll) + q
                    for j in range(unroll):
                        v = v0 + j * lanes
                        for r in range(rows):
                            o = (j * rows + r) * 4
                            if active and v < Iv:
                                w = load_w(base + r * row_bytes + v * 16)
                                wv[o], wv[o + 1], wv[o + 2], wv[o + 3] = w[0], w[1], w[2], w[3]
                    for j in range(unroll):
                        v = v0 + j * lanes
                        if active and v < Iv:
                            columns(wv, j, ws, wf)
                            for t in range(tmax):
                                k = int64(kt[t])
                                if k >= 0:
                                    a = h_ptr + ((t * K + k) * inter + v * E) * 4
                                    for e4 in range(0, E, 4):
                                        x = load_h(a + e4 * 4)
                                        wf[e4] = as_f32(x[0]) * wt[t]
                                        wf[e4 + 1] = as_f32(x[1]) * wt[t]
                                        wf[e4 + 2] = as_f32(x[2]) * wt[t]
                                        wf[e4 + 3] = as_f32(x[3]) * wt[t]
                                    fma_rows(tot, t, ws, wf)
            for t in range(tmax):
                if t < T:                                   # uniform: every lane sums
                    sum_rows(tot, t, red, tid)
                    if q == 0 and active:
                        a = out_ptr + (t * D + d0) * itemsize
                        if E == 4:                          # fp32 out
                            for r in range(rows):
                                store_u32(a + r * 4, as_u32(tot[t * rows + r]))
                        else:                               # two 16-bit values per word
                            for r in range(0, rows, 2):
                                store_u32(a + r * 2, pack2(tot[t * rows + r],
                                                           tot[t * rows + r + 1]))

    moe_down_kernel.__name__ = f"moe_down_{dt}_t{tmax}_l{lanes}_r{rows}_u{unroll}"
    return moe_down_kernel
