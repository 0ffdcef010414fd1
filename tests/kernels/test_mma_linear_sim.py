"""The few-token tensor-core kernel, the same source the GPU compiles, run in numba's CUDA
simulator (its warp-wide mma modelled lane by lane from the PTX ISA's fragment layout): FP8
against the dequantized product in float32 (`fp8_gemv.fp8_gemv_ref`, what the CPU path
computes), 16-bit against the float64 product rounded once; token tiles of 16 partly filled, a
row group partly past the last row, K cut into even and uneven slices, and each call twice (the
split-K counters must be back at 0 for the next call)."""
from __future__ import annotations

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")


@sim
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("m,n,row_bytes,dtype,splits", [
    (20, 64, 256, torch.bfloat16, 2),     # two token tiles, K in two slices of two steps
    (5, 40, 128, torch.float16, 1),       # one tile of 16 with 5 tokens; rows 32-39 of a group
    (33, 32, 192, torch.bfloat16, 2),     # three tiles, slices of one and two steps
])
def test_sim_mma_equals_the_product(m, n, row_bytes, dtype, splits, fp8):
    from weavelm.kernels import mma_linear as F
    from weavelm.kernels.fp8_gemv import fp8_gemv_ref
    from weavelm.parallel.fp8 import quantize_rows
    k = row_bytes if fp8 else row_bytes // 2
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05
    if fp8:
        (xq, xs), (codes, ws) = quantize_rows(x), quantize_rows(w)
        assert F.supported(xq, codes, dtype)
        want = fp8_gemv_ref(xq, xs, codes, ws, torch.float32)

        def run():
            return F.fp8_mma_cuda(xq, xs, codes, ws, dtype, splits=splits)
    else:
        x, w = x.to(dtype), w.to(dtype)
        assert F.supported_16(x, w)
        assert not F.supported_16(x[:, 16:].contiguous(), w[:, 16:].contiguous())  # K % 32
        want = x.double() @ w.double().t()

        def run():
            return F.mma_cuda(x, w, splits=splits)
    first = run()
    # fp32 sums in another order than the reference's, rounded once to dtype
    torch.testing.assert_close(first.float(), want.float(), rtol=1e-2, atol=1e-3)
    assert torch.equal(run(), first)
    # a counter for every warp the grid starts (warps past the last row count too), all 0
    counts = next(c for (rows, _, _), (_, c) in F._work.items() if rows == n)
    assert counts.numel() == -(-n // (F.WARP_ROWS * F.WARPS)) * F.WARPS
    assert not counts.any()


def test_in_simulator():
    if IN_SIM:
        pytest.skip("already in the simulator")
    run_sim_tests(__file__, timeout=900)
