"""The weave's GEMM SM carveout: it reaches torch's cuBLAS handle, is undone afterwards, and
does not change results."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_carveout_sets_and_restores_cublas_target():
    from weavelm.parallel.sm_carveout import cublas_sm_count_target, gemm_sm_carveout
    torch.cuda.init()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, 7168, device="cuda", dtype=torch.bfloat16) * 0.02
    ref = x @ w.t()
    assert cublas_sm_count_target() == 0
    with gemm_sm_carveout(16):
        assert cublas_sm_count_target() == sms - 16
        got = x @ w.t()
    assert cublas_sm_count_target() == 0
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
