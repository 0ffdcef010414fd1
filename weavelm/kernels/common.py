"""What every kernel module shares: the dtype table, block limits, launch-plan helpers, the codec.

E = elements per 16-byte vector (8 for bf16/fp16, 4 for fp32), V = 16-byte vectors per row,
vpt = vectors per thread (a compile-time shape class of a kernel).

Importing this module does not import numba: the CPU paths (torch references) never need it.
"""
from __future__ import annotations

import torch

DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}  # kernel dtype names
ELEMS = {"bf16": 8, "f16": 8, "f32": 4}  # E: elements per 16-byte vector
FP8 = torch.float8_e4m3fn               # FP8 weights, activations and KV caches
FP8_MAX = float(torch.finfo(FP8).max)   # 448

MAX_BLOCK = 512  # threads per CTA; also every kernel's launch bound (caps registers at 128)
MAX_VPT = 8      # the largest vpt class of every kernel
MAX_VEC = MAX_BLOCK * MAX_VPT  # V limit: rows up to 64 KiB (bf16 D <= 32768, fp32 D <= 16384)
CACHE_LIMIT = 4096  # entries of a host-side memo (token counts vary per step; rebuilds are cheap)


_sms: dict[int, int] = {}


def sm_count(device: int) -> int:
    """Streaming multiprocessors of CUDA device `device` (asked once); 4 without a GPU (the
    simulator), which grids sized from it then run in a few CTAs."""
    n = _sms.get(device)
    if n is None:
        n = _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if torch.cuda.is_available() else 4
    return n


def to_e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """x / scale rounded to e4m3 (nearest even), saturated to +-448: how weavelm stores FP8
    (the division in x's dtype: float32 or float64, as the caller chose)."""
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


# ----------------------------------------------------------------------------- launch plans

