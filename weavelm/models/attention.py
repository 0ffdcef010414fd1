"""Causal attention over a KV cache, for batches laid out as one flat run of tokens.

T = tokens in the step, H / Hkv = query / KV heads on this rank, Dh = head dim,
S = sequence slots in the cache, P = positions per slot.

A step's tokens are a concatenation of *pieces*: consecutive tokens of one sequence. A piece
writes its K/V into the cache first, then attends to everything its sequence has cached up to its
own positions. That one rule covers prefill, decode, and a sequence cut in two by the weave
(its first piece's K/V is in the cache before the second piece attends).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass(frozen=True)
class Piece:
    slot: int          # cache slot of the sequence
    start_pos: int     # position of the piece's first token in its sequence
    length: int        # tokens in the piece
    offset: int        # index of the piece's first token in the step's flat token run


@dataclass
class AttentionBatch:
    pieces: list[Piece]
    # Decode fast path (every piece one token): slot index and cached length per token.
    slots: torch.Tensor | None = None          # [T] int64
    lengths: torch.Tensor | None = None        # [T] int64, keys visible to each token

    @classmethod
    def build(cls, pieces: list[Piece], device) -> "AttentionBatch":
        batch = cls(pieces=list(pieces))
        if pieces and all(p.length == 1 for p in pieces) and len(pieces) > 1:
            batch.slots = torch.tensor([p.slot for p in pieces], device=device)
            batch.lengths = torch.tensor([p.start_pos + 1 for p in pieces], device=device)
        return batch

    @classmethod
    def prefill(cls, lengths: list[int], device) -> tuple["AttentionBatch", torch.Tensor]:
        """A step of fresh sequences of these lengths, one per cache slot, back to back:
        (batch, positions [T])."""
        pieces, offset = [], 0
        for slot, n in enumerate(lengths):
            pieces.append(Piece(slot, 0, n, offset))
            offset += n
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        return cls.build(pieces, device), positions

    def split(self, n_first: int) -> tuple["AttentionBatch", "AttentionBatch"]:
        """Cut the step after its first `n_first` tokens (a piece may be cut in two)."""
        first, second = [], []
        for p in self.pieces:
            end = p.offset + p.length
            if end <= n_first:
                first.append(p)
            elif p.offset >= n_first:
                second.append(Piece(p.slot, p.start_pos, p.length, p.offset - n_first))
            else:
                k = n_first - p.offset
                first.append(Piece(p.slot, p.start_pos, k, p.offset))
                second.append(Piece(p.slot, p.start_pos + k, p.length - k, 0))
        return AttentionBatch(first), AttentionBatch(second)


class KVCache:
    """Per-layer K and V tensors [S, P, Hkv, Dh], written by position."""

    def __init__(self, num_layers: int, slots: int, positions: int, kv_heads: int,
                 head_dim: int, dtype, device):
        shape = (slots, positions, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.positions = positions


def _mask(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """[Tq, K] True where query at position q_pos may see key position k."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _sdpa(q, k, v, **kwargs):
    """SDPA with grouped-query heads. On CUDA the KV heads are expanded so the flash kernel
    always applies (GQA support varies by backend and torch version); the CPU kernels take
    enable_gqa directly."""
    if q.is_cuda and k.shape[-3] != q.shape[-3]:
        k, v = _expand_kv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


def _expand_kv(q, k, v):
    reps = q.shape[-3] // k.shape[-3]
    if reps == 1:
        return k, v
    return k.repeat_interleave(reps, dim=-3), v.repeat_interleave(reps, dim=-3)


# Private SDPA ops that also return the log-sum-exp of each query's scores, fastest first. A
# backend that raises once (unsupported GPU, dtype or shape) is not tried again.
_LSE_BACKENDS = ["cudnn", "flash"]


def _sdpa_lse(q, k, v, causal: bool, scale: float):
    """(out [1, H, n, Dh], lse [1, H, n, 1] fp32) on CUDA, or None if no backend applies."""
    k, v = _expand_kv(q, k, v)
    for name in list(_LSE_BACKENDS):
        try:
            if name == "cudnn":
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, causal, False, scale=scale)
            else:
                r = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, 0.0, causal, False, scale=scale)
        except (RuntimeError, AttributeError, NotImplementedError):
            _LSE_BACKENDS.remove(name)
            continue
        n = q.shape[-2]
        lse = r[1].reshape(q.shape[0], q.shape[1], -1)[..., :n].unsqueeze(-1).float()
        return r[0], lse
    return None


