"""FP8 (e4m3) weights for the TP linear layers: the scheme, its quantizers and its GEMM.

Scheme (vLLM's dynamic FP8): each weight row (output channel) of a rank's shard is scaled by its
own absolute maximum / 448 and rounded to float8_e4m3fn once, at load; each activation row
(token) is scaled and rounded the same way at every call; the product of the two FP8 operands,
accumulated in fp32, is multiplied by the token's and the channel's scales and written in the
activations' dtype (the fused communicator and the weave keep bf16 activations).

    with fp8_layers("fp8"):                  # what LLM(quantization="fp8") does around the build
        model = MyModel(...)                 # its TP linear layers hold float8 weights + scales
    y = fp8_linear(x, layer.weight, layer.weight_scale)

Where: on CUDA GPUs of compute capability 8.9 and up, `torch._scaled_mm` (cuBLASLt, FP8 tensor
cores) with row-wise scales; elsewhere (CPU, older GPUs) the same rounding of x, then both
operands dequantized to fp32 for the matmul: the numbers the GPU path computes, up to the order
of the fp32 sums, so CPU tests cover loading, sharding and scales.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from weavelm.errors import check

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)          # 448
METHODS = (None, "fp8")
_MIN_SCALE = 1e-12                              # an all-zero row: scale 1e-12, codes 0

_building: contextvars.ContextVar = contextvars.ContextVar("weavelm_quantization", default=None)


def check_method(method) -> str | None:
    check(method in METHODS, f"quantization {method!r} is not supported: use 'fp8' or leave it "
                             f"unset (the checkpoint's dtype)")
    return method


@contextlib.contextmanager
def fp8_layers(method: str | None = "fp8"):
    """TP linear layers built inside take `method` as their default quantization."""
    token = _building.set(check_method(method))
    try:
        yield
    finally:
        _building.reset(token)


def building_quantization() -> str | None:
    """The quantization of layers built now (`fp8_layers`), None: full precision."""
    return _building.get()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, K] (any float dtype) -> (codes [R, K] float8_e4m3fn, scales [R] float32) with
    codes * scales[:, None] ~ w: each row scaled by its absolute maximum / 448."""
    w = w.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp_(min=_MIN_SCALE)
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale[:, None]


def _scaled_mm_ok(x: torch.Tensor, codes: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    # cuBLASLt FP8: sm_89+, inner and output sizes multiples of 16
    return (major, minor) >= (8, 9) and x.shape[-1] % 16 == 0 and codes.shape[0] % 16 == 0


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x [..., K] -> x W^T (+ bias) [..., R] in x's dtype, W = codes * scale (rows), x rounded
    to FP8 per token. `out` receives the result where given."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(x2)
    if _scaled_mm_ok(x2, codes) and x2.shape[0] > 0:
        y = torch._scaled_mm(xq, codes.t(), scale_a=xs[:, None], scale_b=scale[None, :],
                             out_dtype=x.dtype)
    else:
        y = (dequantize_rows(xq, xs) @ dequantize_rows(codes, scale).t()).to(x.dtype)
    if bias is not None:
        y = y + bias
    y = y.reshape(*lead, codes.shape[0])
    return y if out is None else out.copy_(y)
