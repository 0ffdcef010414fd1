"""The tensor-core decode kernel's work list (paged_attention_mma.py): how a batch's keys are
shared among the CTAs, and the combine of the sequences it cuts into parts.

Every sequence's visible keys, in steps of STEP (a step starts at a multiple of STEP, so with
blocks of >= 16 tokens its keys share one block), are laid end to end, sequence after sequence,
each sequence's steps led by SEGMENT_COST units that hold no keys (what a CTA pays to start a
sequence: its queries' loads, the pipeline's start, the warps' merge at the end; charged so
that a CTA holding the end of one sequence and the start of the next is not the one the call
waits for). The `total` units are cut into `used` = min(T, total // (MIN_STEPS +
SEGMENT_COST)) equal ranges (at least one), one a CTA (T CTAs a head group: one wave of what
the SMs hold), so each range holds at least one step. So every CTA gets the same work whatever
the lengths are, no CTA is launched without work for it and none waits for a long sequence
alone; the plan is made on the device from the context lengths (each CTA sums them and finds
its first sequence with a prefix scan), so it stays inside CUDA graphs. A CTA whose range holds
a sequence's steps whole writes its output; otherwise each CTA holding steps of sequence b
writes an fp32 part (max, sum, unnormalised output) in slot `cta + b` (unique: a later
sequence starts at the CTA where the previous one ends or later), and the CTA holding b's
first step records (that CTA, the number of parts) for the combine. A range ending in b's
leading units holds nothing of b, so the parts of a sequence come from consecutive CTAs.

`plan` is the same work list in Python: the tests check the kernel's outputs over it.
"""
from __future__ import annotations

import math

STEP = 16                       # keys a warp scores at once
# A CTA's least share of steps (read when the kernel is built; a benchmark may set it between
# calls, each value its own build). 4 measured faster at batch 1 (1K keys 17.1 -> 11.6 µs: fewer
# parts to merge) and level or slower at 16-64 (RESULTS.md, eleventh session); batch 1 runs
# the lane kernel by default, so 1.
MIN_STEPS = 1
# Units a sequence's start is charged in the cut (read when the kernel is built, as MIN_STEPS).
SEGMENT_COST = 0
COMBINE_TRACE = 1 << 19         # the combine's trace words start here (mark_fn)
COMBINE_SIGNATURE = "void(" + ", ".join(["uint64"] * 7 + ["int64"] * 4) + ")"


