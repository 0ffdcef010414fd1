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
        assert sdpa._VARLEN[0] and second.varlen_calls, "the varlen flash call did not apply"


@pytest.mark.parametrize("lengths", [[700, 1, 33, 2048], [700, 33, 2048]])
def test_fresh_pieces_in_one_varlen_call_match_reference(lengths):
    """A step of several fresh prompts (with a one-token one, or only longer ones: then q, k
    and v are read in place): one varlen flash call over the step's own keys, each prompt
    equal to a float32 causal reference of its own."""
    from weavelm.models import attention as A
    from weavelm.models import sdpa
    H, Hkv, Dh, bs = 32, 8, 128, 16
    T = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(T, h, Dh, device="cuda", generator=g).bfloat16()
               for h in (H, Hkv, Hkv))
    scale = 1 / math.sqrt(Dh)
    cache = A.PagedKVCache(1, 2 + sum(-(-n // bs) for n in lengths), bs, Hkv, Dh,
                           torch.bfloat16, "cuda")
    tables = A.fresh_layout(lengths, bs)
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    batch = A.AttentionBatch.build([A.Piece(i, 0, n, o) for i, (n, o) in
                                    enumerate(zip(lengths, offsets))], tables, bs, "cuda")
    got = A.cached_attention(q, k, v, cache, 0, batch, scale)
    assert sdpa._VARLEN[0] and len(batch.varlen_calls) == 1 and batch.varlen_calls[0][1] is None
    for n, o in zip(lengths, offsets):
        qf = q[o:o + n].float().transpose(0, 1)
        kf = k[o:o + n].float().repeat_interleave(H // Hkv, 1).transpose(0, 1)
        vf = v[o:o + n].float().repeat_interleave(H // Hkv, 1).transpose(0, 1)
        mask = torch.ones(n, n, device="cuda", dtype=torch.bool).tril()
        ref = torch.softmax(((qf @ kf.transpose(1, 2)) * scale).masked_fill(~mask, float("-inf")),
                            -1) @ vf
        err = (got[o:o + n].float().transpose(0, 1) - ref).abs().max().item()
        assert err < 2e-2, (n, err)
