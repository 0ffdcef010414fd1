"""Decode attention over a paged KV cache (flash-decoding: split-K over the keys).

B = sequences (one query token each), H / Hkv = query / KV heads, D = head dim, NB = cache
blocks, bs = tokens per block, M = block-table columns, S = key splits, E = elements per 16-byte
vector (8 for bf16/fp16, 4 for fp32), L = D / E lanes per key.

    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window)

q [B, H, D]; k_cache, v_cache [NB, bs, Hkv, D]; block_tables [B, M] int32 (sequence b's keys
0..context_lens[b]-1 live in blocks block_tables[b, 0], [b, 1], ...); out [B, H, D]. Query head h
reads KV head h // (H / Hkv) (grouped-query attention). With `window`, the query (at position
context_lens[b] - 1) sees only the last `window` keys, as Mistral's sliding window.

Why a kernel of our own: the decode step runs under CUDA graphs, so attention must read the
cache in place, with no host sync and no per-step gather of every sequence's keys into a padded
copy (the gather costs as much memory traffic again as the keys themselves); torch's built-in
varlen attention has no block table on the torch the GPU machines run.

Kernel layout: one CTA per (query head, sequence, split), heads fastest so the CTAs that share a
KV head run together and its keys come from L2 after the first read. The CTA's 4 warps take keys
round-robin; within a warp, L lanes hold one key row (each lane one 16-byte vector of K and V),
so a warp scores 32 / L keys at once (two such rows per iteration, so the loads of both are in
flight together: decode attention is bound by memory latency, not bandwidth), reduces the dot product over its L lanes with shuffles,
and keeps an online softmax (running max m, sum l, and its E output elements). The CTA merges
its warps' states in shared memory. With S = 1 it writes the output; with S > 1 each split
writes (m, l, unnormalised output) in fp32 and `_combine` merges the splits (a second launch).
S is chosen from (B, H, SMs) alone, so it is the same on every replay of a captured graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weavelm.kernels.common import DTYPES, ELEMS, remember

WARPS = 4                       # per CTA
NEG = -1.0e30                   # "minus infinity" that keeps exp() and max() NaN-free
MAX_SPLITS = 16


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                               window: int | None = None) -> torch.Tensor:
    """The torch reference (and CPU path): gathers each sequence's blocks, masks, runs SDPA."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    tables = block_tables.long()
    keys = k_cache[tables].reshape(B, -1, Hkv, D).transpose(1, 2)          # [B, Hkv, M*bs, D]
    values = v_cache[tables].reshape(B, -1, Hkv, D).transpose(1, 2)
    pos = torch.arange(keys.shape[2], device=q.device)
    lens = context_lens.long()[:, None]
    visible = pos[None, :] < lens                                           # [B, M*bs]
    if window:
        visible &= pos[None, :] >= lens - window
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values,
                                       attn_mask=visible[:, None, None, :], scale=scale,
                                       enable_gqa=True)                     # [B, H, 1, D]
    return o.squeeze(2)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           window: int | None = None, out=None) -> torch.Tensor:
    """CUDA tensors the kernel takes -> the kernel; anything else -> the reference."""
    if q.is_cuda and supported(q, k_cache):
        return paged_decode_attention_cuda(q, k_cache, v_cache, block_tables, context_lens,
                                           scale, window, out)
    o = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale,
                                   window)
    return o if out is None else out.copy_(o)


# ----------------------------------------------------------------------------- launchers

SIGNATURE = "void(" + ", ".join(["uint64"] * 8 + ["int64"] * 8 + ["float64"]) + ")"
COMBINE_SIGNATURE = "void(uint64, uint64, uint64, int64, int64, int64)"


def lanes_per_key(dtype: torch.dtype, head_dim: int) -> int | None:
    """L for this dtype and head size, or None when the kernel cannot take them."""
    if dtype not in DTYPES:
        return None
    e = ELEMS[DTYPES[dtype]]
    lanes = head_dim // e
    # 4..32 lanes: at most 8 keys per warp (32 softmax slots per CTA), D at most 32 vectors
    if head_dim % e or lanes < 4 or lanes > 32 or lanes & (lanes - 1):
        return None
    return lanes


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.dtype == k_cache.dtype and q.dim() == 3 and k_cache.dim() == 4
            and lanes_per_key(q.dtype, q.shape[-1]) is not None
            and q.shape[1] % k_cache.shape[2] == 0)


_sms: dict[int, int] = {}


