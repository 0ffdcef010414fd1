"""The fused rotary + KV-cache-write kernel and the SiLU-and-mul kernel, the same source the GPU
compiles, run in numba's CUDA simulator against their torch references.

T = tokens, H / Hkv = query / KV heads, D = head dim, I = intermediate size.
"""
from __future__ import annotations

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

from weavelm.kernels import activation as A
from weavelm.kernels import rope_cache as R
from weavelm.models.rope import RotaryEmbedding

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.skipif(IN_SIM, reason="this is the launcher of the simulator run")
def test_in_simulator():
    run_sim_tests(__file__, timeout=600)


def _rope_case(T, H, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(dtype)   # the fused projection
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)  # strided row views
    rope = RotaryEmbedding(D, 64, 10000.0, {"rope_type": "default"})
    positions = torch.randint(0, 64, (T,), generator=g)
    NB, bs = 6, 4
    slots = torch.randperm(NB * bs, generator=g)[:T]
    caches = [torch.zeros(NB, bs, Hkv, D, dtype=dtype) for _ in range(4)]
    return q, k, v, rope, positions, slots, caches


def test_reference_equals_the_model_rotary():
    """The reference is the model's own rotary embedding plus the two cache writes."""
    q, k, v, rope, positions, slots, (kc, vc, _, _) = _rope_case(5, 4, 2, 16, torch.float32)
    q_rot = R.rope_and_cache_ref(q, k, v, positions, rope.cos, rope.sin, kc, vc, slots)
    want_q, want_k = rope(positions, q, k)
    assert torch.equal(q_rot, want_q)
    assert torch.equal(kc.view(-1, 2, 16)[slots], want_k)
    assert torch.equal(vc.view(-1, 2, 16)[slots], v)


@sim
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 32), (torch.float16, 16),
                                     (torch.float32, 16)])
def test_sim_rope_cache_matches_reference(dtype, D):
    q, k, v, rope, positions, slots, (kc, vc, kc_ref, vc_ref) = _rope_case(5, 4, 2, D, dtype, D)
    want = R.rope_and_cache_ref(q, k, v, positions, rope.cos, rope.sin, kc_ref, vc_ref, slots)
    got = R.rope_and_cache_cuda(q, k, v, positions, rope.cos, rope.sin, kc, vc, slots)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), rtol=tol, atol=tol)
    assert torch.equal(vc, vc_ref)                    # v is copied, not computed


@sim
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sim_rope_cache_returns_the_rotated_k(dtype):
    """return_k (prefill steps): the rotated k comes back as a tensor equal to what went into
    the cache, and q and the cache are as without it."""
    q, k, v, rope, positions, slots, (kc, vc, kc_ref, vc_ref) = _rope_case(6, 4, 2, 32, dtype, 3)
    want_q, want_k = R.rope_and_cache_ref(q, k, v, positions, rope.cos, rope.sin, kc_ref, vc_ref,
                                          slots, return_k=True)
    got_q, got_k = R.rope_and_cache_cuda(q, k, v, positions, rope.cos, rope.sin, kc, vc, slots,
                                         return_k=True)
    tol = TOL[dtype]
    torch.testing.assert_close(got_q.float(), want_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.float(), want_k.float(), rtol=tol, atol=tol)
    assert torch.equal(kc.view(-1, 2, 32)[slots], got_k)
    assert torch.equal(vc, vc_ref)


@sim
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sim_silu_and_mul_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(7, 2 * 48, generator=g)).to(dtype)     # 7 rows, I = 48
    want = A.silu_and_mul_ref(x.float())
    got = A.silu_and_mul_cuda(x)
    torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


@sim
@pytest.mark.parametrize("return_k", [False, True])
def test_sim_rope_cache_writes_fp8(return_k):
    """An FP8 cache (bf16 tensors, key scale 0.5, value scale 3): the rotated k and v, divided
    by their scales and rounded to e4m3, as the reference stores them (an element may land one
    e4m3 step away where kernel and reference round the bf16 k differently); q and the returned
    k as with a bf16 cache."""
    q, k, v, rope, positions, slots, (kc, vc, kc_ref, vc_ref) = _rope_case(5, 4, 2, 32,
                                                                           torch.bfloat16, 7)
    fp8 = torch.float8_e4m3fn
    kc8, vc8, kc8_ref, vc8_ref = (c.to(fp8) for c in (kc, vc, kc_ref, vc_ref))
    want = R.rope_and_cache_ref(q, k, v, positions, rope.cos, rope.sin, kc8_ref, vc8_ref, slots,
                                return_k=return_k, k_scale=0.5, v_scale=3.0)
    got = R.rope_and_cache_cuda(q, k, v, positions, rope.cos, rope.sin, kc8, vc8, slots,
                                return_k=return_k, k_scale=0.5, v_scale=3.0)
    for g, w in zip(got if return_k else (got,), want if return_k else (want,)):
        torch.testing.assert_close(g.float(), w.float(), rtol=1.6e-2, atol=1.6e-2)
    assert torch.equal(vc8.view(torch.uint8), vc8_ref.view(torch.uint8))   # v: no rotation
    same = (kc8.view(torch.uint8) == kc8_ref.view(torch.uint8)).float().mean().item()
    assert same > 0.95, same
    torch.testing.assert_close(kc8.float(), kc8_ref.float(), rtol=0.13, atol=1e-3)
    assert kc8.float().abs().sum() > 0                          # the keys were written
