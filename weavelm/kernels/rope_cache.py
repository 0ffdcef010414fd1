"""Rotary embedding of q and k, fused with writing k and v into the paged KV cache.

T = tokens, H / Hkv = query / KV heads, D = head dim, P = table positions, E = elements per
16-byte vector, NB / bs = cache blocks / tokens per block.

    q_rot = rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    q_rot, k_rot = rope_and_cache(..., return_k=True)   # the rotated k as a tensor too

q [T, H, D], k / v [T, Hkv, D] (rows may be strided: views into the fused qkv projection; the
heads of a row contiguous); cos / sin [P, D] float32 (Hugging Face's rotate-half layout: the
rotation pairs element i with i + D/2); positions, slot_mapping [T] int64; caches
[NB, bs, Hkv, D]. Returns the rotated q [T, H, D]; the rotated k and v go to cache slot
slot_mapping[t] (= block * bs + offset). Math in fp32, rounded once to the tensors' dtype.
With return_k, the rotated k [T, Hkv, D] is returned as well (prefill: a fresh prompt attends
to its own keys straight from it). An FP8 (e4m3) cache (bf16 / fp16 tensors) takes the rotated k
and v divided by `k_scale` / `v_scale`, rounded to e4m3; the returned k is not rounded.

Why: in a decode step the rotary embedding and the cache writes are some 16 small torch kernels
per layer (gathers of the tables, casts, the half rotation, two index copies), each a few
microseconds: more than the attention itself. In a prefill step the same torch ops move the
activations in fp32 several times over (how much: benchmarks/HISTORY.md, 2026-12-02). One CTA
per token does all of it.
"""
from __future__ import annotations

import torch

from weavelm.kernels.common import DTYPES, ELEMS, FP8, remember, to_e4m3, warps_for

MAX_THREADS = 512           # one CTA per token: enough threads that a decode token takes one pass


def rotate_half_ref(x, cos, sin):
    """x [T, n, D] (any float dtype), cos/sin [T, 1, D] float32 -> rotated x in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def rope_and_cache_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                       return_k: bool = False, k_scale: float = 1.0, v_scale: float = 1.0):
    """The torch reference (and CPU path)."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q_rot, k_rot = rotate_half_ref(q, c, s), rotate_half_ref(k, c, s)
    kw, vw = k_rot, v
    if k_cache.dtype == FP8:          # (torch copies FP8 rows by index only as bytes)
        kw = to_e4m3(k_rot.float(), k_scale).view(torch.uint8)
        vw = to_e4m3(v.float(), v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, kw)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, vw)
    return (q_rot, k_rot) if return_k else q_rot


def supported(q, k_cache) -> bool:
    """q's dtype has a kernel, and the cache is of q's dtype or FP8 (for bf16 / fp16)."""
    D = q.shape[-1]
    fp8 = k_cache.dtype == FP8 and q.dtype in (torch.bfloat16, torch.float16)
    return (q.dtype in DTYPES and (k_cache.dtype == q.dtype or fp8)
            and D % (2 * ELEMS[DTYPES[q.dtype]]) == 0 and q.stride(-1) == 1
            and q.stride(-2) == D)


def rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                   return_k: bool = False, k_scale: float = 1.0, v_scale: float = 1.0):
    if q.is_cuda and supported(q, k_cache) and supported(k, k_cache) and supported(v, k_cache):
        return rope_and_cache_cuda(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                                   return_k, k_scale, v_scale)
    return rope_and_cache_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                              return_k, k_scale, v_scale)


SIGNATURE = "void(" + ", ".join(["uint64"] * 11 + ["int64"] * 6 + ["float64"] * 2) + ")"
_plans: dict = {}


def _kernel(dt: str, kv8: bool, device: int):
    k = _plans.get((dt, kv8, device))
    if k is None:
        from weavelm.kernels import launcher
        pdl = launcher.pdl_enabled(device)
        k = remember(_plans, (dt, kv8, device), launcher.kernel(
            ("rope_cache", dt, kv8), lambda: _build_kernel(dt, kv8, pdl), SIGNATURE,
            max_threads=MAX_THREADS, pdl=pdl))
    return k


