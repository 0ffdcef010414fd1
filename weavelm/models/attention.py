"""Causal attention over a paged KV cache, for steps laid out as one flat run of tokens.

T = tokens in the step, H / Hkv = query / KV heads on this rank, Dh = head dim,
NB = cache blocks, bs = tokens per block, R = block-table rows, M = blocks per row.

A step's tokens are a concatenation of *pieces*: consecutive tokens of one sequence. A piece
writes its K/V into the cache first, then attends to everything its sequence has cached up to its
own positions. That one rule covers prefill, decode, chunked prefill and a sequence cut in two by
the weave (its first piece's K/V is in the cache before the second piece attends).

The cache is paged: each layer's K and V are [NB, bs, Hkv, Dh], and a sequence's keys live in the
blocks its block-table row lists, in order. Token t of the step writes its K/V to cache slot
`slot_mapping[t]` (= block * bs + offset). Decode steps (every piece one token) read the cache in
place with `kernels.paged_attention` (no gather, no host sync: CUDA-graph safe); prefill pieces
attend over their own keys, and a piece that continues its sequence gathers its earlier keys
from its blocks first.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from weavelm.errors import check
from weavelm.kernels.common import FP8
from weavelm.kernels.paged_attention import longest_first, paged_decode_attention, supported
from weavelm.kernels.rope_cache import rope_and_cache
from weavelm.models.cascade import cascade_decode_attention, cascade_order
from weavelm.models.host_inputs import fill_block_table, host_to_device
from weavelm.models.kv_cache import PagedKVCache  # noqa: F401  (the cache of every step)
from weavelm.models.sdpa import (
    _continuation_attention, _sdpa, varlen_flash, varlen_layout,
)


@dataclass(frozen=True)
class Piece:
    row: int           # the sequence's row in the step's block tables
    start_pos: int     # position of the piece's first token in its sequence
    length: int        # tokens in the piece
    offset: int        # index of the piece's first token in the step's flat token run


@dataclass
class AttentionBatch:
    """How a step's tokens map onto sequences and cache slots.

    decode: every piece is one token and block-table row i belongs to token i (the paged
    kernel's layout); context_lens[i] = keys token i sees (its position + 1). The lengths are
    written at the step's start (here, or the decode graph's first kernels), never by the
    kernel just before an attention call: the paged kernel reads them early (`lens_staged`).
    singles: in a mixed step, the one-token pieces of running sequences (decode tokens), which
    attend in one paged-kernel call instead of one call each: their token indices, block
    tables and key counts (None: there are none, or the step is all decode).
    """
    pieces: list[Piece]
    slot_mapping: torch.Tensor                 # [T] int64, where each token's K/V goes
    block_tables: torch.Tensor                 # [R, M] int32
    context_lens: torch.Tensor | None = None   # [T] int32 (decode only)
    decode: bool = False
    singles: tuple | None = None               # (token indices [n], tables [n, M], lens [n])
    single_offsets: tuple = ()                 # the same token indices, on the host
    # The paged kernel's schedule (`longest_first` of the decode tokens): made on
    # the first layer's call, shared by the others (in a captured graph: one sort per replay).
    order: torch.Tensor | None = None
    # decode: the step's shared prefixes, attended once per group (models/cascade.py)
    cascade: object | None = None
    host_table: np.ndarray | None = None       # block_tables on the host (build() keeps it)
    # the pieces longer than a token, laid out for varlen calls (sdpa.py's varlen_layout;
    # () where there are none), made on the first layer's call
    varlen_calls: tuple | None = None

    @classmethod
    def build(cls, pieces: list[Piece], tables: list[list[int]], block_size: int, device,
              max_blocks: int | None = None) -> "AttentionBatch":
        """From Python block lists (row r of `tables` = the blocks of the sequence that pieces
        with row r belong to): slot mapping and tensors built on the host with numpy (the GPU
        waits for this between steps: Python loops over tokens and rows took 9.6 ms for an
        8192-token step on a 2-core host, numpy 1.6 ms), copied once."""
        width = max(1, max_blocks or max((len(t) for t in tables), default=1))
        counts = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        table = np.zeros((len(tables), width), dtype=np.int32)
        fill_block_table(table, tables, counts)
        lengths = np.fromiter((p.length for p in pieces), dtype=np.int64, count=len(pieces))
        starts = np.fromiter((p.start_pos for p in pieces), dtype=np.int64, count=len(pieces))
        rows = np.fromiter((p.row for p in pieces), dtype=np.int64, count=len(pieces))
        # every token's position: its piece's start plus its index within the piece
        first = np.cumsum(lengths) - lengths
        total = int(lengths.sum())
        pos = np.arange(total, dtype=np.int64) + np.repeat(starts - first, lengths)
        token_rows = np.repeat(rows, lengths)
        block_index = pos // block_size
        check(bool((block_index < counts[token_rows]).all()),
              "a piece reaches past its sequence's blocks: give every sequence the blocks for "
              "all of its positions")
        slots = table[token_rows, block_index].astype(np.int64) * block_size + pos % block_size
        decode = bool(pieces) and all(p.length == 1 and p.row == i for i, p in
                                      enumerate(pieces))
        lens = (starts + 1).astype(np.int32) if decode else None
        batch = cls(list(pieces), host_to_device(slots, device),
                    host_to_device(table, device),
                    None if lens is None else host_to_device(lens, device), decode,
                    host_table=table)
        singles = [p for p in pieces if p.length == 1 and p.start_pos > 0]
        if singles and not decode:
            batch.single_offsets = tuple(p.offset for p in singles)
            batch.singles = (
                host_to_device(np.array(batch.single_offsets, dtype=np.int64), device),
                host_to_device(table[[p.row for p in singles]], device),
                host_to_device(np.array([p.start_pos + 1 for p in singles], dtype=np.int32),
                               device))
        return batch

    def split(self, n_first: int) -> tuple["AttentionBatch", "AttentionBatch"]:
        """Cut the step after its first `n_first` tokens (a piece may be cut in two)."""
        first, second = [], []
        for p in self.pieces:
            end = p.offset + p.length
            if end <= n_first:
                first.append(p)
            elif p.offset >= n_first:
                second.append(replace(p, offset=p.offset - n_first))
            else:
                k = n_first - p.offset
                first.append(replace(p, length=k))
                second.append(replace(p, start_pos=p.start_pos + k, length=p.length - k,
                                      offset=0))
        a = replace(self, pieces=first, slot_mapping=self.slot_mapping[:n_first], order=None,
                    cascade=None, varlen_calls=None)
        b = replace(self, pieces=second, slot_mapping=self.slot_mapping[n_first:], order=None,
                    cascade=None, varlen_calls=None)
        if self.singles is not None:       # token order: the first half's singles come first
            k = sum(1 for o in self.single_offsets if o < n_first)
            rows, tables, lens = self.singles
            a.singles = (rows[:k], tables[:k], lens[:k]) if k else None
            a.single_offsets = self.single_offsets[:k]
            rest = len(self.single_offsets) - k
            b.singles = (rows[k:] - n_first, tables[k:], lens[k:]) if rest else None
            b.single_offsets = tuple(o - n_first for o in self.single_offsets[k:])
        if self.decode:       # rows follow tokens: renumber B's pieces with their rows
            a.block_tables, a.context_lens = self.block_tables[:n_first], \
                self.context_lens[:n_first]
            b.block_tables, b.context_lens = self.block_tables[n_first:], \
                self.context_lens[n_first:]
            b.pieces = [replace(p, row=p.row - n_first) for p in second]
        return a, b


def fresh_layout(lengths: list[int], block_size: int) -> list[list[int]]:
    """Block lists for fresh sequences of these lengths laid out back to back from block 1
    (block 0 is the runner's scratch block): what a one-off prefill (benchmarks, `LLM.logits`)
    needs. The cache must hold 1 + sum of ceil(length / bs) blocks."""
    tables, nxt = [], 1
    for n in lengths:
        k = -(-n // block_size)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    return tables


def prefill_batch(lengths: list[int], block_size: int, device
                  ) -> tuple[AttentionBatch, torch.Tensor, int]:
    """(batch, positions [T], blocks the cache needs) for fresh sequences back to back."""
    tables = fresh_layout(lengths, block_size)
    pieces, offset = [], 0
    for row, n in enumerate(lengths):
        pieces.append(Piece(row, 0, n, offset))
        offset += n
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return AttentionBatch.build(pieces, tables, block_size, device), positions, \
        1 + sum(len(t) for t in tables)


def _mask(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """[Tq, K] True where query at position q_pos may see key position k."""
    k_pos = torch.arange(n_keys, device=q_pos.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _order(batch: AttentionBatch, q, k_cache, lens):
    """The paged kernel's longest-first order of the decode tokens whose key counts are `lens`
    (the step's decode tokens, or a mixed step's singles), made once per batch; None where the
    torch reference runs instead of the kernel."""
    if batch.order is None and q.is_cuda and supported(q, k_cache):
        batch.order = longest_first(lens)
    return batch.order


def _decode_attention(q, kc, vc, batch: AttentionBatch, scale: float, window, scales):
    """A decode step's attention (its keys and values already in the cache): the paged kernel,
    or the cascade where the step's plan groups sequences on shared prefixes (no window: a
    sliding window's keys are not a shared prefix's)."""
    if batch.cascade is not None and window is None and kc.dtype == q.dtype:
        if batch.order is None:
            batch.order = cascade_order(batch.context_lens, batch.cascade)
        return cascade_decode_attention(q, kc, vc, batch.block_tables, batch.context_lens,
                                        scale, batch.cascade, batch.order)
    order = _order(batch, q, kc, batch.context_lens)
    return paged_decode_attention(q, kc, vc, batch.block_tables, batch.context_lens, scale,
                                  window, order=order, lens_staged=True, **scales)


def _pieces_at_once(q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch,
                    scale: float, out) -> set:
    """The pieces longer than a token (fresh prompts, later chunks, prompts after a cached
    prefix) in one varlen flash call (a few where their keys are many): their keys the step's
    own where all are fresh, else gathered from their blocks in one index per layer and call
    (the rows made once per step), written into `out`; returns the offsets done (none if the
    flash call does not apply). Per piece, a step of 64 chunks spent more time launching
    kernels than attending."""
    if batch.host_table is None:
        return set()
    kc, vc = cache.k[layer], cache.v[layer]
    if batch.varlen_calls is None:
        batch.varlen_calls = tuple(varlen_layout(batch.pieces, batch.host_table, kc.shape[1],
                                                 q.device))
    done = set()
    for rows, slots, cu_q, cu_k, max_q, max_k, offsets in batch.varlen_calls:
        # (its tokens ascending: as many as the step's are all of them, in order)
        whole = rows.shape[0] == q.shape[0]
        if slots is None:                  # fresh pieces only: keys are this step's
            keys, values = (k, v) if whole else (k.index_select(0, rows),
                                                 v.index_select(0, rows))
        else:
            keys, values = _cache_rows(kc, slots), _cache_rows(vc, slots)
        keys = cache.read(keys, layer, "k", q.dtype)        # as an FP8 cache holds them
        values = cache.read(values, layer, "v", q.dtype)
        o = varlen_flash(q if whole else q.index_select(0, rows), keys, values, cu_q, cu_k,
                         max_q, max_k, scale)
        if o is None:
            break
        out.index_copy_(0, rows, o)
        done.update(offsets)
    return done


def _cache_rows(cache_layer, slots):
    """Cache rows (block * bs + offset) of one layer's K or V: [n, Hkv, Dh]."""
    flat = cache_layer.view(-1, *cache_layer.shape[2:])
    if cache_layer.dtype == FP8:          # (torch gathers FP8 only as bytes)
        return flat.view(torch.uint8).index_select(0, slots).view(FP8)
    return flat.index_select(0, slots)


