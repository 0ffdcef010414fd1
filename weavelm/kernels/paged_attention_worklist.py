"""The tensor-core decode kernel's work list (paged_attention_mma.py): how a batch's keys are
shared among the CTAs, and the merge of the sequences it cuts into parts.

Every sequence's visible keys, in steps of STEP (a step starts at a multiple of STEP, so with
blocks of >= 16 tokens its keys share one block), are laid end to end, sequence after sequence,
each sequence with steps led by SEGMENT_COST units that hold no keys: what a CTA pays to start
a sequence (its queries' loads, the pipeline's start, the warps' merge at the end), charged so
that a CTA holding the end of one sequence and the start of the next is not the one the call
waits for. The `total` units are cut into `used` = min(T, total // (MIN_STEPS + SEGMENT_COST))
equal ranges (at least one), one a CTA (T CTAs a head group: one wave of what the SMs hold), so
each range holds at least one step. So every CTA gets the same work whatever the lengths are,
no CTA is launched without work for it and none waits for a long sequence alone; the plan is
made on the device from the context lengths (each CTA sums them and finds its first sequence
with a prefix scan: `locate`), so it stays inside CUDA graphs. A CTA whose range holds a
sequence's steps whole writes its output; otherwise each CTA holding steps of sequence b writes
an fp32 part (max, sum, unnormalised output) in slot `cta + b` (unique: a later sequence starts
at the CTA where the previous one ends or later) and counts itself in b's counter for its head
group; the last to count merges the parts (`merge`, in slot order: the same sums whichever CTA
ends last), writes the output and sets the counter back to 0 (CUDA graphs replay it as is). A
CTA's range ending in b's leading units holds nothing of b, so b's parts come from consecutive
CTAs: those of its first and last steps, both known from the cut (`parts`).

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


def steps_of(length: int, first: int) -> int:
    """Steps of sequence with `length` keys whose first visible key is `first`."""
    if length <= first:
        return 0
    return -(-(length - (first - first % STEP)) // STEP)


def ctas_used(total: int, T: int, least: int = 1) -> int:
    """CTAs with work: min(T, total units // least), at least one where there are steps."""
    used = min(T, total // least)
    return 1 if used == 0 and total > 0 else used


def plan(steps: list[int], T: int, min_steps: int = 1,
         cost: int = 0) -> list[list[tuple[int, int, int]]]:
    """The CTAs' work: for CTA c < used, its segments (b, first step, end step) in order;
    `cost`: SEGMENT_COST."""
    units = [n + cost if n else 0 for n in steps]
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
    """(first CTA, number of CTAs) holding sequence b, as the kernel finds them: the CTAs of
    b's first and of its last step (cta_of(unit x) = ((x + 1) used - 1) // total)."""
    units = [n + cost if n else 0 for n in steps]
    total, before = sum(units), sum(units[:b]) + cost
    used = ctas_used(total, T, min_steps + cost)
    first = ((before + 1) * used - 1) // total
    last = ((before + steps[b]) * used - 1) // total
    return first, last - first + 1


cuda = None  # numba.cuda, bound by the builder: a module global, so the simulator can swap it


def visible_fn():
    """Device function visible(lens_ptr, starts_ptr, window, b) -> (length, first visible key,
    steps) of sequence b; its steps of STEP keys start at the multiple of STEP at or before
    the first visible key."""
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


def locate_fn(threads: int, least: int, cost: int):
    """Device function locate(lens_ptr, starts_ptr, window, B, T, me, sh, found, tid) ->
    (used, total, lo, hi, b, pb): the work list seen from CTA `me` of its head group's T:
    the CTAs with work and the units of all sequences; where me < used, its range [lo, hi),
    the sequence b holding unit lo and the units before b. Every thread of the CTA calls it
    (`sh`: `threads` int64 of shared memory, `found`: 2)."""
    global cuda
    from numba import int64

    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import device

    cuda = numba_cuda()
    visible = visible_fn()

    def block_scan(x, sh, tid):
        """Inclusive prefix sum of x over the CTA's threads (Hillis-Steele in shared memory;
        the total is then sh[threads - 1])."""
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

    block_scan = device(block_scan)

    def locate(lens_ptr, starts_ptr, window, B, T, me, sh, found, tid):
        x = int64(0)                         # units of the sequences tid, tid + threads, ...
        for b in range(tid, B, threads):
            n = visible(lens_ptr, starts_ptr, window, b)[2]
            x += n + cost if n > 0 else n
        block_scan(x, sh, tid)
        total = sh[threads - 1]
        if tid == 0:
            found[0] = -1
        cuda.syncthreads()
        used = min(T, total // least)        # (each CTA's range then holds a step)
        if used == 0 and total > 0:
            used = 1
        if me >= used:
            return used, total, int64(0), int64(0), int64(0), int64(0)
        lo = me * total // used
        hi = (me + 1) * total // used
        run = int64(0)                       # units before the sequences of this scan
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
        return used, total, lo, hi, found[0], found[1]

    return device(locate)


def merge_fn(D: int, group: int):
    """Device function merge(part_ptr, ml_ptr, r0, n, v, acc) -> (max, sum): the n parts of
    one query head (rows r0, r0 + group, ... of the parts) merged for its vector v (elements
    8v..8v+7), normalised, into acc[0:8]; max and sum in the log2 domain, for its lse. One
    online pass, parts 4 at a time with their loads issued together (addresses clamped to
    the last part, weights 0 past it). Volatile loads: the parts were written by other CTAs
    of this kernel, after which the caller saw their count."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import device
    from weavelm.kernels.paged_attention_kernels import NEG

    cuda = numba_cuda()
    load, load_u32 = ptx.load_v4_u32_volatile, ptx.load_u32_volatile
    as_f32 = ptx.u32_as_f32

    def merge(part_ptr, ml_ptr, r0, n, v, acc):
        mk = cuda.local.array(4, float32)
        lk = cuda.local.array(4, float32)
        xk = cuda.local.array(32, float32)
        mx = float32(NEG)
        total = float32(0.0)
        for e in range(8):
            acc[e] = float32(0.0)
        for s0 in range(0, n, 4):
            for k in range(4):
                r = r0 + min(s0 + k, n - 1) * group
                mk[k] = as_f32(load_u32(ml_ptr + r * 8))
                lk[k] = as_f32(load_u32(ml_ptr + r * 8 + 4))
                for e4 in range(0, 8, 4):
                    x = load(part_ptr + (r * D + v * 8 + e4) * 4)
                    for i in range(4):
                        xk[k * 8 + e4 + i] = as_f32(x[i])
            new = max(max(mx, mk[0]), max(max(mk[1], mk[2]), mk[3]))   # (clamped: a part's)
            alpha = math.exp2(mx - new)
            mx = new
            total *= alpha
            for e in range(8):
                acc[e] *= alpha
            for k in range(4):
                w = math.exp2(mk[k] - mx) if s0 + k < n else float32(0.0)
                total += lk[k] * w
                for e in range(8):
                    acc[e] += xk[k * 8 + e] * w
        inv = float32(1.0) / total
        for e in range(8):
            acc[e] *= inv
        return mx, total

    return device(merge)
