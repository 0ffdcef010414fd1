"""Attention of a piece that continues its sequence (the weave's second half) on the GPU: the
two-call log-sum-exp path matches a float32 causal reference, and a fast backend was used."""
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("prefix,n", [(300, 200), (4160, 4032), (5, 1)])
def test_continuation_piece_matches_reference(prefix, n):
    from weavelm.models import attention as A
    H, Hkv, Dh = 16, 2, 128
    end = prefix + n
    g = torch.Generator(device="cuda").manual_seed(prefix)
    q = torch.randn(end, H, Dh, device="cuda", generator=g).bfloat16()
    k = torch.randn(end, Hkv, Dh, device="cuda", generator=g).bfloat16()
    v = torch.randn(end, Hkv, Dh, device="cuda", generator=g).bfloat16()
    scale = 1 / math.sqrt(Dh)
    bs = 16
    cache = A.PagedKVCache(1, 1 + -(-end // bs), bs, Hkv, Dh, torch.bfloat16, "cuda")
    blocks = A.fresh_layout([end], bs)
    first = A.AttentionBatch.build([A.Piece(0, 0, prefix, 0)], blocks, bs, "cuda")
    second = A.AttentionBatch.build([A.Piece(0, prefix, n, 0)], blocks, bs, "cuda")
    A.cached_attention(q[:prefix], k[:prefix], v[:prefix], cache, 0, first, scale)
    got = A.cached_attention(q[prefix:], k[prefix:], v[prefix:], cache, 0, second, scale)
    # float32 reference over all keys, causal at the queries' positions
    qf = q[prefix:].float().transpose(0, 1)                          # [H, n, Dh]
    kf = k.float().repeat_interleave(H // Hkv, 1).transpose(0, 1)    # [H, end, Dh]
    vf = v.float().repeat_interleave(H // Hkv, 1).transpose(0, 1)
    mask = torch.arange(end, device="cuda")[None, :] <= torch.arange(prefix, end,
                                                                      device="cuda")[:, None]
    s = (qf @ kf.transpose(1, 2)) * scale
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vf
    err = (got.float().transpose(0, 1) - ref).abs().max().item()
    assert err < 2e-2, err
    if n > 1:        # the piece went through the one varlen flash call of its step
        from weavelm.models import sdpa
        assert sdpa._VARLEN[0] and second.continuations, "the varlen flash call did not apply"
