"""Attention of a piece that continues its sequence, computed in two parts (earlier keys, own
keys causal) and merged by log-sum-exp, equals one causal attention over all keys (float64)."""
import math

import torch

from weavelm.models.sdpa import merge_by_lse


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


def test_pieces_in_one_varlen_layout_equal_piece_by_piece():
    """A mixed step's pieces longer than a token (fresh prompts, a later chunk, prompts after a
    cached prefix; lengths 2..9 after 0..40 earlier keys), laid out as one packed varlen run
    (`varlen_layout`: their tokens, their keys' cache rows, cu_q / cu_k) and attended in one
    call's contract (`varlen_reference`), equal the piece-by-piece path; single tokens are left
    out of the layout; a step of fresh pieces only takes its keys from the step (no rows)."""
    from weavelm.models.attention import AttentionBatch, Piece, cached_attention
    from weavelm.models.kv_cache import PagedKVCache
    from weavelm.models.sdpa import varlen_layout, varlen_reference
    g = torch.Generator().manual_seed(3)
    bs, H, Hkv, Dh = 4, 4, 2, 8
    specs = [(0, 5), (12, 3), (40, 9), (7, 1), (3, 2), (0, 1), (21, 6)]   # (start, length)
    cache = PagedKVCache(1, 80, bs, Hkv, Dh, torch.float32, "cpu")
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    blocks = torch.randperm(79, generator=g).add(1).tolist()
    pieces, tables, offset = [], [], 0
    for row, (start, n) in enumerate(specs):
        need = -(-(start + n) // bs)
        tables.append([blocks.pop() for _ in range(need)])
        pieces.append(Piece(row, start, n, offset))
        offset += n
    batch = AttentionBatch.build(pieces, tables, bs, "cpu")
    T = offset
    q = torch.randn(T, H, Dh, generator=g)
    k, v = torch.randn(T, Hkv, Dh, generator=g), torch.randn(T, Hkv, Dh, generator=g)
    cache.store(0, batch.slot_mapping, k, v)
    want = cached_attention(q, k, v, cache, 0, batch, 0.3, cached=True)
    (rows, slots, cu_q, cu_k, max_q, max_k, offsets), = varlen_layout(
        batch.pieces, batch.host_table, bs, "cpu")
    assert offsets == (0, 5, 8, 18, 21) and (max_q, max_k) == (9, 49)
    assert cu_q.tolist() == [0, 5, 8, 17, 19, 25] and cu_k.tolist() == [0, 5, 20, 69, 74, 101]
    flat_k, flat_v = cache.k[0].view(-1, Hkv, Dh), cache.v[0].view(-1, Hkv, Dh)
    got = varlen_reference(q.index_select(0, rows), flat_k.index_select(0, slots),
                           flat_v.index_select(0, slots), cu_q, cu_k, 0.3)
    torch.testing.assert_close(got, want.index_select(0, rows), rtol=1e-5, atol=1e-5)
    # at most 50 keys a call: 5 + 15, the 49-key piece, then 5 + 27 (each exact)
    calls = varlen_layout(batch.pieces, batch.host_table, bs, "cpu", max_keys=50)
    assert [c[6] for c in calls] == [(0, 5), (8,), (18, 21)]
    for rows, slots, cu_q, cu_k, *_ in calls:
        got = varlen_reference(q.index_select(0, rows), flat_k.index_select(0, slots),
                               flat_v.index_select(0, slots), cu_q, cu_k, 0.3)
        torch.testing.assert_close(got, want.index_select(0, rows), rtol=1e-5, atol=1e-5)
    # fresh pieces only: no cache rows, the keys are the step's own at the same tokens
    fresh = [Piece(0, 0, 5, 0), Piece(1, 0, 1, 5), Piece(2, 0, 7, 6)]
    fb = AttentionBatch.build(fresh, [tables[0][:2], tables[1][:1], tables[2][:2]], bs, "cpu")
    want = cached_attention(q[:13], k[:13], v[:13], cache, 0, fb, 0.3)
    (rows, slots, cu_q, cu_k, *_), = varlen_layout(fb.pieces, fb.host_table, bs, "cpu")
    assert slots is None and rows.tolist() == [0, 1, 2, 3, 4] + list(range(6, 13))
    got = varlen_reference(q.index_select(0, rows), k.index_select(0, rows),
                           v.index_select(0, rows), cu_q, cu_k, 0.3)
    torch.testing.assert_close(got, want.index_select(0, rows), rtol=1e-5, atol=1e-5)
