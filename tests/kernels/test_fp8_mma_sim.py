"""The FP8 tensor-core kernel, the same source the GPU compiles, run in numba's CUDA simulator
(its warp-wide mma modelled lane by lane from the PTX ISA's fragment layout) against the
dequantized product in float32 (`fp8_gemv.fp8_gemv_ref`, what the CPU path computes): token
tiles of 16 partly filled, a row group partly past the last row, K cut into even and uneven
slices, and each call twice (the split-K counters must be back at 0 for the next call)."""
from __future__ import annotations

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")


@sim
@pytest.mark.parametrize("m,n,k,dtype,splits", [
    (20, 64, 256, torch.bfloat16, 2),     # two token tiles, K in two slices of two steps
    (5, 40, 128, torch.float16, 1),       # one tile of 16 with 5 tokens; rows 32-39 of a group
    (33, 32, 192, torch.bfloat16, 2),     # three tiles, slices of one and two steps
])
def test_sim_mma_equals_the_dequantized_product(m, n, k, dtype, splits):
    from weavelm.kernels import fp8_mma as F
    from weavelm.kernels.fp8_gemv import fp8_gemv_ref
    from weavelm.parallel.fp8 import quantize_rows
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05
    xq, xs = quantize_rows(x)
    codes, ws = quantize_rows(w)
    assert F.supported(xq, codes, dtype)
    want = fp8_gemv_ref(xq, xs, codes, ws, torch.float32)
    first = F.fp8_mma_cuda(xq, xs, codes, ws, dtype, splits=splits)
    torch.testing.assert_close(first.float(), want, rtol=1e-2, atol=1e-3)
    again = F.fp8_mma_cuda(xq, xs, codes, ws, dtype, splits=splits)
    assert torch.equal(again, first)
    # a counter for every warp the grid starts (warps past the last row count too), all 0
    counts = next(c for (rows, _, _), (_, c) in F._work.items() if rows == n)
    assert counts.numel() == -(-n // (F.WARP_ROWS * F.WARPS)) * F.WARPS
    assert not counts.any()


def test_in_simulator():
    if IN_SIM:
        pytest.skip("already in the simulator")
    run_sim_tests(__file__, timeout=900)
