"""The paged decode-attention kernel, the same source the GPU compiles, run in numba's CUDA
simulator against the torch reference (which the CPU path uses); and the reference against a
plain float64 attention over each sequence's keys in order.

B = sequences, H / Hkv = query / KV heads, D = head dim, bs = tokens per cache block.
"""
from __future__ import annotations

import math

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

from weavelm.kernels import paged_attention as P

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def paged_case(B, H, Hkv, D, bs, lens, dtype, seed=0):
    """Random q and a cache whose blocks are handed out in shuffled order; the keys of every
    sequence also returned in order (for the float64 reference)."""
    g = torch.Generator().manual_seed(seed)
    M = max(-(-n // bs) for n in lens) + 1                # a spare column: never read
    NB = 1 + sum(-(-n // bs) for n in lens) + 2            # block 0 and two unused blocks
    k_cache = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    order = (torch.randperm(NB - 1, generator=g) + 1).tolist()
    tables = torch.zeros(B, M, dtype=torch.int32)
    for b, n in enumerate(lens):
        for i in range(-(-n // bs)):
            tables[b, i] = order.pop()
    q = torch.randn(B, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def float64_attention(q, k_cache, v_cache, tables, lens, scale, window, starts=None):
    """(out [B, H, D], log-sum-exp of the scores [B, H]) in float64; sequence b sees keys from
    max(window's first, starts[b]) on."""
    B, H, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    lse = torch.empty(B, H, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        rows = [(int(tables[b, j // bs]), j % bs) for j in range(n)]
        keys = torch.stack([k_cache[blk, off] for blk, off in rows]).double()   # [n, Hkv, D]
        vals = torch.stack([v_cache[blk, off] for blk, off in rows]).double()
        first = max(0, n - window) if window else 0
        if starts is not None:
            first = max(first, int(starts[b]))
        for h in range(H):
            g = h // (H // Hkv)
            scores = keys[first:, g] @ q[b, h].double() * scale
            out[b, h] = torch.softmax(scores, 0) @ vals[first:, g]
            lse[b, h] = torch.logsumexp(scores, 0)
    return out, lse


@pytest.mark.skipif(IN_SIM, reason="this is the launcher of the simulator run")
def test_in_simulator():
    run_sim_tests(__file__, timeout=600)


@pytest.mark.skipif(IN_SIM, reason="checked once, outside the simulator run")
@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_float64(window):
    q, kc, vc, tables, lens = paged_case(3, 4, 2, 16, 4, [1, 7, 13], torch.float32)
    got = P.paged_decode_attention(q, kc, vc, tables, lens, 0.25, window)   # CPU: reference
    want, _ = float64_attention(q, kc, vc, tables, lens, 0.25, window)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(IN_SIM, reason="checked once, outside the simulator run")
def test_reference_starts_and_lse_match_float64():
    """Keys before starts[b] left out (a cascade's shared prefix, attended elsewhere), and the
    log-sum-exp each query's scores give, as float64 computes them."""
    q, kc, vc, tables, lens = paged_case(3, 4, 2, 16, 4, [6, 7, 13], torch.float32)
    starts = torch.tensor([0, 4, 8], dtype=torch.int32)
    lse = torch.empty(3, 4)
    got = P.paged_decode_attention(q, kc, vc, tables, lens, 0.25, starts=starts, lse=lse)
    want, want_lse = float64_attention(q, kc, vc, tables, lens, 0.25, None, starts)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap,want", [(2, [2, 2, 1, 1, 1]), (4, [4, 4, 1, 3, 1])])
def test_head_group_divides_the_kv_share(monkeypatch, cap, want):
    monkeypatch.setattr(P, "MAX_GROUP", cap)
    assert [P.head_group(h, kv) for h, kv in ((32, 8), (64, 8), (28, 4), (12, 4), (8, 8))] == want


def test_lanes_and_support():
    assert P.lanes_per_key(torch.bfloat16, 128) == 16 and P.lanes_per_key(torch.float32, 128) == 32
    assert P.lanes_per_key(torch.bfloat16, 24) is None        # 3 vectors: not a power of two
    assert P.lanes_per_key(torch.float32, 256) is None        # 64 lanes: more than a warp
    assert P.lanes_per_key(torch.float64, 128) is None


# ----------------------------------------------------------------------------- simulator only

@sim
@pytest.mark.parametrize("dtype,D,splits,split_keys,window,ordered", [
    (torch.bfloat16, 32, 1, None, None, False), (torch.bfloat16, 32, 3, 1, None, False),
    (torch.float16, 64, 4, 3, 6, True), (torch.float32, 16, 1, None, 5, False),
    (torch.float32, 16, 4, 4, None, True)])
def test_sim_kernel_matches_reference(dtype, D, splits, split_keys, window, ordered):
    """S CTAs per sequence, each sequence using one per `split_keys` visible keys (1: as many
    of the S as it has keys, lengths 1, 7, 13 at S = 3: 1, 3 and 3 splits; 4: 1, 2 and 4; with a
    window of 6 and 3: 1, 2, 2), CTAs started longest first or in order."""
    lens = [1, 7, 13]                        # one key; a partial block; several blocks
    q, kc, vc, tables, lens_t = paged_case(3, 4, 2, D, 4, lens, dtype, seed=D + splits)
    scale = 1 / math.sqrt(D)
    want = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens_t,
                                        scale, window)
    got = P.paged_decode_attention_cuda(q, kc, vc, tables, lens_t, scale, window, splits=splits,
                                        split_keys=split_keys,
                                        order=P.longest_first(lens_t) if ordered else None)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.skipif(IN_SIM, reason="checked once, outside the simulator run")
def test_split_plan(monkeypatch):
    """MAX_SPLITS splits of SMALL_SPLIT_KEYS keys where occupancy asks for more than MAX_SPLITS,
    else occupancy splits of SPLIT_KEYS keys; LONG_SPLITS CTAs per sequence,
    used by long sequences only, for middling ones; big batches one CTA per sequence (132 SMs,
    8 CTAs per sequence at S = 1); and the longest-first order."""
    from weavelm.kernels import common
    from weavelm.kernels.paged_attention_kernels import split_count
    monkeypatch.setitem(common._sms, 0, 132)
    # batches whose occupancy asks for more than MAX_SPLITS: short sequences split too
    assert P.split_plan(1, 8, 0) == (16, P.SMALL_SPLIT_KEYS)      # 66 by occupancy, capped
    assert P.split_plan(4, 8, 0) == (16, P.SMALL_SPLIT_KEYS)      # 17, capped
    assert P.split_plan(5, 8, 0) == (14, P.SPLIT_KEYS)
    assert P.split_plan(16, 8, 0) == (5, P.SPLIT_KEYS)
    S, keys = P.split_plan(100, 8, 0)
    assert (S, keys) == (P.LONG_SPLITS, P.LONG_SPLIT_KEYS)
    assert [split_count(n, S, keys) for n in (1, keys, keys + 1, 100 * keys)] == [1, 1, 2, S]
    assert P.split_plan(256, 8, 0) == (1, P.SPLIT_KEYS)
    lens = torch.tensor([5, 90, 7, 90, 1], dtype=torch.int32)
    order = P.longest_first(lens)
    assert order.dtype == torch.int32 and lens[order.long()].tolist() == [90, 90, 7, 5, 1]



@sim
@pytest.mark.parametrize("dtype,group,splits,window,rows,pipeline", [
    (torch.bfloat16, 4, 1, None, 2, False), (torch.bfloat16, 2, 4, None, 4, True),
    (torch.float32, 4, 3, 5, 2, True), (torch.float16, 1, 2, None, 1, True)])
def test_sim_grouped_heads_match_reference(dtype, group, splits, window, rows, pipeline):
    """One CTA serving `group` of the 4 query heads that share each KV head, `rows` keys per
    lane and iteration (masked tails of every length), loads issued one iteration ahead or
    not, forced splits (9 keys over 4 CTAs: 3, 3, 3 and an empty one): every head's output (and
    the mapping of heads to KV heads) matches the reference."""
    lens = [3, 17, 9]
    q, kc, vc, tables, lens_t = paged_case(3, 8, 2, 32, 4, lens, dtype, seed=group + 7 * splits)
    scale = 1 / math.sqrt(32)
    want = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens_t,
                                        scale, window)
    got = P.paged_decode_attention_cuda(q, kc, vc, tables, lens_t, scale, window, splits=splits,
                                        group=group, rows=rows, pipeline=pipeline)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@sim
@pytest.mark.parametrize("splits,pipeline", [(1, True), (3, False)])
def test_sim_fp8_cache_matches_reference(splits, pipeline):
    """bf16 queries against an FP8 (e4m3) cache with key and value scales: the kernel's output
    equals the reference's (the cache read as its values times the scales), one CTA or split."""
    lens = [5, 19, 12]
    q, kc, vc, tables, lens_t = paged_case(3, 8, 2, 64, 4, lens, torch.float32, seed=splits)
    kc8, vc8 = kc.clamp(-448, 448).to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    q = q.bfloat16()
    scale = 1 / math.sqrt(64)
    want = P.paged_decode_attention_ref(q.float(), kc8, vc8, tables, lens_t, scale, None,
                                        0.5, 2.0)
    got = P.paged_decode_attention_cuda(q, kc8, vc8, tables, lens_t, scale, None, splits=splits,
                                        pipeline=pipeline, k_scale=0.5, v_scale=2.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@sim
@pytest.mark.parametrize("dtype,splits,split_keys,window", [
    (torch.bfloat16, 1, None, None), (torch.float32, 3, 2, None), (torch.float32, 4, 1, 9)])
def test_sim_starts_and_lse_match_reference(dtype, splits, split_keys, window):
    """Each sequence from its own first key on (`starts`; with a window, the later of the
    two), its queries' log-sum-exps written beside the output, one CTA a sequence or split
    (the combine writes them then)."""
    lens = [5, 19, 12]
    q, kc, vc, tables, lens_t = paged_case(3, 8, 2, 32, 4, lens, dtype, seed=3 + splits)
    starts = torch.tensor([0, 8, 10], dtype=torch.int32)
    scale = 1 / math.sqrt(32)
    want_lse = torch.empty(3, 8)
    want = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens_t,
                                        scale, window, starts=starts, lse=want_lse)
    lse = torch.full((3, 8), float("nan"))
    got = P.paged_decode_attention_cuda(q, kc, vc, tables, lens_t, scale, window, splits=splits,
                                        split_keys=split_keys, starts=starts, lse=lse)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- tensor cores

def test_mma_kernel_takes_bf16_fp16_caches_of_16_token_blocks():
    """The tensor-core kernel is the default where it applies (bf16 / fp16 queries against a
    cache of their dtype or FP8); the lane kernel keeps the rest (fp32, blocks under 16 tokens,
    other head dims); asked for where it cannot run, the launcher says why in one line."""
    q = torch.zeros(1, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)
    assert P.mma_supported(q, cache) and P.mma_supported(q[..., :64].half(), cache[..., :64].half())
    assert P.mma_supported(q, cache.to(torch.float8_e4m3fn))           # FP8 cache
    assert not P.mma_supported(q, cache[:, :8])                       # blocks of 8
    assert not P.mma_supported(q, cache.half())                       # another dtype
    assert not P.mma_supported(q.float(), cache.float())
    assert not P.mma_supported(q[..., :96], cache[..., :96])
    with pytest.raises(ValueError, match="tensor-core kernel takes .* blocks of 8"):
        P.paged_decode_attention_cuda(q, cache[:, :8].contiguous(), cache[:, :8].contiguous(),
                                      torch.zeros(1, 2, dtype=torch.int32),
                                      torch.ones(1, dtype=torch.int32), 1.0, kernel="mma")


def test_mma_group_fits_one_tile():
    from weavelm.kernels.paged_attention_mma import mma_group
    assert [mma_group(h, kv, d) for h, kv, d in
            ((32, 8, 128), (64, 8, 128), (32, 2, 64), (32, 2, 128), (9, 3, 64), (48, 1, 64))] \
        == [4, 8, 16, 8, 3, 16]


def test_work_list_covers_every_step_once():
    """The work list over random lengths: `used` = min(T, units // (min_steps + cost)) CTAs
    (at least one; units: each sequence's steps and `cost`), each with at least one step;
    without cost at least min_steps steps (or all) and within one step of equal shares; every
    step of every sequence held by exactly one CTA, in order; a sequence's parts on
    consecutive CTAs, as `parts` (the kernel's record) says; slots cta + b unique."""
    from weavelm.kernels.paged_attention_worklist import parts, plan, steps_of
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        B = int(torch.randint(1, 40, (1,), generator=g))
        lens = torch.randint(0, 3000, (B,), generator=g).tolist()
        firsts = [int(torch.randint(0, n + 1, (1,), generator=g)) if trial % 2 else 0
                  for n in lens]
        steps = [steps_of(n, f) for n, f in zip(lens, firsts)]
        if sum(steps) == 0:
            continue
        T = int(torch.randint(1, 300, (1,), generator=g))
        least = 1 + trial % 3 * 3                # min_steps 1, 4, 7
        cost = trial // 3 % 4                    # SEGMENT_COST 0-3
        work = plan(steps, T, least, cost)
        units = sum(steps) + cost * sum(1 for n in steps if n)
        assert len(work) == max(1, min(T, units // (least + cost)))
        sizes = [sum(e - a for _, a, e in segs) for segs in work]
        assert min(sizes) >= 1
        if cost == 0:
            assert min(sizes) >= min(least, sum(steps)) and max(sizes) - min(sizes) <= 1
        seen = {b: [] for b in range(B)}
        slots = set()
        for c, segs in enumerate(work):
            for b, a, e in segs:
                seen[b].append((c, a, e))
                assert c + b not in slots
                slots.add(c + b)
        for b in range(B):
            got = [x for _, a, e in seen[b] for x in range(a, e)]
            assert got == list(range(steps[b])), (b, steps[b])
            if steps[b]:
                ctas = [c for c, _, _ in seen[b]]
                assert ctas == list(range(ctas[0], ctas[-1] + 1))
                assert parts(steps, T, b, least, cost) == (ctas[0], len(ctas))
    assert steps_of(33, 3) == 3 and steps_of(70, 40) == 3 and steps_of(5, 5) == 0


@sim
@pytest.mark.parametrize("dtype,H,ctas,least,cost,window,starts,lens,staged", [
    (torch.bfloat16, 8, None, 1, 0, None, None, [1, 40], False),
    (torch.float16, 8, 5, 2, 0, 30, None, [17, 70, 5, 33], True),
    (torch.bfloat16, 32, 2, 1, 0, None, [0, 18], [20, 33], True),
    (torch.bfloat16, 8, 7, 1, 0, None, None, [200], False),
    (torch.bfloat16, 8, 6, 1, 2, None, None, [40, 17, 80, 70, 5], True),
])
def test_sim_mma_kernel_matches_reference(monkeypatch, dtype, H, ctas, least, cost, window,
                                          starts, lens, staged):
    """Tensor-core kernel over its work list, head dim 64, blocks of 16, 2 KV heads: one key,
    a sequence in parts on several CTAs (the CTA's 4 warps not all busy), CTAs holding the end
    of one sequence and the start of the next, a sliding window starting mid-step, cascade
    starts with log-sum-exps, and 16 query heads a KV head (rows g + 8 of the fragments);
    `least`, `cost`: the work list's MIN_STEPS and SEGMENT_COST (the last case: ranges that
    end in a sequence's leading units). Cache slots past each sequence's end hold NaN: masked
    keys must not reach the output. The last: one sequence in 7 parts (the combine takes
    parts 4 at a time: a whole chunk and a clamped one). `staged`: the plan made before the
    wait for the kernel before (`lens_staged`)."""
    from weavelm.kernels import paged_attention_worklist as WL
    monkeypatch.setattr(WL, "MIN_STEPS", least)
    monkeypatch.setattr(WL, "SEGMENT_COST", cost)
    B, D = len(lens), 64
    q, kc, vc, tables, lens_t = paged_case(B, H, 2, D, 16, lens, dtype, seed=H + B)
    st = torch.tensor(starts, dtype=torch.int32) if starts else None
    want_lse = torch.empty(B, H)
    want = P.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), tables, lens_t,
                                        1 / math.sqrt(D), window, starts=st, lse=want_lse)
    for b, n in enumerate(lens):                  # stale contents past the end
        if n % 16:
            blk = int(tables[b, n // 16])
            kc[blk, n % 16:] = float("nan")
            vc[blk, n % 16:] = float("nan")
    lse = torch.full((B, H), float("nan"))
    got = P.paged_decode_attention_cuda(q, kc, vc, tables, lens_t, 1 / math.sqrt(D), window,
                                        splits=ctas, starts=st, lse=lse, kernel="mma",
                                        lens_staged=staged)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@sim
def test_sim_mma_kernel_fp8_cache_matches_reference():
    """bf16 queries against an FP8 (e4m3) cache with key and value scales, through the
    tensor-core kernel (f16 mma's): the reference reads the cache as its values times the
    scales; a sequence in parts and one whole."""
    lens = [50, 7]
    q, kc, vc, tables, lens_t = paged_case(2, 8, 2, 64, 16, lens, torch.float32, seed=5)
    kc8, vc8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    q = q.bfloat16()
    want = P.paged_decode_attention_ref(q.float(), kc8, vc8, tables, lens_t, 0.125, None,
                                        0.5, 2.0)
    got = P.paged_decode_attention_cuda(q, kc8, vc8, tables, lens_t, 0.125, None, splits=3,
                                        k_scale=0.5, v_scale=2.0, kernel="mma")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
