"""Rotary position embeddings (the Hugging Face "rotate half" layout) with Llama-3 scaling.

T = tokens, H = heads, Dh = head dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """inv_freq [Dh/2] (float64) and the attention scaling factor for the configured RoPE type."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv, 1.0


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; `forward(positions, q, k)` rotates q [T, H, Dh], k [T, Hkv, Dh]."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict,
                 device=None, dtype=torch.float32):
        super().__init__()
        if scaling.get("rope_type") == "dynamic":
            # Dynamic NTK scaling only changes the table beyond the trained length, and weavelm
            # refuses prompts longer than max_position_embeddings, so the default table is exact.
            scaling = {"rope_type": "default"}
        inv, attn_factor = inverse_frequencies(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv)                                  # [P, Dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)                      # [P, Dh]
        self.register_buffer("cos", (emb.cos() * attn_factor).to(dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("sin", (emb.sin() * attn_factor).to(dtype=dtype, device=device),
                             persistent=False)

    @staticmethod
    def _rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, positions, q, k):
        cos = self.cos[positions].unsqueeze(1)                       # [T, 1, Dh]
        sin = self.sin[positions].unsqueeze(1)
        qf, kf = q.float(), k.float()
        q_out = qf * cos + self._rotate_half(qf) * sin
        k_out = kf * cos + self._rotate_half(kf) * sin
        return q_out.to(q.dtype), k_out.to(k.dtype)
