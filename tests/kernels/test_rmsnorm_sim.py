"""The RMSNorm kernels, the same source the GPU compiles, run in numba's CUDA simulator.

The simulator must be switched on before numba is imported, and the main pytest process has
numba imported for real (test_ptx.py), so `test_in_simulator` re-runs this file in a subprocess
with NUMBA_ENABLE_CUDASIM=1; the `test_sim_*` tests below run only there. Under the simulator the
ptx primitives are plain-Python models that read and write host memory at the given address, so
the kernels run on CPU tensors' `data_ptr()`s.

T = tokens, D = hidden size.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from simulator_run import IN_SIM, REPO, run_sim_tests

from weavelm.kernels import rmsnorm as R

# Simulator-only tests are named test_sim_* (the subprocess selects them by that name).
sim = pytest.mark.skipif(not IN_SIM, reason="runs in the simulator subprocess (test_in_simulator)")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}  # rtol = atol
SHAPES = [(7, 16), (3, 24), (7, 40), (2, 1040)]  # (T, D); D = 1040: several warps per row


@pytest.mark.skipif(IN_SIM, reason="this is the launcher of the simulator run")
def test_in_simulator():
    run_sim_tests(__file__, timeout=300)


@pytest.mark.skipif(IN_SIM, reason="checked once, outside the simulator run")
def test_cpu_dispatch_uses_reference_without_numba():
    code = ("import sys, torch; from weavelm.kernels import rmsnorm as R;"
            "x = torch.randn(3, 16); r = torch.randn(3, 16); w = torch.randn(16);"
            "y, nr = R.fused_add_rms_norm(x, r.clone(), w, 1e-6);"
            "ry, rr = R.fused_add_rms_norm_ref(x, r.clone(), w, 1e-6);"
            "assert torch.equal(y, ry) and torch.equal(nr, rr);"
            "assert torch.equal(R.rms_norm(x, w, 1e-6), R.rms_norm_ref(x, w, 1e-6));"
            "assert 'numba' not in sys.modules, 'CPU path imported numba'")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- simulator only

def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@sim
def test_sim_same_kernel_source_and_models():
    from weavelm.kernels import launcher, ptx

    assert ptx.SIMULATOR and not hasattr(ptx.load_v4_u32, "_defn")  # plain-Python models
    k = launcher.Kernel("t", lambda: R._build_kernel("bf16", True, 4), R.SIGNATURE)
    # The simulator runs the very function the GPU path jits (test_ptx compiles the same code).
    assert k.dispatcher.py_func.__code__ is R._build_kernel("bf16", True, 4).__code__


@sim
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("T,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_fused_add_rms_norm(dtype, T, D, inplace):
    x, res, w = rand((T, D), dtype, 1), rand((T, D), dtype, 2), rand((D,), dtype, 3)
    want_y, want_res = R.fused_add_rms_norm_ref(x, res, w, 1e-6, inplace_residual=False)
    out = torch.full_like(x, float("nan"))  # every element must be written
    res_in = res.clone()
    y, new_res = R.fused_add_rms_norm_cuda(x, res_in, w, 1e-6, out=out, inplace_residual=inplace)
    assert y is out and (new_res is res_in) == inplace
    if not inplace:
        assert torch.equal(res_in, res)  # untouched
    assert torch.equal(new_res, want_res)  # fp32 sum, one RNE rounding: bit-exact
    torch.testing.assert_close(y, want_y, rtol=TOL[dtype], atol=TOL[dtype])


@sim
@pytest.mark.parametrize("T,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_fused_add_rms_norm_rounded_to_fp8(dtype, T, D):
    """The rounded variant: the residual as the plain kernel leaves it, and the codes and
    scales `quantize_rows` makes of the plain kernel's output, bit for bit."""
    from weavelm.parallel.fp8 import quantize_rows
    x, res, w = rand((T, D), dtype, 6), rand((T, D), dtype, 7), rand((D,), dtype, 8)
    y, want_res = R.fused_add_rms_norm_cuda(x, res.clone(), w, 1e-6)
    want_codes, want_scale = quantize_rows(y)
    codes, scale, new_res = R.fused_add_rms_norm_rounded_cuda(x, res.clone(), w, 1e-6)
    assert torch.equal(new_res, want_res)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


