"""Attention of a piece that continues its sequence, computed in two parts (earlier keys, own
keys causal) and merged by log-sum-exp, equals one causal attention over all keys (float64)."""
import math

import torch

from weavelm.models.attention import merge_by_lse


def _attend(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1, keepdim=True)


def test_merge_by_lse_equals_full_causal():
    g = torch.Generator().manual_seed(0)
    H, start, n, Dh = 3, 11, 7, 16
    end = start + n
    q = torch.randn(1, H, n, Dh, generator=g, dtype=torch.float64)
    k = torch.randn(1, H, end, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(1, H, end, Dh, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(Dh)
    q_pos, k_pos = torch.arange(start, end), torch.arange(end)
    full, _ = _attend(q, k, v, k_pos[None, :] <= q_pos[:, None], scale)
    o1, l1 = _attend(q, k[..., :start, :], v[..., :start, :],
                     torch.ones(n, start, dtype=torch.bool), scale)
    o2, l2 = _attend(q, k[..., start:, :], v[..., start:, :],
                     torch.ones(n, n, dtype=torch.bool).tril(), scale)
    merged = merge_by_lse(o1, l1, o2, l2)
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, full, rtol=1e-6, atol=1e-6)  # weights in fp32
    # in bf16 (the GPU path): within bf16 rounding of the exact result
    m16 = merge_by_lse(o1.bfloat16(), l1.float(), o2.bfloat16(), l2.float())
    assert m16.dtype == torch.bfloat16
    torch.testing.assert_close(m16.double(), full, rtol=2e-2, atol=2e-2)
    # the weights matter: a plain average of the two parts is far off
    assert (((o1 + o2) / 2) - full).abs().max() > 1e-2
