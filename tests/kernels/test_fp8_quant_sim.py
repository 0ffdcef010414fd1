"""The FP8 row-quantization kernel, the same source the GPU compiles, run in numba's CUDA
simulator against `fp8.quantize_rows`' torch form (the CPU path): codes and scales bit for bit,
for rows that take one or several vectors per thread, an all-zero row, values that round to
ties; and the e4m3 pack / unpack primitives against torch's own conversion."""
from __future__ import annotations

import pytest
import torch
from simulator_run import IN_SIM, run_sim_tests

sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")


@sim
@pytest.mark.parametrize("dtype,rows,k", [(torch.bfloat16, 3, 64), (torch.float32, 2, 4096),
                                          (torch.float16, 1, 136)])
def test_sim_kernel_equals_the_torch_form(dtype, rows, k):
    from weavelm.kernels.fp8_quant import quantize_rows_cuda
    from weavelm.parallel import fp8
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, rows)[:, None]).to(dtype)
    x[0, :8] = x[0, 8]                                # a run of equal values
    if rows > 2:
        x[2] = 0                                      # an all-zero row
    codes, scale = quantize_rows_cuda(x)
    x32 = x.float()
    want_scale = (x32.abs().amax(-1) / 448).clamp(min=1e-12)
    want = (x32 / want_scale[:, None]).clamp(-448, 448).to(fp8.FP8)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))


@sim
@pytest.mark.parametrize("dtype,rows,k", [(torch.bfloat16, 3, 64), (torch.float16, 2, 1024)])
def test_sim_gated_kernel_equals_silu_mul_then_rounding(dtype, rows, k):
    """The gated form (an FP8 down projection's input) gives the codes and scales of the
    SiLU-and-mul kernel's output rounded by the plain form, bit for bit."""
    from weavelm.kernels.activation import silu_and_mul_cuda
    from weavelm.kernels.fp8_quant import quantize_rows_cuda
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(rows, 2 * k, generator=g) * 3).to(dtype)
    codes, scale = quantize_rows_cuda(x, gated=True)
    want_codes, want_scale = quantize_rows_cuda(silu_and_mul_cuda(x))
    assert codes.shape == (rows, k)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


@sim
def test_sim_pack_unpack_match_torch():
    from weavelm.kernels import ptx
    vals = [0.0, -0.0, 1.0, -3.5, 448.0, 500.0, -1e9, 0.001953125, 0.0009765625, 17.0, 18.0,
            19.0, 0.3]
    for i in range(0, len(vals) - 3):
        a, b, c, d = vals[i:i + 4]
        w = ptx.pack_e4m3x4(a, b, c, d)
        want = torch.tensor([a, b, c, d]).clamp(-448, 448).to(torch.float8_e4m3fn)
        got = torch.tensor([(int(w) >> (8 * j)) & 0xFF for j in range(4)], dtype=torch.uint8)
        assert torch.equal(got, want.view(torch.uint8))
        assert list(ptx.unpack_e4m3x4(w)) == want.float().tolist()


def test_in_simulator():
    if IN_SIM:
        pytest.skip("already in the simulator")
    run_sim_tests(__file__, timeout=600)
