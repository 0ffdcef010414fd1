"""The FP8 warpgroup (wgmma) kernel, the same source the GPU compiles, run in numba's CUDA
simulator against the dequantized product in float32 (`fp8_gemv.fp8_gemv_ref`, what the CPU
path computes). The simulator cannot run wgmma: `ptx_wgmma.sim_wgmma_fp8_steps` models it from
the PTX ISA's fragment layouts and its K-major shared-memory layout, decoding each product's
descriptor, so what this checks is that the kernel's weight fragments, its token layout in
shared memory (the permutation of k both share), its descriptors, its ring of steps in
flight, split K and its paired stores agree with that reading of the ISA. Shapes: widths 8 to
64 tokens partly filled, a row group partly past the last row, K in even and uneven slices,
one and two steps ahead, each call twice (the split-K counters must be back at 0)."""
from __future__ import annotations

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")


@sim
@pytest.mark.parametrize("m,n,k,dtype,splits,ahead", [
    (5, 200, 256, torch.bfloat16, 2, 1),  # width 8 with 5 tokens; rows 128-199 of a group of 256
    (20, 128, 384, torch.float16, 2, 1),  # width 24; K in slices of one and two steps
    (64, 136, 256, torch.bfloat16, 1, 1),  # width 64, every token; one slice
    (24, 136, 640, torch.bfloat16, 1, 2),  # two steps ahead: 5 steps through a ring of 3
    (9, 64, 896, torch.bfloat16, 2, 2),   # ... slices of 3 and 4 steps (the tail's waits)
])
def test_sim_wgmma_equals_the_dequantized_product(m, n, k, dtype, splits, ahead, monkeypatch):
    from weavelm.kernels import fp8_wgmma as F
    monkeypatch.setattr(F, "AHEAD", ahead)
    from weavelm.kernels.fp8_gemv import fp8_gemv_ref
    from weavelm.parallel.fp8 import quantize_rows
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05
    xq, xs = quantize_rows(x)
    codes, ws = quantize_rows(w)
    assert F.supported(xq, codes, dtype)
    want = fp8_gemv_ref(xq, xs, codes, ws, torch.float32)
    first = F.fp8_wgmma_cuda(xq, xs, codes, ws, dtype, splits=splits)
    torch.testing.assert_close(first.float(), want, rtol=1e-2, atol=1e-3)
    again = F.fp8_wgmma_cuda(xq, xs, codes, ws, dtype, splits=splits)
    assert torch.equal(again, first)
    counts = next(c for (rows, _, _), (_, c) in F._work.items() if rows == n)
    assert counts.numel() == -(-n // F.CTA_ROWS)
    assert not counts.any()


def test_descriptor_fields_round_trip():
    """The kernel's descriptor (start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45,
    no swizzle) is what the model decodes."""
    from weavelm.kernels.ptx_wgmma import desc_fields
    start, lbo, sbo = 0x1230, 1024, 128
    desc = (start >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32)
    assert desc_fields(desc) == (start, lbo, sbo)
    assert desc >> 62 == 0                                  # layout type 0: no swizzle


def test_split_k_depends_on_the_layer_only():
    from weavelm.kernels import fp8_wgmma as F
    assert F.split_k(4096, 14336, 132) == 8                 # 32 CTAs of 128 rows: 8 slices
    assert F.split_k(28672, 4096, 132) == 2
    assert F.split_k(256, 128, 132) == 1                    # one step: no split


def test_in_simulator():
    if IN_SIM:
        pytest.skip("already in the simulator")
    run_sim_tests(__file__, timeout=900)
