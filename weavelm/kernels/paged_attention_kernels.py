"""The device code of paged decode attention (weavelm/kernels/paged_attention.py holds the
contract, the reference and the launcher; names as there).

The kernel is bound by instruction issue as much as by memory, so its inner loop is kept lean
(the measurements behind each choice: benchmarks/HISTORY.md, issue 13):
- scores live in the log2 domain (q is scaled by scale * log2(e) once), so every exponential is
  one `ex2.approx` instead of a range-reduced `exp`;
- the two keys a lane holds per iteration are folded together: one rescale of the running
  output per head and iteration, not one per key;
- block sizes are powers of two, so a key's block and offset are a shift and a mask (a runtime
  integer division costs tens of instructions).
And since each iteration waits on a table -> key/value load chain, the pipelined form (the
default) issues iteration i + 1's loads before scoring iteration i, so loads stay in flight while
the lane computes, at the price of twice the words in registers.
"""
from __future__ import annotations

import math

WARPS = 4                       # per CTA
ROWS = 4                        # key rows per lane and iteration (the fastest of 1, 2, 4)
PIPELINE = True                 # loads one iteration ahead (see _build_kernel)
NEG = -1.0e30                   # "minus infinity" that keeps exp2() and max() NaN-free
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


def split_count(keys, S, split_keys):
    """How many of its S CTAs a sequence with `keys` visible keys uses: one per `split_keys`
    keys, at least one (kernel, combine and tests share it)."""
    n = (keys + split_keys - 1) // split_keys
    return max(1, min(S, n))


def first_key_fn():
    """Device function first_key(length, window, starts_ptr, b): the first key sequence b's
    query sees: the window's first, or starts[b] where a cascade's shared prefix covers the
    keys before it (kernel and combine share it)."""
    from numba import int64

    from weavelm.kernels import ptx
    from weavelm.kernels.common import device

    def first_key(length, window, starts_ptr, b):
        first = int64(0)
        if window > 0 and length > window:
            first = length - window
        if starts_ptr != 0:
            st = int64(ptx.load_u32(starts_ptr + b * 4))
            if st > first:
                first = st
        return first

    return device(first_key)