def steps_of(length: int, first: int) -> int:
    """Steps of sequence with `length` keys whose first visible key is `first`."""
    if length <= first:
        return 0
    return -(-(length - (first - first % STEP)) // STEP)


def ctas_used(total: int, T: int, least: int = 1) -> int:
    """CTAs with work: min(T, total units // least), at least one where there are steps."""
    used = min(T, total // least)
    return 1 if used == 0 and total > 0 else used


def units_of(steps: list[int], cost: int) -> list[int]:
    """Each sequence's units in the cut: its steps led by `cost` (none where it has no steps)."""
    return [n + cost if n else 0 for n in steps]


def plan(steps: list[int], T: int, min_steps: int = 1,
         cost: int = 0) -> list[list[tuple[int, int, int]]]:
    """The CTAs' work: for CTA c < used, its segments (b, first step, end step) in order;
    `cost`: SEGMENT_COST."""
    units = units_of(steps, cost)
    total = sum(units)
    used = ctas_used(total, T, min_steps + cost)
    out = []
    for c in range(used):
        lo, hi = c * total // used, (c + 1) * total // used
        segs, before = [], 0
        for b, n in enumerate(steps):
            a, e = max(lo, before + cost), min(hi, before + units[b])
            if a < e:
                segs.append((b, a - before - cost, e - before - cost))
            before += units[b]
        out.append(segs)
    return out


def parts(steps: list[int], T: int, b: int, min_steps: int = 1,
          cost: int = 0) -> tuple[int, int]:
    """(first CTA, number of CTAs) holding sequence b: the record the kernel writes, from
    the CTA of b's first and of its last step (cta_of(x) = ((x + 1) used - 1) // total)."""
    units = units_of(steps, cost)
    total, before = sum(units), sum(units[:b]) + cost
    used = ctas_used(total, T, min_steps + cost)
    first = ((before + 1) * used - 1) // total
    last = ((before + steps[b]) * used - 1) // total
    return first, last - first + 1


cuda = None  # numba.cuda, bound by the builder: a module global, so the simulator can swap it


def visible_fn():
    """Device function visible(lens_ptr, starts_ptr, window, b) -> (length, first visible key,
    steps) of sequence b; its steps of STEP keys start at the multiple of STEP at or before
    the first visible key (kernel and combine share it)."""
    from numba import int64

    from weavelm.kernels import ptx
    from weavelm.kernels.common import device
    from weavelm.kernels.paged_attention_kernels import first_key_fn

    first_key = first_key_fn()
    load_u32 = ptx.load_u32

    def visible(lens_ptr, starts_ptr, window, b):
        length = int64(load_u32(lens_ptr + b * 4))
        first = first_key(length, window, starts_ptr, b)
        steps = int64(0)
        if length > first:                   # (steps_of)
            steps = (length - (first - (first & (STEP - 1))) + STEP - 1) // STEP
        return length, first, steps

    return device(visible)


def block_scan_fn(threads: int):
    """Device function block_scan(x, sh, tid): the inclusive prefix sum of x over the CTA's
    `threads` threads (Hillis-Steele in the shared array sh of `threads` int64; the total is
    then sh[threads - 1]); every thread calls it. The plan's scans of the lengths."""
    global cuda
    from numba import int64

    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import device

    cuda = numba_cuda()

    def block_scan(x, sh, tid):
        sh[tid] = x
        cuda.syncthreads()
        d = 1
        while d < threads:
            y = sh[tid - d] if tid >= d else int64(0)
            cuda.syncthreads()
            sh[tid] += y
            cuda.syncthreads()
            d *= 2
        return sh[tid]

    return device(block_scan)


def mark_fn(trace: int):
    """Device function mark(slot): where `trace` (a device address, TRACE_PTR of the mma
    module; 0 = off, the calls compile to nothing) is set, the low 32 bits of the global
    timer (ns) go to word `slot` there: a benchmark's timeline of the kernels' phases. The
    kernels mark their entry before the wait for the kernel before them (programmatic
    dependent launch): no kernel but the benchmark's own zeroing touches those words."""
    from numba import uint32

    from weavelm.kernels import ptx
    from weavelm.kernels.common import device

    timer, store_u32 = ptx.globaltimer_ns, ptx.store_u32

    def mark(slot):
        if trace != 0:
            store_u32(trace + slot * 4, uint32(timer() & 0xFFFFFFFF))

    return device(mark)


def _build_mma_combine(dt: str, D: int, group: int, pdl: bool = False, trace: int = 0):
    """Merges a sequence's parts: thread t of CTA (b, h) writes vector t (8 elements) of
    out[b, h] from the parts the CTAs rec[b] names wrote (nothing where the sequence had one
    part: the main kernel wrote the output itself). `trace`: as the main kernel's, its marks
    (entry, waited, exit) at words COMBINE_TRACE + 4 x CTA on."""
    global cuda
    from numba import float32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, pdl_entry
    from weavelm.kernels.paged_attention_kernels import LN2, NEG

    cuda = numba_cuda()
    _, pack, _ = codec(dt)
    enter = pdl_entry(pdl)
    visible, mark = visible_fn(), mark_fn(trace)
    load, store = ptx.load_v4_u32, ptx.store_v4_u32
    load_u32, as_f32 = ptx.load_u32, ptx.u32_as_f32
    lanes = D // 8

    def paged_decode_mma_combine(part_ptr, ml_ptr, rec_ptr, out_ptr, lens_ptr, starts_ptr,
                                 lse_ptr, B, H, T, window):
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x                 # b * H + h
        me_t = COMBINE_TRACE + 4 * row
        if tid == 0:
            mark(me_t)
        enter()
        if tid == 0:
            mark(me_t + 1)
        b, h = row // H, row % H
        if tid >= lanes:
            return
        n = int64(load_u32(rec_ptr + b * 8 + 4))     # (read with the length, not after it:
        first = int64(load_u32(rec_ptr + b * 8))     # a sequence with no steps has no record)
        if visible(lens_ptr, starts_ptr, window, b)[2] == 0 or n <= 1:
            return
        slot0 = ((h // group) * (T + B) + first + b) * group + h % group   # part s: + s group
        # Parts 4 at a time, their loads issued together (addresses clamped to the last part,
        # weights 0 past it): a part's loads no longer wait for the previous part's sums.
        acc = cuda.local.array(8, float32)
        mk = cuda.local.array(4, float32)
        lk = cuda.local.array(4, float32)
        xk = cuda.local.array(32, float32)
        mx = float32(NEG)
        for s0 in range(0, n, 4):
            for k in range(4):
                mk[k] = as_f32(load_u32(ml_ptr + (slot0 + min(s0 + k, n - 1) * group) * 8))
            for k in range(4):
                mx = max(mx, mk[k])
        total = float32(0.0)
        for e in range(8):
            acc[e] = float32(0.0)
        for s0 in range(0, n, 4):
            for k in range(4):
                r = slot0 + min(s0 + k, n - 1) * group
                mk[k] = as_f32(load_u32(ml_ptr + r * 8))
                lk[k] = as_f32(load_u32(ml_ptr + r * 8 + 4))
                for e4 in range(0, 8, 4):
                    x = load(part_ptr + (r * D + tid * 8 + e4) * 4)
                    for i in range(4):
                        xk[k * 8 + e4 + i] = as_f32(x[i])
            for k in range(4):
                w = math.exp2(mk[k] - mx) if s0 + k < n else float32(0.0)
                total += lk[k] * w
                for e in range(8):
                    acc[e] += xk[k * 8 + e] * w
        inv = float32(1.0) / total
        for e in range(8):
            acc[e] *= inv
        p = pack(acc)
        store(out_ptr + (row * D + tid * 8) * 2, p[0], p[1], p[2], p[3])
        if lse_ptr != 0 and tid == 0:
            ptx.store_u32(lse_ptr + row * 4, ptx.f32_as_u32((mx + math.log2(total))
                                                            * float32(LN2)))
        if tid == 0:
            mark(me_t + 2)

    paged_decode_mma_combine.__name__ = f"paged_decode_mma_combine_{dt}_d{D}_g{group}"
    return paged_decode_mma_combine
