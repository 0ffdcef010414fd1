"""The paged KV cache: per layer, K and V blocks [NB, bs, Hkv, Dh] of this rank's KV heads, in
the model's dtype or in FP8.

FP8 (`kv_cache_dtype="fp8"`, vLLM's name): K (after the rotary embedding) and V are stored as
float8_e4m3fn divided by a per-layer scale (`k_scale`, `v_scale`; 1.0, vLLM's default where a
checkpoint gives none), and every attention reads them back as they are stored, the step's own
fresh keys included, so that a token sees the same keys whether they came from this step or an
earlier one. Twice the tokens fit in the same memory. On GPUs (bf16 / fp16 models) the rope +
cache kernel writes e4m3 and the paged decode kernel reads it (`kv8` variants); prefill pieces
gather and dequantize with torch (`read`).
"""
from __future__ import annotations

import torch

from weavelm.errors import check
from weavelm.kernels.common import FP8, to_e4m3

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def check_kv_cache_dtype(name: str) -> None:
    check(name in KV_CACHE_DTYPES, f"kv_cache_dtype {name!r} is not supported: use 'auto' (the "
                                   f"model's dtype) or 'fp8' (e4m3)")


def cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return FP8 if name in ("fp8", "fp8_e4m3") else model_dtype


class PagedKVCache:
    """Per-layer K and V blocks [NB, bs, Hkv, Dh] of this rank's KV heads."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype, device):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.fp8 = dtype == FP8
        self.k_scale = [1.0] * num_layers
        self.v_scale = [1.0] * num_layers

    @staticmethod
    def bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    def stored(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x as an FP8 cache holds it: x / scale rounded to e4m3 (saturated)."""
        return to_e4m3(x.float(), scale)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k and v [T, Hkv, Dh] to cache slots `slots` (block * bs + offset)."""
        kc, vc = self.k[layer], self.v[layer]
        if self.fp8:          # (torch copies FP8 rows by index only as bytes)
            k = self.stored(k, self.k_scale[layer]).view(torch.uint8)
            v = self.stored(v, self.v_scale[layer]).view(torch.uint8)
            kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k)
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v)

    def read(self, x: torch.Tensor, layer: int, which: str, dtype) -> torch.Tensor:
        """Gathered cache contents (or fresh keys / values) as attention sees them, in dtype."""
        if not self.fp8:
            return x
        scale = self.k_scale[layer] if which == "k" else self.v_scale[layer]
        if x.dtype != FP8:                      # fresh keys: as the cache will hold them
            x = self.stored(x, scale)
        return (x.float() * scale).to(dtype)