def warps_for(threads: int, max_block: int = MAX_BLOCK) -> int:
    """Block size: whole warps covering `threads`, at least one warp, at most `max_block`."""
    return min(max_block, max(32, (threads + 31) // 32 * 32))


def row_shape(n_vec: int, vpt_classes: tuple, max_block: int = MAX_BLOCK) -> tuple[int, int]:
    """(vpt, block) for rows of n_vec vectors: the smallest class of `vpt_classes` whose
    max_block threads cover a row, and the warps that cover it with <= vpt vectors per thread."""
    vpt = next(v for v in vpt_classes if n_vec <= max_block * v)
    return vpt, warps_for(-(-n_vec // vpt), max_block)


def remember(memo: dict, key, value):
    """Store value under key in a bounded memo (emptied once it outgrows CACHE_LIMIT); returns
    value. The hot path reads the dict directly and calls this only on a miss."""
    if len(memo) > CACHE_LIMIT:
        memo.clear()
    memo[key] = value
    return value


# ----------------------------------------------------------------------------- device code

def device(fn):
    """`fn` as a Numba device function, always inlined into its caller."""
    from weavelm.kernels._numba_compat import numba_cuda

    return numba_cuda().jit(device=True, inline="always")(fn)


cuda = None  # numba.cuda, bound by block_reduce_fn (the simulator swaps it)


def block_reduce_fn(is_max: bool):
    """reduce(v, warp_part [33], thread_part [blockDim under the simulator, else any], tid,
    nthreads): the CTA's largest v (is_max) or sum of v, left in warp_part[32] for every
    thread; every thread calls it, and it ends with a barrier. Warp shuffles, then warp 0 over
    the warps' parts; under the simulator (no shuffles) thread 0 over thread_part."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda

    cuda = numba_cuda()
    simulator = ptx.SIMULATOR

    def reduce(v, warp_part, thread_part, tid, nthreads):
        if simulator:
            thread_part[tid] = v
            cuda.syncthreads()
            if tid == 0:
                t = float32(0.0)
                for i in range(nthreads):
                    t = max(t, thread_part[i]) if is_max else t + thread_part[i]
                warp_part[32] = t
        else:
            lane = tid & 31
            k = 16
            while k > 0:
                o = cuda.shfl_xor_sync(0xFFFFFFFF, v, k)
                v = max(v, o) if is_max else v + o
                k >>= 1
            if lane == 0:
                warp_part[tid >> 5] = v
            cuda.syncthreads()
            if tid < 32:
                t = warp_part[lane] if lane < (nthreads >> 5) else float32(0.0)
                k = 16
                while k > 0:
                    o = cuda.shfl_xor_sync(0xFFFFFFFF, t, k)
                    t = max(t, o) if is_max else t + o
                    k >>= 1
                if lane == 0:
                    warp_part[32] = t
        cuda.syncthreads()
    return device(reduce)


def warp_mma_fn(dt: str):
    """mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, frag, cd, tid) -> (d0, d1, d2, d3): one
    `mma.sync.m16n8k16.row.col.f32` of the warp on dt ("f16" or "bf16") operands (fragments as
    the PTX ISA lays them out; every lane calls it). Under the simulator, which has no
    warp-wide instructions, the lanes leave their fragments in `frag` (6 words a thread of the
    CTA) and `cd` (4 floats) between barriers and lane 0 computes the warp's product
    (`ptx_sim._sim_warp_mma`), so every thread of the CTA must call it the same number of
    times."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.ptx_sim import _sim_warp_mma

    cuda = numba_cuda()
    bf16 = dt == "bf16"
    if not ptx.SIMULATOR:
        hw = ptx.mma_bf16_m16n8k16 if bf16 else ptx.mma_f16_m16n8k16

        def mma_hw(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, frag, cd, tid):
            return hw(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
        return device(mma_hw)

    def mma_sim(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, frag, cd, tid):
        frag[tid * 6:tid * 6 + 6] = (a0, a1, a2, a3, b0, b1)
        cd[tid * 4:tid * 4 + 4] = (c0, c1, c2, c3)
        cuda.syncthreads()
        if tid & 31 == 0:
            _sim_warp_mma(frag, cd, tid, bf16)
        cuda.syncthreads()
        d = (float32(cd[tid * 4]), float32(cd[tid * 4 + 1]), float32(cd[tid * 4 + 2]),
             float32(cd[tid * 4 + 3]))
        cuda.syncthreads()
        return d
    return device(mma_sim)


def row_rounding_fn(vpt: int, E: int):
    """round_row(h, m, warp_max [33], thread_part, tid, nthreads, n_vec, row, codes_ptr,
    scale_ptr): the rounding of one row held by a CTA, thread t with its vectors t, t +
    nthreads, ... (E values each, float32 in h[j E ..]) and m its largest |value|: the row's
    scale max(m) / 448 (at least 1e-12) to scale_ptr[row], the codes h / scale in e4m3 to
    codes_ptr (row n_vec x E bytes). Every thread calls it (a block reduction); the kernels
    that round a row (`fp8_quant`'s, `rmsnorm`'s rounded variant) share it, so their codes
    agree bit for bit."""
    from numba import float32

    from weavelm.kernels import ptx

    store_u32, pack4, as_u32 = ptx.store_u32, ptx.pack_e4m3x4, ptx.f32_as_u32
    block_max = block_reduce_fn(True)

    def round_row(h, m, warp_max, thread_part, tid, nthreads, n_vec, row, codes_ptr,
                  scale_ptr):
        block_max(m, warp_max, thread_part, tid, nthreads)
        s = max(warp_max[32] / float32(448.0), float32(1e-12))
        if tid == 0:
            store_u32(scale_ptr + row * 4, as_u32(s))
        for j in range(vpt):
            v = tid + j * nthreads
            if v < n_vec:
                out = codes_ptr + (row * n_vec + v) * E
                for q in range(E // 4):
                    o = j * E + 4 * q
                    store_u32(out + 4 * q, pack4(h[o] / s, h[o + 1] / s, h[o + 2] / s,
                                                 h[o + 3] / s))
    return device(round_row)


def pdl_entry(pdl: bool):
    """enter(): a kernel built for programmatic dependent launch (`launcher.pdl_enabled`) calls
    it before reading anything an earlier kernel wrote and before any write: it waits for the
    kernel before, then lets the next one start its CTAs. Nothing when `pdl` is False."""
    from weavelm.kernels import ptx

    wait, launch = ptx.grid_dep_wait, ptx.grid_dep_launch

    # (launch_dependents before the wait was slower: RESULTS.md, PDL)
    def enter():
        if pdl:
            wait()
            launch()
    return device(enter)


def codec(dt: str):
    """(unpack, pack, E) for dtype dt: unpack(words, buf) writes E floats of one 16-byte vector
    (4 uint32 words) to buf[0:E]; pack(buf) returns the 4 words of buf[0:E], rounded to nearest
    even. Inlined device functions built on the ptx primitives."""
    from weavelm.kernels import ptx

    if dt == "f32":
        as_f32, as_u32 = ptx.u32_as_f32, ptx.f32_as_u32

        def unpack(w, buf):
            buf[0] = as_f32(w[0])
            buf[1] = as_f32(w[1])
            buf[2] = as_f32(w[2])
            buf[3] = as_f32(w[3])

        def pack(buf):
            return as_u32(buf[0]), as_u32(buf[1]), as_u32(buf[2]), as_u32(buf[3])
        return device(unpack), device(pack), ELEMS[dt]

    un2, pk2 = (ptx.unpack_bf16x2, ptx.pack_bf16x2) if dt == "bf16" else \
        (ptx.unpack_f16x2, ptx.pack_f16x2)

    def unpack16(w, buf):
        buf[0], buf[1] = un2(w[0])
        buf[2], buf[3] = un2(w[1])
        buf[4], buf[5] = un2(w[2])
        buf[6], buf[7] = un2(w[3])

    def pack16(buf):
        return (pk2(buf[0], buf[1]), pk2(buf[2], buf[3]), pk2(buf[4], buf[5]),
                pk2(buf[6], buf[7]))
    return device(unpack16), device(pack16), ELEMS[dt]