def num_splits(batch: int, heads: int, device: int) -> int:
    """S: enough CTAs for two per SM, at most MAX_SPLITS (the same for every replay of a
    captured batch size, whatever the context lengths)."""
    sms = _sms.get(device)
    if sms is None:
        sms = _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if torch.cuda.is_available() else 4
    return max(1, min(MAX_SPLITS, -(-2 * sms // max(1, batch * heads))))


_plans: dict = {}


def _kernels(dt: str, lanes: int):
    key = (dt, lanes)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        main = launcher.kernel(("paged_decode", dt, lanes), lambda: _build_kernel(dt, lanes),
                               SIGNATURE, max_threads=32 * WARPS)
        combine = launcher.kernel(("paged_decode_combine", dt, lanes),
                                  lambda: _build_combine(dt, lanes), COMBINE_SIGNATURE,
                                  max_threads=32)
        p = remember(_plans, key, (main, combine))
    return p


def _checked(name, t, shape, dtype, device):
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous() \
            or t.device != device:
        raise ValueError(f"paged_decode_attention: {name} must be a contiguous {dtype} tensor of "
                         f"shape {tuple(shape)} on {device}, got {t.dtype} {tuple(t.shape)} on "
                         f"{t.device} (contiguous: {t.is_contiguous()})")
    return t.data_ptr()


def paged_decode_attention_cuda(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                                window: int | None = None, out=None, splits: int | None = None):
    """Launcher (same contract as the reference). `splits` forces S (tests)."""
    B, H, D = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    M = block_tables.shape[1]
    dev = q.device
    qp = _checked("q", q, (B, H, D), q.dtype, dev)
    kp = _checked("k_cache", k_cache, (NB, bs, Hkv, D), q.dtype, dev)
    vp = _checked("v_cache", v_cache, (NB, bs, Hkv, D), q.dtype, dev)
    tp = _checked("block_tables", block_tables, (B, M), torch.int32, dev)
    lp = _checked("context_lens", context_lens, (B,), torch.int32, dev)
    if out is None:
        out = torch.empty_like(q)
    op = _checked("out", out, (B, H, D), q.dtype, dev)
    if B == 0:
        return out
    index = max(dev.index if dev.index is not None else 0, 0)
    S = splits or num_splits(B, H, index)
    main, combine = _kernels(DTYPES[q.dtype], lanes_per_key(q.dtype, D))
    part = ml = None
    pp = mp = 0
    if S > 1:
        part = torch.empty(B * H * S * D, dtype=torch.float32, device=dev)
        ml = torch.empty(B * H * S * 2, dtype=torch.float32, device=dev)
        pp, mp = part.data_ptr(), ml.data_ptr()
    main.launch(H * B * S, 32 * WARPS, index, qp, kp, vp, tp, lp, op, pp, mp,
                B, H, Hkv, D, M, bs, S, window or 0, float(scale))
    if S > 1:
        combine.launch(H * B, 32, index, pp, mp, op, B * H, S, D)
    return out


# ----------------------------------------------------------------------------- kernels

cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


def _build_kernel(dt: str, lanes: int):
    """The decode kernel's Python function for one dtype and L (not yet jitted)."""
    global cuda
    from numba import float32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, device

    cuda = numba_cuda()
    unpack, pack, E = codec(dt)
    itemsize = 16 // E
    kpw = 32 // lanes                       # keys a warp scores at once
    slots = WARPS * kpw                     # independent softmax states per CTA
    step = 2 * slots                        # keys per CTA iteration: two per key slot, so
    #                                         each lane has two keys' loads in flight
    width = lanes * E                       # D, fixed by the shape class
    simulator = ptx.SIMULATOR               # no warp shuffles there: shared memory instead
    threads = 32 * WARPS
    load_nc, load_u32, store = ptx.load_v4_u32_nc, ptx.load_u32, ptx.store_v4_u32
    as_u32 = ptx.f32_as_u32

    def lane_sum(x, red, tid, vec):
        """Sum of x over the `lanes` lanes that hold one key row (all lanes call it)."""
        if simulator:                     # no warp shuffles in the simulator
            red[tid] = x
            cuda.syncthreads()
            t = float32(0.0)
            for i in range(lanes):
                t += red[tid - vec + i]
            cuda.syncthreads()
            return t
        k = lanes >> 1
        while k > 0:
            x += cuda.shfl_xor_sync(0xFFFFFFFF, x, k)
            k >>= 1
        return x

    lane_sum = device(lane_sum)

    def online_softmax(m, lsum, acc, score, v):
        """Fold one key (its score and value vector) into the running (max, sum, output)."""
        m_new = max(m, score)
        alpha = math.exp(m - m_new)
        p = math.exp(score - m_new)
        for e in range(E):
            acc[e] = acc[e] * alpha + p * v[e]
        return m_new, lsum * alpha + p

    online_softmax = device(online_softmax)

    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, part_ptr,
                            ml_ptr, B, H, Hkv, D, M, bs, S, window, scale):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        sub = lane // lanes                  # which of the warp's keys
        vec = lane % lanes                   # which 16-byte vector of the row
        cta = cuda.blockIdx.x
        h = cta % H
        b = (cta // H) % B
        s = cta // (H * B)
        g = h // (H // Hkv)
        length = int64(load_u32(lens_ptr + b * 4))
        first = 0
        if window > 0 and length > window:
            first = length - window
        chunk = (length - first + S - 1) // S
        lo = first + s * chunk
        hi = min(length, lo + chunk)

        red = cuda.shared.array(threads, float32)         # simulator: dot-product partials
        m_sh = cuda.shared.array(32, float32)            # per slot: running max
        l_sh = cuda.shared.array(32, float32)            # per slot: running sum
        acc_sh = cuda.shared.array((slots, width), float32)  # per slot: unnormalised output
        qv = cuda.local.array(8, float32)
        k0 = cuda.local.array(8, float32)
        k1 = cuda.local.array(8, float32)
        v0 = cuda.local.array(8, float32)
        v1 = cuda.local.array(8, float32)
        acc = cuda.local.array(8, float32)

        row_bytes = D * itemsize
        unpack(load_nc(q_ptr + (b * H + h) * row_bytes + vec * 16), qv)
        sc = float32(scale)
        for e in range(E):
            qv[e] *= sc
            acc[e] = float32(0.0)
        m = float32(NEG)
        lsum = float32(0.0)
        base = lo
        while base < hi:                     # uniform over the CTA
            j0 = base + warp * kpw + sub
            j1 = j0 + slots
            ok0 = j0 < hi
            ok1 = j1 < hi
            if not ok0:
                j0 = lo
            if not ok1:
                j1 = lo
            blk0 = int64(load_u32(table_ptr + (b * M + j0 // bs) * 4))
            blk1 = int64(load_u32(table_ptr + (b * M + j1 // bs) * 4))
            a0 = ((blk0 * bs + j0 % bs) * Hkv + g) * row_bytes + vec * 16
            a1 = ((blk1 * bs + j1 % bs) * Hkv + g) * row_bytes + vec * 16
            unpack(load_nc(k_ptr + a0), k0)
            unpack(load_nc(k_ptr + a1), k1)
            unpack(load_nc(v_ptr + a0), v0)
            unpack(load_nc(v_ptr + a1), v1)
            d0 = float32(0.0)
            d1 = float32(0.0)
            for e in range(E):
                d0 += qv[e] * k0[e]
                d1 += qv[e] * k1[e]
            d0 = lane_sum(d0, red, tid, vec)
            d1 = lane_sum(d1, red, tid, vec)
            if ok0:
                m, lsum = online_softmax(m, lsum, acc, d0, v0)
            if ok1:
                m, lsum = online_softmax(m, lsum, acc, d1, v1)
            base += step

        slot = warp * kpw + sub
        if vec == 0:
            m_sh[slot] = m
            l_sh[slot] = lsum
        for e in range(E):
            acc_sh[slot, vec * E + e] = acc[e]
        cuda.syncthreads()
        if tid < lanes:                      # thread t merges vector t of every slot
            mx = float32(NEG)
            for i in range(slots):
                mx = max(mx, m_sh[i])
            total = float32(0.0)
            for e in range(E):
                acc[e] = float32(0.0)
            for i in range(slots):
                w = math.exp(m_sh[i] - mx)
                total += l_sh[i] * w
                for e in range(E):
                    acc[e] += acc_sh[i, tid * E + e] * w
            if S == 1:
                inv = float32(1.0) / total
                for e in range(E):
                    acc[e] *= inv
                r = pack(acc)
                store(out_ptr + (b * H + h) * row_bytes + tid * 16, r[0], r[1], r[2], r[3])
            else:
                row = (b * H + h) * S + s
                for e4 in range(0, E, 4):
                    store(part_ptr + (row * D + tid * E + e4) * 4, as_u32(acc[e4]),
                          as_u32(acc[e4 + 1]), as_u32(acc[e4 + 2]), as_u32(acc[e4 + 3]))
                if tid == 0:
                    ptx.store_u32(ml_ptr + row * 8, as_u32(mx))
                    ptx.store_u32(ml_ptr + row * 8 + 4, as_u32(total))

    paged_decode_kernel.__name__ = f"paged_decode_{dt}_l{lanes}"
    return paged_decode_kernel


def _build_combine(dt: str, lanes: int):
    """Merges S splits: thread t of CTA (b, h) writes vector t of out[b, h]."""
    global cuda
    from numba import float32

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec

    cuda = numba_cuda()
    _, pack, E = codec(dt)
    itemsize = 16 // E
    load, store = ptx.load_v4_u32, ptx.store_v4_u32
    load_u32, as_f32 = ptx.load_u32, ptx.u32_as_f32

    def paged_decode_combine(part_ptr, ml_ptr, out_ptr, rows, S, D):
        tid = cuda.threadIdx.x
        row = cuda.blockIdx.x
        if tid >= lanes or row >= rows:
            return
        acc = cuda.local.array(8, float32)
        mx = float32(NEG)
        for s in range(S):
            mx = max(mx, as_f32(load_u32(ml_ptr + (row * S + s) * 8)))
        total = float32(0.0)
        for e in range(E):
            acc[e] = float32(0.0)
        for s in range(S):
            w = math.exp(as_f32(load_u32(ml_ptr + (row * S + s) * 8)) - mx)
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

    paged_decode_combine.__name__ = f"paged_decode_combine_{dt}_l{lanes}"
    return paged_decode_combine