def _continuation_attention(qs, keys, values, start: int, scale: float):
    """Exact causal attention of a piece that continues its sequence: queries are positions
    [start, end) and see keys [0, end) up to their own position. Computed as two calls of the
    fast attention kernels - all earlier keys (no mask) and the piece's own keys (square causal)
    - merged by their log-sum-exps: softmax over the union = sigmoid(lse1 - lse2) blend. A single
    call with a lower-right causal mask falls to a slower kernel on H100 (FA2 instead of cuDNN;
    benchmarks/RESULTS.md, round 3)."""
    if not qs.is_cuda or qs.shape[-2] == 1:
        if qs.shape[-2] == 1:                 # one query sees every key: no mask at all
            return _sdpa(qs, keys, values, scale=scale)
        return _sdpa(qs, keys, values, scale=scale,
                     attn_mask=causal_lower_right(qs.shape[-2], keys.shape[-2]))
    earlier = _sdpa_lse(qs, keys[..., :start, :], values[..., :start, :], False, scale)
    own = _sdpa_lse(qs, keys[..., start:, :], values[..., start:, :], True, scale) \
        if earlier is not None else None
    if own is None:
        return _sdpa(qs, keys, values, scale=scale,
                     attn_mask=causal_lower_right(qs.shape[-2], keys.shape[-2]))
    return merge_by_lse(*earlier, *own)


def merge_by_lse(o1, lse1, o2, lse2):
    """Attention over the union of two disjoint key sets, from each set's output and per-query
    log-sum-exp of scaled scores ([..., n, Dh] and [..., n, 1]): the weights are e^lse1 and
    e^lse2, so o = o2 + (o1 - o2) * sigmoid(lse1 - lse2). One lerp in the outputs' dtype (it
    computes in fp32 inside; fp32 copies of the outputs cost more than the attention saved)."""
    w = torch.sigmoid(lse1.float() - lse2.float())
    return torch.lerp(o2, o1, w.to(o2.dtype))


def cached_attention(q, k, v, cache: KVCache, layer: int, batch: AttentionBatch, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """q [T, H, Dh], k/v [T, Hkv, Dh] for this step's tokens -> [T, H, Dh]."""
    kc, vc = cache.k[layer], cache.v[layer]
    out = torch.empty_like(q)
    if batch.slots is not None:
        # Decode: one token per sequence; pad every sequence's keys to the longest.
        kc[batch.slots, batch.lengths - 1] = k
        vc[batch.slots, batch.lengths - 1] = v
        n_keys = int(batch.lengths.max())
        keys = kc[batch.slots, :n_keys].transpose(1, 2)            # [T, Hkv, K, Dh]
        values = vc[batch.slots, :n_keys].transpose(1, 2)
        mask = _mask(batch.lengths - 1, n_keys, window)            # [T, K]
        o = _sdpa(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                  scale=scale)                                     # [T, H, 1, Dh]
        return o.squeeze(2)
    for p in batch.pieces:
        rows = slice(p.offset, p.offset + p.length)
        end = p.start_pos + p.length
        kc[p.slot, p.start_pos:end] = k[rows]
        vc[p.slot, p.start_pos:end] = v[rows]
        qs = q[rows].transpose(0, 1).unsqueeze(0)                  # [1, H, n, Dh]
        keys = kc[p.slot, :end].transpose(0, 1).unsqueeze(0)       # [1, Hkv, end, Dh]
        values = vc[p.slot, :end].transpose(0, 1).unsqueeze(0)
        if p.start_pos == 0 and window is None:
            o = _sdpa(qs, keys, values, is_causal=True, scale=scale)
        elif window is None:
            # A piece that continues its sequence (the weave's second half, a later chunk):
            # no [n, end] mask is built, which would force a slow kernel.
            o = _continuation_attention(qs, keys, values, p.start_pos, scale)
        else:
            q_pos = torch.arange(p.start_pos, end, device=q.device)
            o = _sdpa(qs, keys, values, scale=scale,
                      attn_mask=_mask(q_pos, end, window)[None, None])
        out[rows] = o[0].transpose(0, 1)
    return out