def lane_reduce_fn(lanes: int, is_max: bool = False):
    """Device function reduce(x, red, tid): the sum (or, with is_max, the largest) of x over
    the `lanes` lanes that hold one row (every thread of the CTA calls it; `red`, one float per
    thread, serves the simulator, which has no warp shuffles). The MoE and FP8 GEMV kernels
    and the tensor-core decode kernel (4 lanes: an mma fragment's row) use it too."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import device

    cuda = numba_cuda()
    simulator = ptx.SIMULATOR

    def lane_reduce(x, red, tid):
        if simulator:
            red[tid] = x
            cuda.syncthreads()
            base = tid - (tid % lanes)           # the row's first lane
            t = red[base]
            for i in range(1, lanes):
                t = max(t, red[base + i]) if is_max else t + red[base + i]
            cuda.syncthreads()
            return float32(t)
        k = lanes >> 1
        while k > 0:
            o = cuda.shfl_xor_sync(0xFFFFFFFF, x, k)
            x = max(x, o) if is_max else x + o
            k >>= 1
        return x

    return device(lane_reduce)


def _build_kernel(dt: str, lanes: int, group: int, rows: int = ROWS, pipeline: bool = PIPELINE,
                  kv8: bool = False, pdl: bool = False):
    """The decode kernel's Python function for one dtype, L, query-head group and key rows
    per lane and iteration (not yet jitted). `pipeline`: the loads of iteration i + 1 are
    issued before iteration i is scored (two sets of key/value words in registers). `kv8`:
    the cache holds FP8 (e4m3; bf16 / fp16 queries): a lane loads the same E elements of a key
    row as 8 bytes instead of 16, and the keys' and values' scales are folded into the query
    and the output."""
    global cuda
    from numba import float32, int64, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, device, pdl_entry

    cuda = numba_cuda()
    unpack, pack, E = codec(dt)
    itemsize = 16 // E
    kpw = 32 // lanes                       # keys a warp scores at once
    slots = WARPS * kpw                     # independent softmax states per CTA and head
    step = rows * slots                     # keys per CTA iteration: `rows` per key slot, so
    #                                         each lane has 2 x rows loads in flight
    width = lanes * E                       # D, fixed by the shape class
    GE = group * E                          # a lane's query / output elements, all heads
    ML = 2 * group                          # a lane's (max, sum) per head
    RE = rows * 8                           # a lane's key (value) elements, all rows
    W = rows * 4                            # a lane's key (value) words, all rows
    threads = 32 * WARPS
    load_nc, load_u32, store = ptx.load_v4_u32_nc, ptx.load_u32, ptx.store_v4_u32
    load_half, unpack8 = ptx.load_v2_u32_nc, ptx.unpack_e4m3x4
    as_u32 = ptx.f32_as_u32
    kv_elem = 1 if kv8 else itemsize        # bytes per cached element

    lane_sum = lane_reduce_fn(lanes)        # over the lanes of one key row
    enter = pdl_entry(pdl)

    def score_and_fold(ml, acc, qv, kf, vf, d, nvalid, red, tid):
        """Score the lane's `rows` key rows (kf, vf: row r at [r*E, (r+1)*E)) against each
        head of the group and fold the first `nvalid` into that head's running (max, sum,
        output): ml[2i], ml[2i+1], acc[i*E:(i+1)*E]; one rescale per head for all rows. Only
        the tail is masked, so the valid rows are a prefix."""
        for i in range(group):
            for r in range(rows):
                t = float32(0.0)
                for e in range(E):
                    t += qv[i * E + e] * kf[r * E + e]
                d[r] = lane_sum(t, red, tid)
            if nvalid > 0:
                m_new = ml[2 * i]
                for r in range(rows):
                    if r >= nvalid:
                        d[r] = float32(NEG)
                    m_new = max(m_new, d[r])
                alpha = math.exp2(ml[2 * i] - m_new)
                total = ml[2 * i + 1] * alpha
                for e in range(E):
                    acc[i * E + e] *= alpha
                for r in range(rows):
                    p = math.exp2(d[r] - m_new)
                    total += p
                    for e in range(E):
                        acc[i * E + e] += p * vf[r * E + e]
                ml[2 * i] = m_new
                ml[2 * i + 1] = total

    score_and_fold = device(score_and_fold)

    def fetch(k_ptr, v_ptr, table_ptr, kw, vw, j, lo, hi, b, M, bs_shift, bs_mask, Hkv, g,
              row_bytes, vec):
        """Issue the loads of the lane's `rows` key and value vectors starting at key j (row r
        at j + r * slots; rows at or past hi read key lo, a valid address, and are masked
        later) into kw / vw; returns how many rows are valid."""
        nvalid = 0
        for r in range(rows):
            jr = j + r * slots
            if jr < hi:
                nvalid += 1
            else:
                jr = lo
            blk = int64(load_u32(table_ptr + (b * M + (jr >> bs_shift)) * 4))
            a = (((blk << bs_shift) + (jr & bs_mask)) * Hkv + g) * row_bytes \
                + vec * E * kv_elem
            if kv8:                          # E FP8 elements: 8 bytes
                w2 = load_half(k_ptr + a)
                kw[4 * r], kw[4 * r + 1] = w2[0], w2[1]
                w2 = load_half(v_ptr + a)
                vw[4 * r], vw[4 * r + 1] = w2[0], w2[1]
            else:
                w = load_nc(k_ptr + a)
                kw[4 * r], kw[4 * r + 1], kw[4 * r + 2], kw[4 * r + 3] = w[0], w[1], w[2], w[3]
                w = load_nc(v_ptr + a)
                vw[4 * r], vw[4 * r + 1], vw[4 * r + 2], vw[4 * r + 3] = w[0], w[1], w[2], w[3]
        return nvalid

    fetch = device(fetch)
    splits_of = device(split_count)
    first_key = first_key_fn()

    def unpack_row(words, r, out):
        """FP8 row r's E elements of the lane (2 raw words of the iteration) ->
        out[r*E:(r+1)*E]."""
        for q in range(2):
            a0, a1, a2, a3 = unpack8(words[4 * r + q])
            out[r * E + 4 * q], out[r * E + 4 * q + 1] = a0, a1
            out[r * E + 4 * q + 2], out[r * E + 4 * q + 3] = a2, a3

    unpack_row = device(unpack_row)

    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, order_ptr, starts_ptr,
                            out_ptr, lse_ptr, part_ptr, ml_ptr, B, H, Hkv, D, M, bs_shift, S,
                            split_keys, window, scale, k_scale, v_scale):
        enter()
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        sub = lane // lanes                  # which of the warp's keys
        vec = lane % lanes                   # which 16-byte vector of the row
        cta = cuda.blockIdx.x
        groups = H // group
        h0 = (cta % groups) * group          # the CTA's first query head
        s = (cta // groups) % S              # splits before sequences: a long sequence's
        b = cta // (groups * S)              # pieces start together
        if order_ptr != 0:                   # longest first: no long CTA starts last
            b = int64(load_u32(order_ptr + b * 4))
        g = h0 // (H // Hkv)                 # the KV head every head of the group reads
        length = int64(load_u32(lens_ptr + b * 4))
        first = first_key(length, window, starts_ptr, b)
        n_split = splits_of(length - first, S, split_keys)
        if s >= n_split:                     # a short sequence uses fewer of the S CTAs
            return
        chunk = (length - first + n_split - 1) // n_split
        lo = first + s * chunk
        hi = min(length, lo + chunk)
        bs_mask = (int64(1) << bs_shift) - 1

        red = cuda.shared.array(threads, float32)            # simulator: dot-product partials
        ml_sh = cuda.shared.array((group, slots, 2), float32)  # per head and slot: max, sum
        acc_sh = cuda.shared.array((group, slots, width), float32)  # unnormalised outputs
        qv = cuda.local.array(GE, float32)
        ml = cuda.local.array(ML, float32)
        k0 = cuda.local.array(8, float32)
        kf = cuda.local.array(RE, float32)
        vf = cuda.local.array(RE, float32)
        d = cuda.local.array(rows, float32)
        acc = cuda.local.array(GE, float32)

        row_bytes = D * kv_elem              # of a cached key row
        q_bytes = D * itemsize
        sc = float32(scale * LOG2E * k_scale)  # scores in log2 units: exp2 below, not exp
        for i in range(group):
            unpack(load_nc(q_ptr + (b * H + h0 + i) * q_bytes + vec * 16), k0)
            for e in range(E):
                qv[i * E + e] = k0[e] * sc
                acc[i * E + e] = float32(0.0)
            ml[2 * i] = float32(NEG)
            ml[2 * i + 1] = float32(0.0)
        j_off = warp * kpw + sub             # this lane's first key of an iteration; row r
        #                                      is that + r * slots
        kw = cuda.local.array(W, uint32)      # raw words of the iteration being scored
        vw = cuda.local.array(W, uint32)
        nk = cuda.local.array(W, uint32)      # pipelined: the next iteration's, in flight
        nv = cuda.local.array(W, uint32)
        nvalid_next = 0
        if pipeline:
            nvalid_next = fetch(k_ptr, v_ptr, table_ptr, nk, nv, lo + j_off, lo, hi, b, M,
                                bs_shift, bs_mask, Hkv, g, row_bytes, vec)
        base = lo
        while base < hi:                     # uniform over the CTA
            if pipeline:
                for x in range(W):
                    kw[x] = nk[x]
                    vw[x] = nv[x]
                nvalid = nvalid_next
                if base + step < hi:         # a branch, so the next loads stay ahead of use
                    nvalid_next = fetch(k_ptr, v_ptr, table_ptr, nk, nv, base + step + j_off,
                                        lo, hi, b, M, bs_shift, bs_mask, Hkv, g, row_bytes,
                                        vec)
            else:                            # (ptxas issues all rows' loads before use)
                nvalid = fetch(k_ptr, v_ptr, table_ptr, kw, vw, base + j_off, lo, hi, b, M,
                               bs_shift, bs_mask, Hkv, g, row_bytes, vec)
            for r in range(rows):
                if kv8:
                    unpack_row(kw, r, kf)
                    unpack_row(vw, r, vf)
                else:
                    unpack((kw[4 * r], kw[4 * r + 1], kw[4 * r + 2], kw[4 * r + 3]), k0)
                    for e in range(E):
                        kf[r * E + e] = k0[e]
                    unpack((vw[4 * r], vw[4 * r + 1], vw[4 * r + 2], vw[4 * r + 3]), k0)
                    for e in range(E):
                        vf[r * E + e] = k0[e]
            score_and_fold(ml, acc, qv, kf, vf, d, nvalid, red, tid)
            base += step

        slot = warp * kpw + sub
        for i in range(group):
            if vec == 0:
                ml_sh[i, slot, 0] = ml[2 * i]
                ml_sh[i, slot, 1] = ml[2 * i + 1]
            for e in range(E):
                acc_sh[i, slot, vec * E + e] = acc[i * E + e]
        cuda.syncthreads()
        if tid < lanes * group:              # thread t merges vector t % L of head t // L
            i = tid // lanes
            t = tid % lanes
            mx = float32(NEG)
            for j in range(slots):
                mx = max(mx, ml_sh[i, j, 0])
            total = float32(0.0)
            for e in range(E):
                k0[e] = float32(0.0)
            for j in range(slots):
                w = math.exp2(ml_sh[i, j, 0] - mx)
                total += ml_sh[i, j, 1] * w
                for e in range(E):
                    k0[e] += acc_sh[i, j, t * E + e] * w
            h = h0 + i
            if n_split == 1:
                inv = float32(v_scale) / total
                for e in range(E):
                    k0[e] *= inv
                r = pack(k0)
                store(out_ptr + (b * H + h) * q_bytes + t * 16, r[0], r[1], r[2], r[3])
                if lse_ptr != 0 and t == 0:   # natural log, of the scores scale * q.k
                    ptx.store_u32(lse_ptr + (b * H + h) * 4,
                                  as_u32((mx + math.log2(total)) * float32(LN2)))
            else:
                row = (b * H + h) * S + s
                for e in range(E):            # (the combine is linear in the partials)
                    k0[e] *= float32(v_scale)
                for e4 in range(0, E, 4):
                    store(part_ptr + (row * D + t * E + e4) * 4, as_u32(k0[e4]),
                          as_u32(k0[e4 + 1]), as_u32(k0[e4 + 2]), as_u32(k0[e4 + 3]))
                if t == 0:
                    ptx.store_u32(ml_ptr + row * 8, as_u32(mx))
                    ptx.store_u32(ml_ptr + row * 8 + 4, as_u32(total))

    paged_decode_kernel.__name__ = f"paged_decode_{dt}_l{lanes}_g{group}_r{rows}" \
        + ("_p" if pipeline else "") + ("_kv8" if kv8 else "")
    return paged_decode_kernel


def _build_combine(dt: str, lanes: int, pdl: bool = False):
    """Merges a row's splits (their maxima in log2 units): thread t of CTA (b, h) writes vector
    t of out[b, h]; rows of one split were written by the main kernel."""
    global cuda
    from numba import float32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, device, pdl_entry

    cuda = numba_cuda()
    splits_of = device(split_count)
    first_key = first_key_fn()
    _, pack, E = codec(dt)
    enter = pdl_entry(pdl)
    itemsize = 16 // E
    load, store = ptx.load_v4_u32, ptx.store_v4_u32
    load_u32, as_f32 = ptx.load_u32, ptx.u32_as_f32

    def paged_decode_combine(part_ptr, ml_ptr, out_ptr, lens_ptr, starts_ptr, lse_ptr, rows, H,
                             S, D, split_keys, window):
        # The lengths are read before the wait for the main kernel (PDL): it never writes them,
        # and it let this kernel start only after its own wait for whatever did. Every thread
        # still waits before it exits: the kernel after this one waits for this one only.
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x
        n_split = int64(1)
        if tid < lanes and row < rows:
            length = int64(load_u32(lens_ptr + (row // H) * 4))
            first = first_key(length, window, starts_ptr, row // H)
            n_split = splits_of(length - first, S, split_keys)
        enter()
        if n_split == 1:                     # the main kernel wrote this row itself (or no row)
            return
        acc = cuda.local.array(8, float32)
        mx = float32(NEG)
        for s in range(n_split):
            mx = max(mx, as_f32(load_u32(ml_ptr + (row * S + s) * 8)))
        total = float32(0.0)
        for e in range(E):
            acc[e] = float32(0.0)
        for s in range(n_split):
            w = math.exp2(as_f32(load_u32(ml_ptr + (row * S + s) * 8)) - mx)
            total += as_f32(load_u32(ml_ptr + (row * S + s) * 8 + 4)) * w
            for e4 in range(0, E, 4):
                x = load(part_ptr + ((row * S + s) * D + tid * E + e4) * 4)
                acc[e4] += as_f32(x[0]) * w
                acc[e4 + 1] += as_f32(x[1]) * w
                acc[e4 + 2] += as_f32(x[2]) * w
                acc[e4 + 3] += as_f32(x[3]) * w
        inv = float32(1.0) / total
        for e in range(E):
            acc[e] *= inv
        r = pack(acc)
        store(out_ptr + (row * D + tid * E) * itemsize, r[0], r[1], r[2], r[3])
        if lse_ptr != 0 and tid == 0:
            ptx.store_u32(lse_ptr + row * 4, ptx.f32_as_u32((mx + math.log2(total))
                                                            * float32(LN2)))

    paged_decode_combine.__name__ = f"paged_decode_combine_{dt}_l{lanes}"
    return paged_decode_combine
