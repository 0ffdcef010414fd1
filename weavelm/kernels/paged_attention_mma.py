"""The device code of paged decode attention on tensor cores (bf16 / fp16 / FP8 caches, head dim 64
or 128, blocks of at least 16 tokens; names as in paged_attention.py, which holds the contract and
the launcher; the work list, which CTA takes which keys, is paged_attention_worklist.py).

Why: the lane kernel (paged_attention_kernels.py) scores each key with FMAs and reduces every
dot product over 16 lanes with shuffles, and computes each softmax step once per lane of the
row: at batch 64 / 2K context it read the cache at 0.78 of the copy rate on an H100, bound by
instruction issue (an H200 with 1.4x the bandwidth ran it only 1.2x faster). Here a warp scores
16 keys against its group of query heads with `mma.sync.m16n8k16` and adds P V with another
D / 8, so a key costs a few instructions and the kernel is left bound by memory (H100, same
split plan as the lane kernel: 0.85 of the copy rate at batch 64 / 2K, 0.96 at 64 / 4K; over
the work list 0.96 and 1.01; benchmarks/RESULTS.md).

A warp takes 16 keys (a step; steps start at multiples of 16 keys, so with blocks of >= 16 tokens
a step's keys share one block and one table read) and its CTA's 4 warps take the steps of its
range of the work list round-robin, one sequence (segment) after another.
Fragments, lane 4g + t:
- scores S = Q K^T, two tiles of 8 keys: A = the group's queries (head rows g and g + 8; rows
  past the group are zero), B = keys 8u + g. Lane t loads its key's elements [t D/4, (t+1) D/4)
  whole (16-byte loads) and the query rows the same elements; a dot product does not care about
  the order of its terms, so the mma's k = 2t, 2t+1 / 8+2t, 9+2t of chunk c take the lane's
  elements 4c, 4c+1 / 4c+2, 4c+3. The lane gets back the scores of heads g, g + 8 for keys
  8u + 2t, 8u + 2t + 1.
- P V: those scores, as probabilities rounded to the mma's dtype, are already P's A fragment
  for keys 2t, 2t+1, 8+2t, 9+2t (FlashAttention-2's register reuse), so the lane loads exactly
  those 4 keys' values, elements [g D/8, (g+1) D/8) whole: output tile j's column g is element
  g D/8 + j (one `prmt` pairs two keys' halves into a B word), and the lane's outputs are
  elements 2t D/8 + j and (2t+1) D/8 + j of heads g and g + 8.
Softmax: per head, a running max and sum in the log2 domain as the lane kernel's; the 4 lanes of
a row agree on the max with two shuffles. Masked keys (before the first visible one, past the
end) get probability 0 and their values are zeroed, so stale cache contents (even NaN bits) never
reach the output. At the end of a segment the CTA merges its warps in shared memory and writes
the output (the sequence whole) or its part (m, l, unnormalised output) for the combine
(paged_attention_worklist.py).
"""
from __future__ import annotations

import math

WARPS = 4                       # per CTA
MAX_ROWS = 1024                 # group x D: the warps' outputs in shared memory (16 KiB + DP pad)
RESIDENT_MMA = {64: 4, 128: 3}  # CTAs an SM holds, by head dim (registers bounded to fit)
TRACE_PTR = 0   # where the CTAs write the global timer at their phases, 0 = off (read when built;
#                 bench_paged_attention.py --trace, worklist.mark_fn)
TRACE_WORDS = 8                 # a CTA's marks: entry, waited, planned, last loop's start, its end,
#                                 exit (the combine's: worklist.COMBINE_TRACE on)
SIGNATURE = "void(" + ", ".join(["uint64"] * 11 + ["int64"] * 7 + ["float64"] * 3) + ")"

cuda = None  # numba.cuda, bound by the builder: a module global, so the simulator can swap it


def mma_group(heads: int, kv_heads: int, head_dim: int) -> int:
    """Query heads one CTA serves: the largest divisor of H / Hkv that fits the 16 rows of an
    mma tile and MAX_ROWS (the whole group where it fits: its keys are then read once)."""
    share = heads // kv_heads
    return max(d for d in range(1, min(share, 16) + 1)
               if share % d == 0 and d * head_dim <= MAX_ROWS)