@sim
@pytest.mark.parametrize("T,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_rms_norm(dtype, T, D):
    x, w = rand((T, D), dtype, 4), rand((D,), dtype, 5)
    out = torch.full_like(x, float("nan"))
    y = R.rms_norm_cuda(x, w, 1e-5, out=out)
    torch.testing.assert_close(y, R.rms_norm_ref(x, w, 1e-5), rtol=TOL[dtype], atol=TOL[dtype])


@sim
def test_sim_grid_stride_and_8_vectors_per_thread(monkeypatch):
    # 2 CTAs for 7 rows (grid-stride loop); a 32-thread block over 130 vectors (vpt class 8).
    monkeypatch.setattr(R, "_max_ctas", lambda device, block: 2)
    monkeypatch.setattr(R, "MAX_BLOCK", 32)
    monkeypatch.setattr(R, "_plans", {})
    from weavelm.kernels import launcher
    monkeypatch.setattr(launcher, "_kernels", {})
    x, res, w = rand((7, 520), torch.float32, 6), rand((7, 520), torch.float32, 7), \
        rand((520,), torch.float32, 8)
    kern, grid, block = R._plan_for("f32", True, 130, 7, 0)
    assert (grid, block) == (2, 32) and kern.name.endswith("/8")
    want_y, want_res = R.fused_add_rms_norm_ref(x, res, w, 1e-6, inplace_residual=False)
    y, new_res = R.fused_add_rms_norm_cuda(x, res.clone(), w, 1e-6)
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(y, want_y, rtol=2e-5, atol=2e-5)


@sim
def test_sim_bf16_and_f16_pack_models_round_to_nearest_even():
    from weavelm.kernels import ptx

    v = torch.cat([torch.randn(2000) * 10, torch.tensor([1.00390625, 1.01171875, -2.00390625,
                   65504.0, 1e-40, float("inf"), -float("inf")])])  # ties and edge cases
    for i in range(0, len(v) - 1, 2):
        lo, hi = float(v[i]), float(v[i + 1])
        w = int(ptx.pack_bf16x2(lo, hi))
        want = torch.tensor([lo, hi]).to(torch.bfloat16).view(torch.int16).tolist()
        assert [w & 0xFFFF, w >> 16] == [u & 0xFFFF for u in want], (lo, hi)
        back = ptx.unpack_bf16x2(w)
        want_back = torch.tensor([lo, hi]).to(torch.bfloat16).float().tolist()
        assert [float(b) for b in back] == want_back
        w16 = int(ptx.pack_f16x2(lo, hi))
        want16 = torch.tensor([lo, hi]).to(torch.float16)
        assert [w16 & 0xFFFF, w16 >> 16] == [u & 0xFFFF for u in want16.view(torch.int16).tolist()]
        assert [float(b) for b in ptx.unpack_f16x2(w16)] == want16.float().tolist()
    assert int(ptx.pack_bf16x2(float("nan"), 0.0)) & 0xFFFF == 0x7FFF  # canonical NaN


@sim
def test_sim_launcher_checks():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.randn(16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        R.rms_norm_cuda(x.double(), w.double(), 1e-6)
    with pytest.raises(ValueError, match="multiple of 8"):
        R.rms_norm_cuda(torch.randn(3, 12, dtype=torch.bfloat16), w[:12], 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        R.rms_norm_cuda(torch.randn(16, 3, dtype=torch.bfloat16).t(), w, 1e-6)
    with pytest.raises(TypeError, match="weight has dtype"):
        R.rms_norm_cuda(x, w.float(), 1e-6)
    with pytest.raises(ValueError, match="residual has shape"):
        R.fused_add_rms_norm_cuda(x, x[:2].clone(), w, 1e-6)
    with pytest.raises(ValueError, match="aligned"):
        R.rms_norm_cuda(torch.randn(3 * 16 + 1, dtype=torch.bfloat16)[1:].view(3, 16), w, 1e-6)