def rope_and_cache_cuda(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                        return_k: bool = False, k_scale: float = 1.0, v_scale: float = 1.0):
    """Launcher: one CTA per token (same contract as the reference)."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape[1] != D \
            or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"rope_and_cache: cos/sin must be contiguous float32 [P, {D}]")
    if tuple(k_cache.shape[2:]) != (Hkv, D) or not (k_cache.is_contiguous()
                                                     and v_cache.is_contiguous()):
        raise ValueError(f"rope_and_cache: the caches must be contiguous [NB, bs, {Hkv}, {D}]")
    if positions.dtype != torch.int64 or slot_mapping.dtype != torch.int64:
        raise ValueError("rope_and_cache: positions and slot_mapping must be int64")
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(T, Hkv, D, dtype=k.dtype, device=k.device) if return_k else None
    if T:
        E = ELEMS[DTYPES[q.dtype]]
        items = (H + Hkv) * D // (2 * E) + Hkv * D // E
        dev = max(q.get_device(), 0)
        _kernel(DTYPES[q.dtype], k_cache.dtype == FP8, dev).launch(
            T, warps_for(items, MAX_THREADS), dev, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), slot_mapping.data_ptr(), out.data_ptr(),
            0 if k_out is None else k_out.data_ptr(), H, Hkv, D, q.stride(0), k.stride(0),
            v.stride(0), float(k_scale), float(v_scale))
    return (out, k_out) if return_k else out


# ----------------------------------------------------------------------------- kernel

cuda = None  # numba.cuda, bound by _build_kernel: a module global, so the simulator can swap it


def _build_kernel(dt: str, kv8: bool = False, pdl: bool = False):
    """One CTA per token t. Work items: for each of the H + Hkv q/k heads, the D/2/E vector
    pairs (i, i + D/2) to rotate; then for each of the Hkv v heads, its D/E vectors to copy.
    `kv8`: the cache is FP8: its rows are D bytes, written E bytes (two words) at a time."""
    global cuda
    from numba import float32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, device, pdl_entry

    cuda = numba_cuda()
    enter = pdl_entry(pdl)
    unpack, pack, E = codec(dt)
    itemsize = 16 // E
    load, load_nc, store = ptx.load_v4_u32, ptx.load_v4_u32_nc, ptx.store_v4_u32
    load_u32, as_f32 = ptx.load_u32, ptx.u32_as_f32
    store_u32, pack8 = ptx.store_u32, ptx.pack_e4m3x4
    c_item = 1 if kv8 else itemsize         # bytes per cached element

    def store_fp8(dst, r, s):
        """E = 8 elements r[0:8] to an FP8 cache at dst: rounded to the tensors' dtype first
        (as the torch path stores the rotated k), divided by the scale s, rounded to e4m3."""
        unpack(pack(r), r)
        store_u32(dst, pack8(r[0] / s, r[1] / s, r[2] / s, r[3] / s))
        store_u32(dst + 4, pack8(r[4] / s, r[5] / s, r[6] / s, r[7] / s))

    store_fp8 = device(store_fp8)

    def rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                          slot_ptr, out_ptr, kout_ptr, H, Hkv, D, q_stride, k_stride,
                          v_stride, k_scale, v_scale):
        enter()
        t = cuda.blockIdx.x
        a = cuda.local.array(8, float32)            # x[i..i+E)
        b = cuda.local.array(8, float32)            # x[i+D/2..)
        r = cuda.local.array(8, float32)
        # int64 positions and slots, read as their low words (both stay below 2**31)
        pos = int64(load_u32(pos_ptr + t * 8))
        slot = int64(load_u32(slot_ptr + t * 8))
        half_vecs = D // (2 * E)
        rot_items = (H + Hkv) * half_vecs
        items = rot_items + Hkv * (D // E)
        item = cuda.threadIdx.x
        while item < items:
            if item < rot_items:
                head = item // half_vecs
                i = (item % half_vecs) * E             # element offset in the first half
                dst2 = 0                               # a second copy: the rotated k
                is_q = head < H
                if is_q:
                    src = q_ptr + (t * q_stride + head * D) * itemsize
                    dst = out_ptr + ((t * H + head) * D) * itemsize
                    step = itemsize                    # bytes per element at dst
                else:
                    src = k_ptr + (t * k_stride + (head - H) * D) * itemsize
                    dst = kc_ptr + ((slot * Hkv + head - H) * D) * c_item
                    step = c_item
                    if kout_ptr != 0:
                        dst2 = kout_ptr + ((t * Hkv + head - H) * D) * itemsize
                unpack(load_nc(src + i * itemsize), a)
                unpack(load_nc(src + (i + D // 2) * itemsize), b)
                trig = pos * D + i                     # element index into cos / sin
                for e4 in range(0, E, 4):              # out1 = a cos1 - b sin1
                    w = load_nc(cos_ptr + (trig + e4) * 4)
                    z = load_nc(sin_ptr + (trig + e4) * 4)
                    for e in range(4):
                        r[e4 + e] = a[e4 + e] * as_f32(w[e]) - b[e4 + e] * as_f32(z[e])
                if is_q or not kv8:
                    w4 = pack(r)
                    store(dst + i * step, w4[0], w4[1], w4[2], w4[3])
                else:
                    store_fp8(dst + i * step, r, float32(k_scale))
                if dst2 != 0:
                    w4 = pack(r)
                    store(dst2 + i * itemsize, w4[0], w4[1], w4[2], w4[3])
                trig += D // 2
                for e4 in range(0, E, 4):              # out2 = b cos2 + a sin2
                    w = load_nc(cos_ptr + (trig + e4) * 4)
                    z = load_nc(sin_ptr + (trig + e4) * 4)
                    for e in range(4):
                        r[e4 + e] = b[e4 + e] * as_f32(w[e]) + a[e4 + e] * as_f32(z[e])
                if is_q or not kv8:
                    w4 = pack(r)
                    store(dst + (i + D // 2) * step, w4[0], w4[1], w4[2], w4[3])
                else:
                    store_fp8(dst + (i + D // 2) * step, r, float32(k_scale))
                if dst2 != 0:
                    w4 = pack(r)
                    store(dst2 + (i + D // 2) * itemsize, w4[0], w4[1], w4[2], w4[3])
            else:
                j = item - rot_items
                head = j // (D // E)
                col = (j % (D // E)) * E               # first element of the vector
                x = load(v_ptr + (t * v_stride + head * D + col) * itemsize)
                if kv8:
                    unpack(x, r)
                    store_fp8(vc_ptr + (slot * Hkv + head) * D + col, r, float32(v_scale))
                else:
                    store(vc_ptr + ((slot * Hkv + head) * D + col) * itemsize, x[0], x[1],
                          x[2], x[3])
            item += cuda.blockDim.x

    rope_cache_kernel.__name__ = f"rope_cache_{dt}" + ("_kv8" if kv8 else "")
    return rope_cache_kernel