def _build_mma_kernel(dt: str, D: int, group: int, pdl: bool = False, kv8: bool = False,
                      min_steps: int = 1, trace: int = 0, cost: int = 0, early: bool = False):
    """The tensor-core decode kernel's Python function for one dtype, head dim and head group
    (not yet jitted). `kv8`: the cache holds FP8 (e4m3) with per-tensor scales: keys and
    values are converted to f16 as they are loaded (exact), the queries too (bf16 -> f16),
    and the mma's run on f16; the key scale goes into the scores' scale, the value scale into
    the output. `min_steps`, `cost`: the work list's least share a CTA and what a sequence's
    start is charged (paged_attention_worklist's MIN_STEPS, SEGMENT_COST); `trace`: TRACE_PTR
    above; `early`: the plan is made before the wait for the kernel before (PDL), which must
    not have written the lengths (paged_attention.paged_decode_attention's `lens_staged`)."""
    global cuda
    from numba import float32, int64, uint32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import pdl_entry, warp_mma_fn
    from weavelm.kernels.paged_attention_kernels import LN2, LOG2E, NEG, lane_reduce_fn
    from weavelm.kernels.paged_attention_worklist import STEP, block_scan_fn, mark_fn, visible_fn

    cuda = numba_cuda()
    simulator = ptx.SIMULATOR
    mdt = "f16" if kv8 else dt  # the mma's operand type
    mma = warp_mma_fn(mdt)
    pack_p = ptx.pack_f16x2 if mdt == "f16" else ptx.pack_bf16x2
    to_f16, un_bf16 = ptx.e4m3x4_to_f16x2, ptx.unpack_bf16x2
    load_half, q_convert = ptx.load_v2_u32_nc, kv8 and dt == "bf16"
    eb = 1 if kv8 else 2        # bytes of a cached element
    quad_max, quad_sum = lane_reduce_fn(4, True), lane_reduce_fn(4)   # over a row's 4 lanes
    enter = pdl_entry(pdl)
    pack2 = ptx.pack_bf16x2 if dt == "bf16" else ptx.pack_f16x2
    low, high = ptx.low_halves, ptx.high_halves
    load_nc, load_u32 = ptx.load_v4_u32_nc, ptx.load_u32
    store, store_u32, as_u32 = ptx.store_v4_u32, ptx.store_u32, ptx.f32_as_u32
    KW = D // 8                 # words of a key a lane holds for the scores (D / 4 elements)
    VW = D // 16                # words of a value row a lane holds, per key (D / 8 elements)
    CH = D // 16                # k16 chunks of a dot product
    NT = D // 8                 # n8 tiles of the output
    two = group > 8             # heads in rows g + 8 as well
    threads = 32 * WARPS
    OUTV = group * D // 8       # the CTA's output vectors of 8 elements
    DP = D + 8   # warps' outputs in shared memory: element c NT + j at word 8 j + c, heads DP
    #              apart: a store's lanes (c = 2t, 2t + 1) on distinct banks, not all on one
    n_frag = threads * 6 if simulator else 1
    n_cd = threads * 4 if simulator else 1
    n_red = threads if simulator else 1
    n_kw, n_vw, n_acc = 2 * KW, 4 * VW, 4 * NT   # (local array sizes: constants, not sums)

    visible, mark = visible_fn(), mark_fn(trace)

    block_scan = block_scan_fn(threads)

    def paged_decode_mma_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, starts_ptr, out_ptr,
                                lse_ptr, part_ptr, ml_ptr, rec_ptr, B, H, Hkv, M, bs_shift, T,
                                window, scale, k_scale, v_scale):
        tid = cuda.threadIdx.x
        me_t = cuda.blockIdx.x * TRACE_WORDS   # (the CTA's trace words)
        if tid == 0:
            mark(me_t)
        if not early:                        # else the plan is made before the wait (below)
            enter()
            if tid == 0:
                mark(me_t + 1)
        lane, warp = tid & 31, tid >> 5
        g, t = lane >> 2, lane & 3
        groups = H // group
        grp = cuda.blockIdx.x % groups
        me = cuda.blockIdx.x // groups       # the CTA's place among its group's T
        h0 = grp * group                     # the CTA's first query head
        kvh = h0 // (H // Hkv)
        sh = cuda.shared.array(threads, int64)
        found = cuda.shared.array(2, int64)

        # The work list: every sequence's units (its steps led by `cost`) laid end to end, cut
        # into `used` equal ranges.
        x = int64(0)
        for b in range(tid, B, threads):
            n = visible(lens_ptr, starts_ptr, window, b)[2]
            x += n + cost if n > 0 else n
        block_scan(x, sh, tid)
        total = sh[threads - 1]
        if tid == 0:
            found[0] = -1
        cuda.syncthreads()
        used = min(T, total // (min_steps + cost))   # CTAs with steps (each has at least
        if used == 0 and total > 0:          # one, so a sequence's parts are on consecutive CTAs)
            used = 1
        idle = me >= used                    # early: an idle CTA still waits (below) before it
        if idle and not early:               # exits: the kernel after waits for this one only
            if tid == 0:
                mark(me_t + 5)
            return
        lo = total if idle else me * total // used
        hi = total if idle else (me + 1) * total // used
        run = int64(0)                       # the sequence holding unit lo, and its first unit
        base = int64(0)
        if B <= threads:                     # the first scan serves: x = units of sequence tid
            if x > 0 and sh[tid] - x <= lo and lo < sh[tid]:
                found[0] = tid
                found[1] = sh[tid] - x
            cuda.syncthreads()
            base = B
        while base < B:
            n = int64(0)
            if base + tid < B:
                n = visible(lens_ptr, starts_ptr, window, base + tid)[2]
                if n > 0:
                    n += cost
            incl = block_scan(n, sh, tid)
            before = run + incl - n
            if n > 0 and before <= lo and lo < before + n:
                found[0] = base + tid
                found[1] = before
            run += sh[threads - 1]
            cuda.syncthreads()
            if found[0] >= 0:
                break
            base += threads
        b = found[0]
        pb = found[1]                        # units before sequence b
        if tid == 0:
            mark(me_t + 2)
        if early:                            # the lengths were staged before the kernel before:
            enter()                          # its tail hid the plan; the queries are its output
            if tid == 0:
                mark(me_t + 1)

        frag = cuda.shared.array(n_frag, uint32)           # simulator: the lanes' fragments
        cd = cuda.shared.array(n_cd, float32)              # simulator: their sums
        red = cuda.shared.array(n_red, float32)            # simulator: quad reductions
        ml_sh = cuda.shared.array((WARPS, group, 2), float32)   # per warp and head: max, sum
        acc_sh = cuda.shared.array((WARPS, group, DP), float32)  # unnormalised outputs
        qa = cuda.local.array(KW, uint32)     # query rows g and g + 8 (zero past the group)
        qb = cuda.local.array(KW, uint32)
        kw = cuda.local.array(n_kw, uint32)   # keys g and 8 + g of the step
        vw = cuda.local.array(n_vw, uint32)   # values of keys 2t, 2t+1, 8+2t, 9+2t
        sv = cuda.local.array(8, float32)     # scores [tile u][c0..c3]
        ok = cuda.local.array(4, int64)       # keys 2t, 2t+1, 8+2t, 9+2t visible
        acc = cuda.local.array(n_acc, float32)
        o8 = cuda.local.array(8, float32)
        sc = float32(scale * LOG2E * k_scale)  # scores in log2 units: exp2 below, not exp
        vs = float32(v_scale)
        row_bytes = Hkv * D * eb              # one token's keys (values) of every KV head
        head_off = kvh * D * eb
        q_row = D * 2
        bs_mask = (int64(1) << bs_shift) - 1
        pos = lo
        while pos < hi:                       # one segment a sequence, the same for the CTA
            length, first, steps = visible(lens_ptr, starts_ptr, window, b)
            if steps == 0:
                b += 1
                continue
            st0 = max(pos - pb - cost, 0)     # the sequence's steps [st0, st1) are this CTA's
            st1 = min(steps, hi - pb - cost)
            if st1 <= 0:                      # the range ends in the units leading b's steps
                break
            start = first - (first & (STEP - 1))
            iters = (st1 - st0 + WARPS - 1) // WARPS
            for i in range(KW // 4):         # the sequence's queries of the group
                w = (uint32(0), uint32(0), uint32(0), uint32(0))
                if g < group:
                    w = load_nc(q_ptr + (b * H + h0 + g) * q_row + t * (D // 2) + 16 * i)
                qa[4 * i], qa[4 * i + 1], qa[4 * i + 2], qa[4 * i + 3] = w[0], w[1], w[2], w[3]
                w = (uint32(0), uint32(0), uint32(0), uint32(0))
                if two and g + 8 < group:
                    w = load_nc(q_ptr + (b * H + h0 + g + 8) * q_row + t * (D // 2) + 16 * i)
                qb[4 * i], qb[4 * i + 1], qb[4 * i + 2], qb[4 * i + 3] = w[0], w[1], w[2], w[3]
            if q_convert:                     # f16 mma's against an FP8 cache
                for i in range(KW):
                    lo_, hi_ = un_bf16(qa[i])
                    qa[i] = pack_p(lo_, hi_)
                    lo_, hi_ = un_bf16(qb[i])
                    qb[i] = pack_p(lo_, hi_)
            for i in range(n_acc):
                acc[i] = float32(0.0)
            m0, m1 = float32(NEG), float32(NEG)
            l0, l1 = float32(0.0), float32(0.0)
            if tid == 0:
                mark(me_t + 3)

            for it in range(iters):
                step = st0 + it * WARPS + warp
                active = step < st1               # the same for the warp
                if active or simulator:           # (simulator: every thread meets every barrier)
                    p0 = start + (step if active else st0) * STEP
                    blk = int64(load_u32(table_ptr + (b * M + (p0 >> bs_shift)) * 4))
                    row0 = (blk << bs_shift) + (p0 & bs_mask)
                    for u in range(2):            # keys g, 8 + g: elements [t D/4, (t+1) D/4)
                        a = k_ptr + (row0 + 8 * u + g) * row_bytes + head_off + t * (D // 4) * eb
                        if kv8:                   # D / 4 bytes: 16 at a time, to f16 pairs
                            for i in range(KW // 8):
                                w = load_nc(a + 16 * i)
                                for e in range(4):
                                    o = u * KW + 8 * i + 2 * e
                                    kw[o], kw[o + 1] = to_f16(w[e])
                        else:
                            for i in range(KW // 4):
                                w = load_nc(a + 16 * i)
                                o = u * KW + 4 * i
                                kw[o], kw[o + 1], kw[o + 2], kw[o + 3] = w[0], w[1], w[2], w[3]
                    for x in range(4):            # keys 2t + (x & 1) + 8 (x >> 1): [g D/8, ...)
                        j = 2 * t + (x & 1) + 8 * (x >> 1)
                        a = v_ptr + (row0 + j) * row_bytes + head_off + g * (D // 8) * eb
                        if kv8 and VW == 8:       # D / 8 bytes: 16 (D = 128) or 8 (D = 64)
                            w = load_nc(a)
                            for e in range(4):
                                vw[x * VW + 2 * e], vw[x * VW + 2 * e + 1] = to_f16(w[e])
                        elif kv8:
                            w2 = load_half(a)
                            for e in range(2):
                                vw[x * VW + 2 * e], vw[x * VW + 2 * e + 1] = to_f16(w2[e])
                        else:
                            for i in range(VW // 4):
                                w = load_nc(a + 16 * i)
                                o = x * VW + 4 * i
                                vw[o], vw[o + 1], vw[o + 2], vw[o + 3] = w[0], w[1], w[2], w[3]
                        key = p0 + j
                        ok[x] = 1 if active and key >= first and key < length else 0
                        if ok[x] == 0:            # stale cache contents must not reach P V
                            for i in range(VW):
                                vw[x * VW + i] = uint32(0)
                    for u in range(2):
                        c0, c1, c2, c3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
                        for c in range(CH):
                            c0, c1, c2, c3 = mma(qa[2 * c], qb[2 * c], qa[2 * c + 1],
                                                 qb[2 * c + 1], kw[u * KW + 2 * c],
                                                 kw[u * KW + 2 * c + 1], c0, c1, c2, c3, frag, cd,
                                                 tid)
                        sv[4 * u], sv[4 * u + 1] = c0 * sc, c1 * sc
                        sv[4 * u + 2], sv[4 * u + 3] = c2 * sc, c3 * sc
                    # online softmax; key x of the lane is score sv[4 (x >> 1) + (x & 1)] (head g)
                    # and sv[4 (x >> 1) + 2 + (x & 1)] (head g + 8)
                    n0, n1 = m0, m1
                    for x in range(4):
                        if ok[x] != 0:
                            n0 = max(n0, sv[4 * (x >> 1) + (x & 1)])
                            n1 = max(n1, sv[4 * (x >> 1) + 2 + (x & 1)])
                    n0 = quad_max(n0, red, tid)
                    alpha0 = math.exp2(m0 - n0)
                    m0 = n0
                    l0 *= alpha0
                    alpha1 = float32(1.0)
                    if two:
                        n1 = quad_max(n1, red, tid)
                        alpha1 = math.exp2(m1 - n1)
                        m1 = n1
                        l1 *= alpha1
                    for x in range(4):
                        e = 4 * (x >> 1) + (x & 1)
                        p = float32(0.0)
                        if ok[x] != 0:
                            p = math.exp2(sv[e] - m0)
                        l0 += p
                        sv[e] = p
                        p = float32(0.0)
                        if two and ok[x] != 0:
                            p = math.exp2(sv[e + 2] - m1)
                        l1 += p
                        sv[e + 2] = p
                    pa0, pa2 = pack_p(sv[0], sv[1]), pack_p(sv[4], sv[5])    # head g
                    pa1, pa3 = pack_p(sv[2], sv[3]), pack_p(sv[6], sv[7])    # head g + 8
                    for j in range(NT):
                        wj = j >> 1
                        if j & 1 == 0:
                            b0, b1 = low(vw[wj], vw[VW + wj]), low(vw[2 * VW + wj], vw[3 * VW + wj])
                        else:
                            b0 = high(vw[wj], vw[VW + wj])
                            b1 = high(vw[2 * VW + wj], vw[3 * VW + wj])
                        c0, c1 = acc[4 * j] * alpha0, acc[4 * j + 1] * alpha0
                        if two:
                            c2, c3 = acc[4 * j + 2] * alpha1, acc[4 * j + 3] * alpha1
                        else:                     # rows g + 8 of P are 0: their sums stay 0, and
                            c2, c3 = float32(0.0), float32(0.0)   # no registers hold them
                        c0, c1, c2, c3 = mma(pa0, pa1, pa2, pa3, b0, b1, c0, c1, c2, c3, frag, cd,
                                             tid)
                        acc[4 * j], acc[4 * j + 1] = c0, c1
                        if two:
                            acc[4 * j + 2], acc[4 * j + 3] = c2, c3

            if tid == 0:
                mark(me_t + 4)
            l0 = quad_sum(l0, red, tid)
            l1 = quad_sum(l1, red, tid)
            for r in range(2 if two else 1):  # rows g (r = 0) and g + 8
                h = g + 8 * r
                if h < group:
                    if t == 0:
                        ml_sh[warp, h, 0] = m0 if r == 0 else m1
                        ml_sh[warp, h, 1] = l0 if r == 0 else l1
                    for j in range(NT):
                        acc_sh[warp, h, 8 * j + 2 * t] = acc[4 * j + 2 * r]
                        acc_sh[warp, h, 8 * j + 2 * t + 1] = acc[4 * j + 2 * r + 1]
            cuda.syncthreads()
            whole = st0 == 0 and st1 == steps  # the sequence's only part: the output itself
            slot = (grp * (T + B) + me + b) * group  # else its part (me + b: one a CTA
            for u in range(tid, OUTV, threads):       # and sequence, never two alike)
                i = u // (D // 8)             # vector v (elements 8v..8v+7) of head i
                v = u % (D // 8)
                mx = float32(NEG)
                for wp in range(WARPS):
                    mx = max(mx, ml_sh[wp, i, 0])
                total_l = float32(0.0)
                for e in range(8):
                    o8[e] = float32(0.0)
                for wp in range(WARPS):
                    f = math.exp2(ml_sh[wp, i, 0] - mx)
                    total_l += ml_sh[wp, i, 1] * f
                    for e in range(8):
                        o8[e] += acc_sh[wp, i, 8 * ((8 * v + e) % NT) + (8 * v + e) // NT] * f
                for e in range(8):            # the values' scale (the combine is linear)
                    o8[e] *= vs
                h = h0 + i
                if whole:
                    inv = float32(1.0) / total_l
                    store(out_ptr + (b * H + h) * q_row + 16 * v,
                          pack2(o8[0] * inv, o8[1] * inv), pack2(o8[2] * inv, o8[3] * inv),
                          pack2(o8[4] * inv, o8[5] * inv), pack2(o8[6] * inv, o8[7] * inv))
                    if lse_ptr != 0 and v == 0:   # natural log, of the scores scale * q.k
                        store_u32(lse_ptr + (b * H + h) * 4,
                                  as_u32((mx + math.log2(total_l)) * float32(LN2)))
                else:
                    a = part_ptr + ((slot + i) * D + 8 * v) * 4
                    store(a, as_u32(o8[0]), as_u32(o8[1]), as_u32(o8[2]), as_u32(o8[3]))
                    store(a + 16, as_u32(o8[4]), as_u32(o8[5]), as_u32(o8[6]), as_u32(o8[7]))
                    if v == 0:
                        store_u32(ml_ptr + (slot + i) * 8, as_u32(mx))
                        store_u32(ml_ptr + (slot + i) * 8 + 4, as_u32(total_l))
            if st0 == 0 and grp == 0 and tid == 0:   # where the combine finds the parts:
                last = ((pb + cost + steps) * used - 1) // total   # the CTA of the last step
                store_u32(rec_ptr + b * 8, uint32(me))
                store_u32(rec_ptr + b * 8 + 4, uint32(last - me + 1))
            cuda.syncthreads()                # (shared memory is reused by the next segment)
            pos = pb + cost + st1
            pb += steps + cost
            b += 1
        if tid == 0:
            mark(me_t + 5)

    paged_decode_mma_kernel.__name__ = f"paged_decode_mma_{dt}_d{D}_g{group}" \
        + ("_kv8" if kv8 else "")
    return paged_decode_mma_kernel
