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

Kernel layout: one CTA per (group of query heads sharing a KV head, sequence, split), groups
fastest. Each key row is loaded once and scored against every head of the group (up to
MAX_GROUP), so a KV head's keys leave memory once for all the query heads that read them (one
CTA per query head read them H / Hkv times and was latency-bound at 0.1-0.9 TB/s; RESULTS.md).
The CTA's 4 warps take keys round-robin; within a warp, L lanes hold one key row (each lane one
16-byte vector of K and V), so a warp scores 32 / L keys at once (two rows per iteration, both
loads in flight together: decode attention is bound by memory latency), reduces each head's dot
product over its L lanes with shuffles, and keeps an online softmax per head (running max m, sum
l, its E output elements). The CTA merges its warps' states in shared memory. With S = 1 it
writes the output; with S > 1 each split writes (m, l, unnormalised output) in fp32 and
`_combine` merges the splits (a second launch). The grid is split over the keys until it has
CTAS_PER_SM CTAs per SM. S is chosen from (B, H, Hkv, SMs) alone, so it is the same on every replay of a captured graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weavelm.kernels.common import DTYPES, ELEMS, remember

WARPS = 4                       # per CTA
NEG = -1.0e30                   # "minus infinity" that keeps exp() and max() NaN-free
MAX_SPLITS = 16
MAX_GROUP = 4                   # query heads per CTA (registers: 2 x 8 floats per head a lane)
CTAS_PER_SM = 4                 # split the keys until the grid has this many CTAs per SM


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


