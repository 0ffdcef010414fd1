"""Decode attention over a paged KV cache (flash-decoding: split-K over the keys).

B = sequences (one query token each), H / Hkv = query / KV heads, D = head dim, NB = cache
blocks, bs = tokens per block, M = block-table columns, S = key splits, E = elements per 16-byte
vector (8 for bf16/fp16, 4 for fp32), L = D / E lanes per key.

    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window)

q [B, H, D]; k_cache, v_cache [NB, bs, Hkv, D]; block_tables [B, M] int32 (sequence b's keys
0..context_lens[b]-1 live in blocks block_tables[b, 0], [b, 1], ...); out [B, H, D]. Query head h
reads KV head h // (H / Hkv) (grouped-query attention). With `window`, the query (at position
context_lens[b] - 1) sees only the last `window` keys, as Mistral's sliding window.

Two kernels: the tensor-core kernel (paged_attention_mma.py, bf16 / fp16 / FP8 caches of head dim
64 or 128 in blocks of >= 16 tokens: Llama, Mistral, Qwen) over a work list that gives every CTA the
same share of the batch's keys (paged_attention_worklist.py); and the lane kernel described
below for the rest (fp32 caches, other head dims, smaller blocks) and for batches under
MMA_MIN_BATCH, where it is faster. `kernel=` picks one.

Why a kernel of our own: the decode step runs under CUDA graphs, so attention must read the
cache in place, with no host sync and no per-step gather of every sequence's keys into a padded
copy (the gather costs as much memory traffic again as the keys themselves); torch's built-in
varlen attention has no block table on the torch the GPU machines run. How the kernel compares
with torch's gather + SDPA, and what each choice below was worth: benchmarks/RESULTS.md (paged
decode attention) and benchmarks/HISTORY.md.

The lane kernel. Grid: one CTA per (group of query heads sharing a KV head, sequence, split),
groups fastest.
Each key row is loaded once and scored against every head of the group (up to MAX_GROUP), so a
KV head's keys leave memory once for all the query heads that read them: decode attention is
bound by reading the cache, and a CTA per query head would read each key H / Hkv times.

Inside a CTA: its 4 warps take keys round-robin; within a warp, L lanes hold one key row (each
lane one 16-byte vector of K and V), so a warp scores 32 / L keys at once. Decode attention is
bound by memory latency, so a lane keeps many loads in flight: ROWS rows per lane and iteration,
loaded together, and with PIPELINE the next iteration's loads are issued before this one is
scored. Each head's dot product is reduced over its L lanes with shuffles into an online softmax
per head (running max m, sum l, its E output elements); the CTA merges its warps' states in
shared memory.

Splits: with S = 1 the CTA writes the output; with S > 1 each split writes (m, l, unnormalised
output) in fp32 and `_combine` merges the splits (a second launch). The grid has S CTAs per
(group, sequence), S enough for CTAS_PER_SM CTAs per SM, so that small batches still fill the
GPU; each sequence uses one of them per `split_keys` keys (the rest exit at once). With `order`
(`longest_first`) the long sequences' CTAs start first, so no long CTA starts after the others
and runs on alone; in smaller batches S is raised so that one long sequence among short ones is
split, and in the smallest even short sequences are split every SMALL_SPLIT_KEYS keys
(`split_plan`). S and split_keys are chosen from (B, H, Hkv, SMs) alone, so they are the
same on every replay of a captured graph. The device code, and why its inner loop looks as it
does, is in paged_attention_kernels.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weavelm.kernels.common import DTYPES, ELEMS, FP8, remember, sm_count
from weavelm.kernels import paged_attention_mma as PM
from weavelm.kernels import paged_attention_worklist as WL
from weavelm.kernels.paged_attention_kernels import PIPELINE, ROWS, WARPS

MAX_SPLITS = 16
SPLIT_KEYS = 256                # keys per split where the grid is split for occupancy
# Batches of at most LONG_BATCH_CTAS CTAs (at one per group and sequence) get LONG_SPLITS CTAs
# per sequence, used by sequences longer than LONG_SPLIT_KEYS: in a small batch one long
# sequence would otherwise outlast the rest on a single CTA. Bigger batches lose more to the
# unused CTAs (each still starts, reads its length and exits) than the longest-first order
# leaves to gain. How much: benchmarks/RESULTS.md (paged decode attention, schedules).
LONG_SPLITS, LONG_SPLIT_KEYS, LONG_BATCH_CTAS = 4, 2048, 1024
# In batches so small that occupancy asks for more than MAX_SPLITS splits (e.g. at most 4
# sequences of 8 CTAs each on 132 SMs), short sequences are split too: one more of their S CTAs
# every SMALL_SPLIT_KEYS keys (with SPLIT_KEYS a sequence of 256 keys at batch 1 ran on one CTA
# per KV head, its keys one after another). H100, bench_paged_attention.py --small, µs at 64 /
# 256 keys: batch 1, 256 keys 7.8 / 12.7; batch 4, 512 keys 13.0 / 17.6; at batch 16 (S = 5)
# 64 was slower (1,024 keys: 45.2 / 36.9), so there it stays SPLIT_KEYS.
SMALL_SPLIT_KEYS = 64
MAX_GROUP = 4                   # query heads per CTA: the group's keys are read once for all
#                                 of them (4 against 2: benchmarks/HISTORY.md, 2026-12-02)
CTAS_PER_SM = 4                 # split the keys until the grid has this many CTAs per SM
# The tensor-core kernel from this batch on (the default where `mma_supported`). H100, bench_
# paged_attention.py --sweep, µs lane / tensor-core kernel: batch 1 at 1K-4K keys 9.3-14.9 /
# 14.5-16.4 (the work list's CTAs take a few steps each and the combine merges up to T parts);
# batch 16 at 128 / 1K / 2K / 4K keys 13.1 / 36.6 / 70.4 / 132.8 against 11.7 / 32.8 / 55.3 /
# 97.5; batch 64 and more faster at every length (benchmarks/RESULTS.md, eleventh session).
MMA_MIN_BATCH = 16
RESIDENT = 0                    # CTAs per SM ptxas must fit (0: no bound). Unbounded: forcing
#                                 more CTAs per SM takes registers from the pipelined loads and
#                                 costs more than the extra CTAs bring (benchmarks/HISTORY.md,
#                                 2026-12-02)


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                               window: int | None = None, k_scale: float = 1.0,
                               v_scale: float = 1.0, starts=None, lse=None) -> torch.Tensor:
    """The torch reference (and CPU path): gathers each sequence's blocks, masks, runs SDPA.
    An FP8 cache is read as its values times `k_scale` / `v_scale`. `starts` (int32 [B]):
    sequence b sees only keys from starts[b] on; `lse` (float32 [B, H]) receives each query's
    log-sum-exp of its scaled scores (cascade attention merges partial results by it)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    tables = block_tables.long()
    keys = k_cache[tables].reshape(B, -1, Hkv, D).transpose(1, 2)          # [B, Hkv, M*bs, D]
    values = v_cache[tables].reshape(B, -1, Hkv, D).transpose(1, 2)
    if keys.dtype == FP8:
        keys = (keys.float() * k_scale).to(q.dtype)
        values = (values.float() * v_scale).to(q.dtype)
    pos = torch.arange(keys.shape[2], device=q.device)
    lens = context_lens.long()[:, None]
    visible = pos[None, :] < lens                                           # [B, M*bs]
    if window:
        visible &= pos[None, :] >= lens - window
    if starts is not None:
        visible &= pos[None, :] >= starts.long()[:, None]
    if lse is not None:
        scores = torch.einsum("bhd,bhkd->bhk", q.float(),
                              keys.float().repeat_interleave(H // Hkv, dim=1)) * scale
        lse.copy_(torch.logsumexp(scores.masked_fill(~visible[:, None, :], -math.inf), -1))
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values,
                                       attn_mask=visible[:, None, None, :], scale=scale,
                                       enable_gqa=True)                     # [B, H, 1, D]
    return o.squeeze(2)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                           window: int | None = None, out=None, order=None,
                           k_scale: float = 1.0, v_scale: float = 1.0, starts=None,
                           lse=None, lens_staged: bool = False) -> torch.Tensor:
    """CUDA tensors the kernel takes -> the kernel; anything else -> the reference. `order`:
    `longest_first(context_lens)` (optional; only the kernel's schedule depends on it).
    `k_scale`, `v_scale`: an FP8 cache's scales. `starts`, `lse`: as the reference's.
    `lens_staged`: `context_lens` and `starts` were written before the kernel launched just
    before this call, not by it (a step's staged inputs): under programmatic dependent launch
    the tensor-core kernel then plans its work list while that kernel finishes."""
    if q.is_cuda and supported(q, k_cache):
        return paged_decode_attention_cuda(q, k_cache, v_cache, block_tables, context_lens,
                                           scale, window, out, order=order, k_scale=k_scale,
                                           v_scale=v_scale, starts=starts, lse=lse,
                                           lens_staged=lens_staged)
    o = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale,
                                   window, k_scale, v_scale, starts, lse)
    return o if out is None else out.copy_(o)


