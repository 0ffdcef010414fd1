"""The FP8 GEMV kernel, the same source the GPU compiles, run in numba's CUDA simulator against
the dequantized product in float32 (`fp8_gemv_ref`, what the CPU path computes): 1 to 4 tokens,
rows in several rounds of the grid, bf16 and fp16 outputs, each group of rows read by one warp
or split over 2 or 8 warps (split K)."""
from __future__ import annotations

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")


@sim
@pytest.mark.parametrize("m,n,k,dtype,kw", [
    (1, 8, 32, torch.bfloat16, 1), (3, 24, 48, torch.bfloat16, 2), (4, 4, 1024, torch.float16, 8),
    (2, 40, 16, torch.bfloat16, 1), (2, 40, 1040, torch.bfloat16, 2), (1, 12, 272, torch.float16, 8)])
def test_sim_gemv_equals_the_dequantized_product(m, n, k, dtype, kw, monkeypatch):
    from weavelm.kernels import common
    from weavelm.kernels import fp8_gemv as G
    from weavelm.parallel.fp8 import quantize_rows
    if n == 40:                           # one CTA: its warps take the rows in several rounds
        monkeypatch.setattr(G, "WAVES", 1)
        monkeypatch.setitem(common._sms, 0, 1)
        monkeypatch.setattr(G, "_plans", {})            # (not kept for the next test)
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05
    xq, xs = quantize_rows(x)
    codes, ws = quantize_rows(w)
    assert G.supported(xq, codes, dtype)
    got = G.fp8_gemv_cuda(xq, xs, codes, ws, dtype, kw=kw)
    want = G.fp8_gemv_ref(xq, xs, codes, ws, torch.float32)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-3)


def test_in_simulator():
    if IN_SIM:
        pytest.skip("already in the simulator")
    run_sim_tests(__file__, timeout=900)


@sim
@pytest.mark.parametrize("m,n,k,dtype,kw", [(1, 8, 32, torch.bfloat16, 1),
                                            (1, 24, 1040, torch.float16, 2),
                                            (1, 12, 272, torch.bfloat16, 8)])
def test_sim_fused_rounding_equals_rounding_then_gemv(m, n, k, dtype, kw):
    """The GEMV that rounds its one token itself gives the bits of the rounding kernel's codes
    fed to the plain GEMV (the same division, the same sums)."""
    from weavelm.kernels import common
    from weavelm.kernels import fp8_gemv as G
    from weavelm.parallel.fp8 import quantize_rows
    g = torch.Generator().manual_seed(m + n + k)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    codes, ws = quantize_rows(torch.randn(n, k, generator=g) * 0.05)
    xq, xs = quantize_rows(x)
    assert G.fused_supported(x, codes)
    got = G.fp8_gemv_fused(x, codes, ws, kw=kw)
    want = G.fp8_gemv_cuda(xq, xs, codes, ws, dtype, kw=kw)
    assert torch.equal(got, want)


@sim
@pytest.mark.parametrize("k,i,dtype,kw,one_cta", [(32, 8, torch.bfloat16, 1, False),
                                                  (272, 24, torch.float16, 2, True),
                                                  (1040, 16, torch.bfloat16, 8, True),
                                                  (32, 1040, torch.bfloat16, 1, False)])
def test_sim_gated_product_rounded_spread_equals_silu_mul_rounding(k, i, dtype, kw, one_cta,
                                                                   monkeypatch):
    """silu(gate) * up formed in the GEMV's epilogue and rounded over many CTAs from their
    maxima gives the bits of the plain fused GEMV's [gate | up] through the gated rounding
    kernel (one CTA: the rows come in several rounds, the maximum from one CTA; I = 1,040:
    16 GEMV CTAs, the largest |product| in one of them, 2 rounding CTAs)."""
    from weavelm.kernels import common
    from weavelm.kernels import fp8_gemv as G
    from weavelm.kernels import fp8_quant as Q
    from weavelm.parallel.fp8 import quantize_rows
    if one_cta:
        monkeypatch.setattr(G, "WAVES", 1)
        monkeypatch.setitem(common._sms, 0, 1)
        monkeypatch.setattr(G, "_plans", {})            # (not kept for the next test)
    g = torch.Generator().manual_seed(k + i)
    x = (torch.randn(1, k, generator=g) * 3).to(dtype)
    codes, ws = quantize_rows(torch.randn(2 * i, k, generator=g) * 0.3)
    assert G.gated_supported(x, codes)
    p, maxima = G.fp8_gemv_gated(x, codes, ws, kw=kw)
    got_codes, got_scale = Q.round_spread(p, maxima)
    want_codes, want_scale = Q.quantize_rows_cuda(G.fp8_gemv_fused(x, codes, ws, kw=kw),
                                                 gated=True)
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got_codes.view(torch.uint8), want_codes.view(torch.uint8))