def num_splits(batch: int, ctas: int, device: int) -> int:
    """S: enough CTAs for CTAS_PER_SM per SM, at most MAX_SPLITS (the same for every replay of
    a captured batch size, whatever the context lengths). `ctas`: CTAs per sequence at S = 1."""
    sms = _sms.get(device)
    if sms is None:
        sms = _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if torch.cuda.is_available() else 4
    return max(1, min(MAX_SPLITS, -(-CTAS_PER_SM * sms // max(1, batch * ctas))))


def head_group(heads: int, kv_heads: int) -> int:
    """Query heads one CTA serves: the largest divisor of H / Hkv up to MAX_GROUP (they share
    a KV head, so its keys are read once for all of them)."""
    share = heads // kv_heads
    return max(d for d in range(1, min(share, MAX_GROUP) + 1) if share % d == 0)


_plans: dict = {}


def _kernels(dt: str, lanes: int, group: int):
    key = (dt, lanes, group)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        main = launcher.kernel(("paged_decode", dt, lanes, group),
                               lambda: _build_kernel(dt, lanes, group),
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
                                window: int | None = None, out=None, splits: int | None = None,
                                group: int | None = None):
    """Launcher (same contract as the reference). `splits` forces S, `group` the query heads
    per CTA (tests)."""
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
    group = group or head_group(H, Hkv)
    S = splits or num_splits(B, H // group, index)
    main, combine = _kernels(DTYPES[q.dtype], lanes_per_key(q.dtype, D), group)
    part = ml = None
    pp = mp = 0
    if S > 1:
        part = torch.empty(B * H * S * D, dtype=torch.float32, device=dev)
        ml = torch.empty(B * H * S * 2, dtype=torch.float32, device=dev)
        pp, mp = part.data_ptr(), ml.data_ptr()
    main.launch(H // group * B * S, 32 * WARPS, index, qp, kp, vp, tp, lp, op, pp, mp,
                B, H, Hkv, D, M, bs, S, window or 0, float(scale))
    if S > 1:
        combine.launch(H * B, 32, index, pp, mp, op, B * H, S, D)
    return out


# ----------------------------------------------------------------------------- kernels

cuda = None  # numba.cuda, bound by the builders: a module global, so the simulator can swap it


def _build_kernel(dt: str, lanes: int, group: int):
    """The decode kernel's Python function for one dtype, L and query-head group (not yet
    jitted)."""
    global cuda
    from numba import float32, int64

    from weavelm.kernels import ptx
    from weavelm.kernels._numba_compat import numba_cuda
    from weavelm.kernels.common import codec, device

    cuda = numba_cuda()
    unpack, pack, E = codec(dt)
    itemsize = 16 // E
    kpw = 32 // lanes                       # keys a warp scores at once
    slots = WARPS * kpw                     # independent softmax states per CTA and head
    step = 2 * slots                        # keys per CTA iteration: two per key slot, so
    #                                         each lane has two keys' loads in flight
    width = lanes * E                       # D, fixed by the shape class
    GE = group * E                          # a lane's query / output elements, all heads
    ML = 2 * group                          # a lane's (max, sum) per head
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

    def score_and_fold(ml, acc, qv, k, v, ok, red, tid, vec):
        """Score one key row against each head of the group and fold it into that head's
        running (max, sum, output): ml[2i], ml[2i+1], acc[i*E:(i+1)*E]."""
        for i in range(group):
            d = float32(0.0)
            for e in range(E):
                d += qv[i * E + e] * k[e]
            d = lane_sum(d, red, tid, vec)
            if ok:
                m_new = max(ml[2 * i], d)
                alpha = math.exp(ml[2 * i] - m_new)
                p = math.exp(d - m_new)
                for e in range(E):
                    acc[i * E + e] = acc[i * E + e] * alpha + p * v[e]
                ml[2 * i] = m_new
                ml[2 * i + 1] = ml[2 * i + 1] * alpha + p

    score_and_fold = device(score_and_fold)

    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, part_ptr,
                            ml_ptr, B, H, Hkv, D, M, bs, S, window, scale):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        sub = lane // lanes                  # which of the warp's keys
        vec = lane % lanes                   # which 16-byte vector of the row
        cta = cuda.blockIdx.x
        groups = H // group
        h0 = (cta % groups) * group          # the CTA's first query head
        b = (cta // groups) % B
        s = cta // (groups * B)
        g = h0 // (H // Hkv)                 # the KV head every head of the group reads
        length = int64(load_u32(lens_ptr + b * 4))
        first = 0
        if window > 0 and length > window:
            first = length - window
        chunk = (length - first + S - 1) // S
        lo = first + s * chunk
        hi = min(length, lo + chunk)

        red = cuda.shared.array(threads, float32)            # simulator: dot-product partials
        ml_sh = cuda.shared.array((group, slots, 2), float32)  # per head and slot: max, sum
        acc_sh = cuda.shared.array((group, slots, width), float32)  # unnormalised outputs
        qv = cuda.local.array(GE, float32)
        ml = cuda.local.array(ML, float32)
        k0 = cuda.local.array(8, float32)
        k1 = cuda.local.array(8, float32)
        v0 = cuda.local.array(8, float32)
        v1 = cuda.local.array(8, float32)
        acc = cuda.local.array(GE, float32)

        row_bytes = D * itemsize
        sc = float32(scale)
        for i in range(group):
            unpack(load_nc(q_ptr + (b * H + h0 + i) * row_bytes + vec * 16), k0)
            for e in range(E):
                qv[i * E + e] = k0[e] * sc
                acc[i * E + e] = float32(0.0)
            ml[2 * i] = float32(NEG)
            ml[2 * i + 1] = float32(0.0)
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
            score_and_fold(ml, acc, qv, k0, v0, ok0, red, tid, vec)
            score_and_fold(ml, acc, qv, k1, v1, ok1, red, tid, vec)
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
                w = math.exp(ml_sh[i, j, 0] - mx)
                total += ml_sh[i, j, 1] * w
                for e in range(E):
                    k0[e] += acc_sh[i, j, t * E + e] * w
            h = h0 + i
            if S == 1:
                inv = float32(1.0) / total
                for e in range(E):
                    k0[e] *= inv
                r = pack(k0)
                store(out_ptr + (b * H + h) * row_bytes + t * 16, r[0], r[1], r[2], r[3])
            else:
                row = (b * H + h) * S + s
                for e4 in range(0, E, 4):
                    store(part_ptr + (row * D + t * E + e4) * 4, as_u32(k0[e4]),
                          as_u32(k0[e4 + 1]), as_u32(k0[e4 + 2]), as_u32(k0[e4 + 3]))
                if t == 0:
                    ptx.store_u32(ml_ptr + row * 8, as_u32(mx))
                    ptx.store_u32(ml_ptr + row * 8 + 4, as_u32(total))

    paged_decode_kernel.__name__ = f"paged_decode_{dt}_l{lanes}_g{group}"
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