# ----------------------------------------------------------------------------- launchers

SIGNATURE = "void(" + ", ".join(["uint64"] * 11 + ["int64"] * 9 + ["float64"] * 3) + ")"
COMBINE_SIGNATURE = "void(" + ", ".join(["uint64"] * 6 + ["int64"] * 6) + ")"


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
    """The kernel takes a cache of q's dtype, or an FP8 one for bf16 / fp16 queries."""
    bs = k_cache.shape[1] if k_cache.dim() == 4 else 0
    fp8 = k_cache.dtype == FP8 and q.dtype in (torch.bfloat16, torch.float16)
    return ((q.dtype == k_cache.dtype or fp8) and q.dim() == 3 and k_cache.dim() == 4
            and lanes_per_key(q.dtype, q.shape[-1]) is not None
            and bs > 0 and bs & (bs - 1) == 0           # blocks of 2^n tokens: shift and mask
            and q.shape[1] % k_cache.shape[2] == 0)




def mma_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The tensor-core kernel (paged_attention_mma.py) takes bf16 / fp16 queries against a cache
    of their dtype or FP8, head dim 64 or 128 (256 spills registers), blocks of at least 16
    tokens; `supported` must hold too."""
    return (q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype in (q.dtype, FP8)
            and q.shape[-1] in (64, 128) and k_cache.shape[1] >= 16)


def occupancy_splits(batch: int, ctas: int, device: int) -> int:
    """Splits for CTAS_PER_SM CTAs per SM (uncapped). `ctas`: CTAs per sequence at S = 1."""
    return -(-CTAS_PER_SM * sm_count(device) // max(1, batch * ctas))


def num_splits(batch: int, ctas: int, device: int) -> int:
    """S: enough CTAs for CTAS_PER_SM per SM, at most MAX_SPLITS (the same for every replay of
    a captured batch size, whatever the context lengths). `ctas`: CTAs per sequence at S = 1."""
    return max(1, min(MAX_SPLITS, occupancy_splits(batch, ctas, device)))


def split_plan(batch: int, ctas: int, device: int) -> tuple[int, int]:
    """(S, split_keys) for a batch (a sequence uses one of its S CTAs per split_keys keys):
    S from occupancy (`num_splits`) with SPLIT_KEYS keys per split; where that leaves fewer
    than LONG_SPLITS in a batch of at most LONG_BATCH_CTAS CTAs, LONG_SPLITS for sequences
    longer than LONG_SPLIT_KEYS (one long sequence among short ones); where occupancy asks for
    more than MAX_SPLITS (the smallest batches), MAX_SPLITS with SMALL_SPLIT_KEYS keys per
    split."""
    base = num_splits(batch, ctas, device)
    if occupancy_splits(batch, ctas, device) > MAX_SPLITS:
        return base, SMALL_SPLIT_KEYS
    if base < LONG_SPLITS and batch * ctas <= LONG_BATCH_CTAS:
        return LONG_SPLITS, LONG_SPLIT_KEYS
    return base, SPLIT_KEYS


def longest_first(context_lens: torch.Tensor) -> torch.Tensor:
    """The kernel's `order`: sequence indices by key count, longest first (int32, on device;
    once per step, shared by every layer). Sequences that share a cached prefix are left
    where this puts them: side by side, their CTAs ran slower, not faster (benchmarks/
    RESULTS.md, prefix caching: the shared keys are served from L2 in either order)."""
    return torch.argsort(context_lens, descending=True).to(torch.int32)


def head_group(heads: int, kv_heads: int) -> int:
    """Query heads one CTA serves: the largest divisor of H / Hkv up to MAX_GROUP (they share
    a KV head, so its keys are read once for all of them)."""
    share = heads // kv_heads
    return max(d for d in range(1, min(share, MAX_GROUP) + 1) if share % d == 0)


_plans: dict = {}


def _kernels(dt: str, lanes: int, group: int, rows: int, pipeline: bool, resident: int,
             kv8: bool = False, device: int = 0):
    key = (dt, lanes, group, rows, pipeline, resident, kv8, device)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        from weavelm.kernels.paged_attention_kernels import _build_combine, _build_kernel
        pdl = launcher.pdl_enabled(device)
        main = launcher.kernel(("paged_decode", dt, lanes, group, rows, pipeline, resident,
                                kv8),
                               lambda: _build_kernel(dt, lanes, group, rows, pipeline, kv8,
                                                     pdl),
                               SIGNATURE, max_threads=32 * WARPS, min_blocks=resident or None,
                               pdl=pdl)
        combine = launcher.kernel(("paged_decode_combine", dt, lanes),
                                  lambda: _build_combine(dt, lanes, pdl), COMBINE_SIGNATURE,
                                  max_threads=32, pdl=pdl)
        p = remember(_plans, key, (main, combine))
    return p


def _mma_kernels(dt: str, D: int, group: int, kv8: bool, early: bool, device: int):
    least, cost, trace = WL.MIN_STEPS, WL.SEGMENT_COST, PM.TRACE_PTR  # (knobs: read when built)
    key = ("mma", dt, D, group, kv8, early, least, cost, trace, device)
    p = _plans.get(key)
    if p is None:
        from weavelm.kernels import launcher
        pdl = launcher.pdl_enabled(device)
        main = launcher.kernel(("paged_decode_mma", dt, D, group, kv8, early, least, cost,
                                trace),
                               lambda: PM._build_mma_kernel(dt, D, group, pdl, kv8, least,
                                                            trace, cost, early),
                               PM.SIGNATURE, max_threads=32 * PM.WARPS,
                               min_blocks=PM.RESIDENT_MMA[D], pdl=pdl)
        combine = launcher.kernel(("paged_decode_mma_combine", dt, D, group, trace),
                                  lambda: WL._build_mma_combine(dt, D, group, pdl, trace),
                                  WL.COMBINE_SIGNATURE, max_threads=32, pdl=pdl)
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
                                group: int | None = None, rows: int = ROWS,
                                pipeline: bool = PIPELINE, resident: int = RESIDENT,
                                order=None, split_keys: int | None = None,
                                k_scale: float = 1.0, v_scale: float = 1.0, starts=None,
                                lse=None, kernel: str | None = None,
                                lens_staged: bool = False):
    """Launcher (same contract as the reference). `order`: int32 [B], the sequences in the
    order their CTAs should start (`longest_first`); `starts` int32 [B], `lse` float32 [B, H]
    (written). `kernel`: "mma" (tensor cores, where `mma_supported`) or "lanes"; by default
    the tensor cores where they take the inputs and the batch has MMA_MIN_BATCH sequences.
    For tests and benchmarks: `splits` forces S (lane kernel), every sequence using all S CTAs
    it has keys for unless `split_keys` (keys per split) is given too, or T (tensor-core
    kernel, CTAs a head group); for the lane kernel, `group` the query heads per CTA, `rows`
    the key rows per lane and iteration, `pipeline` loads one iteration ahead, `resident`
    the CTAs per SM the registers must allow (0: no bound). `lens_staged`: as
    `paged_decode_attention`'s."""
    B, H, D = q.shape
    NB, bs, Hkv, _ = k_cache.shape
    M = block_tables.shape[1]
    dev = q.device
    qp = _checked("q", q, (B, H, D), q.dtype, dev)
    kv8 = k_cache.dtype == FP8
    cache_dtype = FP8 if kv8 else q.dtype
    kp = _checked("k_cache", k_cache, (NB, bs, Hkv, D), cache_dtype, dev)
    vp = _checked("v_cache", v_cache, (NB, bs, Hkv, D), cache_dtype, dev)
    tp = _checked("block_tables", block_tables, (B, M), torch.int32, dev)
    lp = _checked("context_lens", context_lens, (B,), torch.int32, dev)
    if out is None:
        out = torch.empty_like(q)
    op = _checked("out", out, (B, H, D), q.dtype, dev)
    if bs & (bs - 1):
        raise ValueError(f"paged_decode_attention: the kernel takes blocks of 2^n tokens, got {bs}")
    if B == 0:
        return out
    index = max(dev.index if dev.index is not None else 0, 0)
    stp = _checked("starts", starts, (B,), torch.int32, dev) if starts is not None else 0
    lsp = _checked("lse", lse, (B, H), torch.float32, dev) if lse is not None else 0
    use_mma = (mma_supported(q, k_cache) and B >= MMA_MIN_BATCH) if kernel is None \
        else kernel == "mma"
    if use_mma:
        if not mma_supported(q, k_cache):
            raise ValueError(f"paged_decode_attention: the tensor-core kernel takes bf16 / fp16 "
                             f"queries, a cache of their dtype or FP8, head dim 64 or 128 and "
                             f"blocks of >= 16 tokens, got {q.dtype} queries, a {k_cache.dtype} "
                             f"cache, D={D}, blocks of {bs}")
        _launch_mma(q, qp, kp, vp, tp, lp, stp, op, lsp, B, H, Hkv, D, M, bs, window, scale,
                    k_scale, v_scale, kv8, splits, index, lens_staged)
        return out
    group = group or head_group(H, Hkv)
    S, keys_per_split = split_plan(B, H // group, index)
    if splits:                    # forced S: every sequence uses as many as it has keys for
        S, keys_per_split = splits, 1
    keys_per_split = split_keys or keys_per_split
    odp = _checked("order", order, (B,), torch.int32, dev) if order is not None else 0
    main, combine = _kernels(DTYPES[q.dtype], lanes_per_key(q.dtype, D), group, rows,
                             pipeline, resident, kv8, index)
    part = ml = None
    pp = mp = 0
    if S > 1:
        part = torch.empty(B * H * S * D, dtype=torch.float32, device=dev)
        ml = torch.empty(B * H * S * 2, dtype=torch.float32, device=dev)
        pp, mp = part.data_ptr(), ml.data_ptr()
    main.launch(H // group * B * S, 32 * WARPS, index, qp, kp, vp, tp, lp, odp, stp, op, lsp,
                pp, mp, B, H, Hkv, D, M, bs.bit_length() - 1, S, keys_per_split, window or 0,
                float(scale), float(k_scale), float(v_scale))
    if S > 1:
        combine.launch(H * B, 32, index, pp, mp, op, lp, stp, lsp, B * H, H, S, D,
                       keys_per_split, window or 0)
    return out


def mma_ctas(heads: int, group: int, head_dim: int, device: int) -> int:
    """T, the tensor-core kernel's CTAs per head group: one wave of the CTAs an SM holds
    (its registers are bounded for that many: RESIDENT_MMA), shared by the groups."""
    return max(1, PM.RESIDENT_MMA[head_dim] * sm_count(device) // (heads // group))


def _launch_mma(q, qp, kp, vp, tp, lp, stp, op, lsp, B, H, Hkv, D, M, bs, window, scale,
                k_scale, v_scale, kv8, ctas, index, lens_staged=False):
    """The tensor-core kernel over its work list (paged_attention_mma.py), then the combine of
    the sequences it cut into parts. `ctas`: T (default `mma_ctas`); `lens_staged`: the
    kernel reads the lengths before it waits for the kernel before (paged_decode_attention)."""
    group = PM.mma_group(H, Hkv, D)
    T = ctas or mma_ctas(H, group, D, index)
    main, combine = _mma_kernels(DTYPES[q.dtype], D, group, kv8, lens_staged, index)
    dev = q.device
    part = torch.empty(H * (T + B) * D, dtype=torch.float32, device=dev)
    ml = torch.empty(H * (T + B) * 2, dtype=torch.float32, device=dev)
    rec = torch.empty(B * 2, dtype=torch.int32, device=dev)
    main.launch(H // group * T, 32 * PM.WARPS, index, qp, kp, vp, tp, lp, stp, op, lsp,
                part.data_ptr(), ml.data_ptr(), rec.data_ptr(), B, H, Hkv, M,
                bs.bit_length() - 1, T, window or 0, float(scale), float(k_scale),
                float(v_scale))
    combine.launch(H * B, 32, index, part.data_ptr(), ml.data_ptr(), rec.data_ptr(), op, lp,
                   stp, lsp, B, H, T, window or 0)
