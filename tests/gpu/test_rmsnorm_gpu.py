"""RMSNorm kernels on one CUDA GPU against a float64 reference (skipped without a GPU).

Run on a GPU machine:
    WEAVELM_DISABLE_MULTICAST=1 python3 -m pytest tests/gpu/test_rmsnorm_gpu.py -q
T = tokens, D = hidden size.
"""
from __future__ import annotations

import pytest
import torch

from weavelm.kernels import rmsnorm as R

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}  # rtol = atol
TOKENS = [1, 7, 128, 4099, 16384]
HIDDEN = [576, 4096, 8192]
EPS = 1e-6


def rand(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def ref64(x, res, w, eps):
    """y in float64: h = x + res; y = h / sqrt(mean(h^2) + eps) * w."""
    h = x.double() + (res.double() if res is not None else 0)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.fixture(autouse=True)
def _fast_path_stays_on():
    from weavelm.kernels import launcher

    yield
    fell_back = [k.name for k in launcher._kernels.values() if k.path == "numba"]
    assert not fell_back, f"cuda.core launch failed and fell back to numba: {fell_back}"


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("D", HIDDEN)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype, T, D, inplace):
    x, res, w = rand((T, D), dtype, 1), rand((T, D), dtype, 2), rand((D,), dtype, 3)
    want = ref64(x, res, w, EPS)
    _, want_res = R.fused_add_rms_norm_ref(x, res, w, EPS, inplace_residual=False)
    out = torch.full_like(x, float("nan"))  # poison: every element must be written
    res_in = res.clone()
    y, new_res = R.fused_add_rms_norm(x, res_in, w, EPS, out=out, inplace_residual=inplace)
    torch.cuda.synchronize()
    assert y is out and (new_res is res_in) == inplace
    if not inplace:
        assert torch.equal(res_in, res)
    assert torch.equal(new_res, want_res)  # fp32 sum, one rounding: bit-exact to the reference
    torch.testing.assert_close(y.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("D", HIDDEN)
@pytest.mark.parametrize("T", [1, 7, 4099])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, T, D):
    x, w = rand((T, D), dtype, 4), rand((D,), dtype, 5)
    out = torch.full_like(x, float("nan"))
    y = R.rms_norm(x, w, EPS, out=out)
    torch.cuda.synchronize()
    torch.testing.assert_close(y.double(), ref64(x, None, w, EPS), rtol=TOL[dtype],
                               atol=TOL[dtype])


def test_3d_input_and_side_stream():
    x, res, w = rand((2, 5, 4096), torch.bfloat16, 6), rand((2, 5, 4096), torch.bfloat16, 7), \
        rand((4096,), torch.bfloat16, 8)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y, new_res = R.fused_add_rms_norm(x, res.clone(), w, EPS)
    torch.cuda.synchronize()
    torch.testing.assert_close(y.double(), ref64(x, res, w, EPS), rtol=1.6e-2, atol=1.6e-2)


def test_both_launch_paths_agree():
    x, res, w = rand((333, 8192), torch.bfloat16, 9), rand((333, 8192), torch.bfloat16, 10), \
        rand((8192,), torch.bfloat16, 11)
    y_core, r_core = R.fused_add_rms_norm(x, res, w, EPS, inplace_residual=False)
    kern, _, _ = R._plan_for("bf16", True, 8192 * 2 // 16, 333, torch.cuda.current_device())
    kern.path = "numba"
    try:
        y_nb, r_nb = R.fused_add_rms_norm(x, res, w, EPS, inplace_residual=False)
    finally:
        kern.path = None
    torch.cuda.synchronize()
    assert torch.equal(y_core, y_nb) and torch.equal(r_core, r_nb)


def test_cuda_graph_of_100_launches_replays_correctly():
    T, D, n = 64, 4096, 100
    x, w = rand((T, D), torch.bfloat16, 12), rand((D,), torch.bfloat16, 13)
    res0 = rand((T, D), torch.bfloat16, 14)
    res, out = res0.clone(), torch.empty_like(x)
    R.fused_add_rms_norm(x, res, w, EPS, out=out)  # compile + load before capture
    torch.cuda.synchronize()

    # Eager chain: residual accumulates x 100 times, in place.
    res.copy_(res0)
    for _ in range(n):
        R.fused_add_rms_norm(x, res, w, EPS, out=out)
    want_res, want_out = res.clone(), out.clone()

    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for _ in range(n):
                R.fused_add_rms_norm(x, res, w, EPS, out=out)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):  # replays are repeatable
        res.copy_(res0)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(res, want_res) and torch.equal(out, want_out)
    ref_res = res0.clone()
    for _ in range(n):
        ref_y, ref_res = R.fused_add_rms_norm_ref(x, ref_res, w, EPS)
    torch.testing.assert_close(out, ref_y, rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [2, 16, 64, 4099])
def test_fused_add_rms_norm_rounded_to_fp8(dtype, T):
    """The variant that rounds its output to FP8 in the same kernel: the residual of the plain
    kernel and the codes and scales `fp8_quant` makes of the plain kernel's output, bit for
    bit (Llama-3-8B's hidden size)."""
    from weavelm.kernels.fp8_quant import quantize_rows_cuda
    x, res, w = rand((T, 4096), dtype, 11), rand((T, 4096), dtype, 12), rand((4096,), dtype, 13)
    y, want_res = R.fused_add_rms_norm_cuda(x, res.clone(), w, EPS)
    want_codes, want_scale = quantize_rows_cuda(y)
    codes, scale, new_res = R.fused_add_rms_norm_rounded_cuda(x, res.clone(), w, EPS)
    assert torch.equal(new_res, want_res)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