def _cached_keys(cache_layer, batch: AttentionBatch, p: Piece, end: int):
    """Keys (or values) 0..end-1 of piece p's sequence, gathered from its blocks: [end, Hkv, Dh]."""
    bs = cache_layer.shape[1]
    blocks = batch.block_tables[p.row, : -(-end // bs)].long()
    if cache_layer.dtype == FP8:          # (torch gathers FP8 only as bytes)
        return cache_layer.view(torch.uint8).index_select(0, blocks).flatten(0, 1)[:end] \
            .view(FP8)
    return cache_layer.index_select(0, blocks).flatten(0, 1)[:end]


def cached_attention(q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch,
                     scale: float, window: int | None = None,
                     cached: bool = False) -> torch.Tensor:
    """q [T, H, Dh], k/v [T, Hkv, Dh] for this step's tokens -> [T, H, Dh]. `cached`: k and v
    are already in the cache at batch.slot_mapping."""
    kc, vc = cache.k[layer], cache.v[layer]
    scales = dict(k_scale=cache.k_scale[layer], v_scale=cache.v_scale[layer])
    if not cached:
        cache.store(layer, batch.slot_mapping, k, v)
    if batch.decode:
        return _decode_attention(q, kc, vc, batch, scale, window, scales)
    out = torch.empty_like(q)
    done = set()
    if batch.singles is not None:          # a mixed step's decode tokens: one paged call
        rows, tables, lens = batch.singles
        o = paged_decode_attention(q.index_select(0, rows), kc, vc, tables, lens, scale, window,
                                   order=_order(batch, q, kc, lens), lens_staged=True,
                                   **scales)
        out.index_copy_(0, rows, o)
        done = set(batch.single_offsets)
    if q.is_cuda and window is None:
        done |= _pieces_at_once(q, k, v, cache, layer, batch, scale, out)
    for p in batch.pieces:
        if p.offset in done:
            continue
        rows = slice(p.offset, p.offset + p.length)
        end = p.start_pos + p.length
        qs = q[rows].transpose(0, 1).unsqueeze(0)                  # [1, H, n, Dh]
        if p.start_pos == 0:      # a fresh sequence: its keys are this step's own
            keys, values = k[rows], v[rows]
        else:
            keys, values = _cached_keys(kc, batch, p, end), _cached_keys(vc, batch, p, end)
        keys = cache.read(keys, layer, "k", q.dtype)              # as an FP8 cache holds them
        values = cache.read(values, layer, "v", q.dtype)
        keys = keys.transpose(0, 1).unsqueeze(0)                   # [1, Hkv, end, Dh]
        values = values.transpose(0, 1).unsqueeze(0)
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


def rotary_attention(q, k, v, rotary, positions, cache: PagedKVCache, layer: int,
                     batch: AttentionBatch, scale: float, window: int | None = None):
    """Rotate q and k (`rotary`: a RotaryEmbedding, its cos / sin tables), write k and v into
    the cache, attend. Every step rotates and writes the cache in one fused kernel (on CPU its
    torch reference); decode steps then take the paged kernel, other steps `cached_attention`."""
    kc, vc = cache.k[layer], cache.v[layer]
    scales = dict(k_scale=cache.k_scale[layer], v_scale=cache.v_scale[layer])   # FP8 caches
    if batch.decode:
        q = rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, kc, vc,
                           batch.slot_mapping, **scales)
        return _decode_attention(q, kc, vc, batch, scale, window, scales)
    q, k = rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, kc, vc,
                          batch.slot_mapping, return_k=True, **scales)
    return cached_attention(q, k, v, cache, layer, batch, scale, window, cached=True)
