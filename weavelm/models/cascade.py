"""Cascade decode attention: the sequences of a decode step that share a cached prompt prefix
read its keys once for all of them.

B = sequences in the step, H / Hkv = query / KV heads, D = head dim, bs = tokens per cache block,
NG = prefix groups a step may have (fixed, so that a captured graph's shapes are).

With prefix caching, many running sequences hold the same physical blocks for a shared system
prompt; the paged decode kernel still reads every sequence's copy of them (at 256 sequences on
10 prompts of 2,048 tokens, ~70 GB a step for ~3 GB of distinct keys). Here a step's attention
is cut in two, FlashInfer's and vLLM's cascade:
- the shared prefix: one varlen flash-attention call whose "sequences" are the prefix groups —
  group g's queries are its sequences' query tokens, its keys the prefix's run of blocks read in
  place from the cache (flash reads a group's keys once per query head, with tensor cores);
- each sequence's own keys after the prefix: the paged kernel from `starts[b]` on;
and the two are merged by their log-sum-exps (softmax over the union of disjoint key sets).

Flash reads keys from one contiguous run of cache rows per group, so a group's prefix is a run
of *consecutive* block ids from block 0 that its sequences share (the allocator hands a
prompt's blocks out in order, following the sequence's last block); anything after it counts
as the sequence's own keys. So prompts that share only a chat template's first blocks and then
go on in blocks allocated elsewhere share the template run alone (too short to be worth it):
cascading such prompts needs runs that start past block 0, a second own-key range per sequence
in the paged kernel, not built. The plan is made on
the host each step (`plan_cascade`, numpy, ~0.1 ms at 256 sequences) and copied into fixed-size
tensors (`CascadeLayout`), so the same captured CUDA graph serves any grouping.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from weavelm.kernels.paged_attention import longest_first, paged_decode_attention

log = logging.getLogger("weavelm")

MAX_GROUPS = 16          # NG: prefix groups a step may have (the largest savings are kept)
MIN_SHARED_BLOCKS = 4    # a shorter shared run is read by the paged kernel like the rest


@dataclass(frozen=True)
class CascadeLayout:
    """Where a plan lives in one int32 tensor of `size(G, NG)` entries, for G rows (a decode
    graph's batch) and NG groups: views of it are the plan's device tensors."""
    rows: int
    groups: int

    @staticmethod
    def size(rows: int, groups: int = MAX_GROUPS) -> int:
        return 5 * rows + 3 * groups + 2

    def views(self, buf: torch.Tensor, max_keys: int) -> "CascadePlan":
        G, NG = self.rows, self.groups
        parts = torch.split(buf[:self.size(G, NG)], [G, G, G, G, G, NG + 1, NG + 1, NG])
        perm, q_row, starts, grp, within, cu_q, cu_k, used = parts
        return CascadePlan(perm, q_row, starts, grp, within, cu_q, cu_k, used, max_keys)

    def fill(self, buf: np.ndarray, plan: "HostPlan | None", B: int) -> None:
        """Write `plan` (for the first B rows; None: no prefix anywhere) into buf (int32,
        at least size(G, NG) long); rows B..G-1 get no prefix."""
        G, NG = self.rows, self.groups
        out = buf[:self.size(G, NG)]
        out[:] = 0
        perm, q_row, starts, grp, within, cu_q, cu_k, used = np.split(
            out, np.cumsum([G, G, G, G, G, NG + 1, NG + 1]))
        perm[:] = np.arange(G)
        if plan is not None:
            perm[:B] = plan.perm
            starts[:B], grp[:B], within[:B] = plan.starts, plan.group, plan.within
            n = len(plan.used)
            cu_q[:n + 1], cu_k[:n], used[:n] = plan.cu_q, plan.cu_k, plan.used
            cu_q[n + 1:] = plan.cu_q[-1]
        q_row[perm] = np.arange(G)


@dataclass
class CascadePlan:
    """A step's cascade on the device (int32). perm [G]: packed query row i is sequence
    perm[i] (each group's rows together, sequences without a prefix after them); q_row: its
    inverse; starts [G]: keys of sequence b's shared prefix (0: none); grp, within [G]: its
    group and row in the group; cu_q [NG + 1]: group g's rows are [cu_q[g], cu_q[g + 1]);
    cu_k [NG + 1], used [NG]: its keys are cache rows cu_k[g] .. cu_k[g] + used[g] - 1 (a
    cache row = block * bs + offset); max_keys: a bound on used (the flash call's max_k)."""
    perm: torch.Tensor
    q_row: torch.Tensor
    starts: torch.Tensor
    grp: torch.Tensor
    within: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    used: torch.Tensor
    max_keys: int


@dataclass
class HostPlan:
    """plan_cascade's result for B sequences and n groups (numpy int32)."""
    perm: np.ndarray      # [B]
    starts: np.ndarray    # [B]
    group: np.ndarray     # [B]
    within: np.ndarray    # [B]
    cu_q: np.ndarray      # [n + 1]
    cu_k: np.ndarray      # [n]
    used: np.ndarray      # [n]


def plan_cascade(tables: np.ndarray, positions: np.ndarray, block_size: int,
                 max_groups: int = MAX_GROUPS,
                 min_blocks: int = MIN_SHARED_BLOCKS) -> HostPlan | None:
    """The prefix groups of a decode step: tables [B, W] (row b: sequence b's blocks), its
    query positions [B]. A group is two or more sequences sharing their first n >= `min_blocks`
    blocks, of consecutive ids and all full before any of their queries' own block. Sequences
    are split where their tables part (a trie over the block ids: prompts that share a chat
    template's first blocks and then differ form a group per prompt, not one cut at the
    template), each split taken where its groups save more key reads than the whole; the
    `max_groups` groups that save the most are kept. None where no group forms."""
    B = len(positions)
    if B < 2:
        return None
    own = positions // block_size           # blocks wholly before each query's own block
    found = []
    for rows in _parted(tables, np.arange(B), 0):
        found += _best_groups(tables, own, rows, min_blocks)[1]
    if not found:
        return None
    found = sorted(found, key=lambda f: -f[0])[:max_groups]
    perm = np.empty(B, dtype=np.int32)
    starts, group, within = (np.zeros(B, dtype=np.int32) for _ in range(3))
    cu_q = np.zeros(len(found) + 1, dtype=np.int32)
    cu_k, used = np.zeros(len(found), dtype=np.int32), np.zeros(len(found), dtype=np.int32)
    i = 0
    taken = np.zeros(B, dtype=bool)
    for g, (_, rows, first_block, n) in enumerate(found):
        perm[i:i + len(rows)] = rows
        starts[rows], group[rows] = n * block_size, g
        within[rows] = np.arange(len(rows))
        cu_k[g], used[g] = first_block * block_size, n * block_size
        taken[rows] = True
        i += len(rows)
        cu_q[g + 1] = i
    perm[i:] = np.flatnonzero(~taken)
    return HostPlan(perm, starts, group, within, cu_q, cu_k, used)


def _parted(tables: np.ndarray, rows: np.ndarray, column: int) -> list:
    """`rows` split by their block in `column` (each part of two or more rows)."""
    order = rows[np.argsort(tables[rows, column], kind="stable")]
    bounds = np.flatnonzero(np.diff(tables[order, column])) + 1
    return [part for part in np.split(order, bounds) if len(part) >= 2]


def _best_groups(tables, own, rows, min_blocks, depth: int = 0) -> tuple[int, list]:
    """(key reads saved, [(saving, rows, first block, blocks)]) for `rows`, which share their
    first `depth` + 1 blocks: one group over their common run, or the best of each part they
    split into where the run ends, whichever saves more."""
    limit = int(own[rows].min())
    head = tables[rows[0]]
    d = min(depth, limit)
    if d < limit:                # how far the rows share a run of consecutive blocks
        same = (tables[rows, d:limit] == head[d:limit]).all(axis=0) \
            & (head[d:limit] - head[0] == np.arange(d, limit))
        d = limit if same.all() else d + int(np.argmin(same))
    whole = (len(rows) - 1) * d if d >= min_blocks else 0
    groups = [(whole, rows, int(head[0]), d)] if whole else []
    # where some rows go on: the parts they split into at block d, each on its own run
    longer = rows[own[rows] > d]
    if d < tables.shape[1] and len(longer) >= 2:
        parts = [p for p in _parted(tables, longer, d) if tables[p[0], d] == head[0] + d]
        split = [_best_groups(tables, own, p, min_blocks, d + 1) for p in parts]
        saved = sum(s for s, _ in split)
        if saved > whole:
            return saved, [g for _, gs in split for g in gs]
    return whole, groups


def cascade_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float,
                             plan: CascadePlan, order=None) -> torch.Tensor:
    """Decode attention (q [B, H, D], one query a sequence, as `paged_decode_attention`) with
    each sequence's shared prefix (plan.starts[b] keys) attended once per group: equal to the
    plain kernel's result within rounding. `order`: the paged kernel's schedule, by the keys
    after the prefix (`longest_first(context_lens - plan.starts)`)."""
    B, H, _ = q.shape
    own_lse = torch.empty(B, H, dtype=torch.float32, device=q.device)
    own = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                 order=order, starts=plan.starts, lse=own_lse, lens_staged=True)
    shared, shared_lse = shared_prefix_attention(q, k_cache, v_cache, plan, scale)
    w = torch.sigmoid(shared_lse - own_lse).unsqueeze(-1)
    merged = torch.lerp(own, shared, w.to(own.dtype))
    # rows without a prefix: their shared part is whatever the flash call left there
    return torch.where((plan.starts > 0)[:, None, None], merged, own)


def cascade_order(context_lens: torch.Tensor, plan: CascadePlan) -> torch.Tensor:
    return longest_first(context_lens - plan.starts)


def shared_prefix_attention(q, k_cache, v_cache, plan: CascadePlan, scale: float):
    """(out [B, H, D], lse [B, H] fp32) of each sequence's query over its group's prefix keys
    (rows without a prefix: unspecified). CUDA: one varlen flash call; CPU: the reference."""
    if not q.is_cuda:
        return _shared_prefix_ref(q, k_cache, v_cache, plan, scale)
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    packed = q.index_select(0, plan.perm)
    keys, values = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    out, lse = torch.ops.aten._flash_attention_forward(
        packed, keys, values, plan.cu_q, plan.cu_k, B, plan.max_keys, 0.0, False, False,
        scale=scale, seqused_k=plan.used)[:2]
    out = out.index_select(0, plan.q_row)
    if lse.dim() == 2:            # [H, total_q] (unpadded)
        lse = lse.t().index_select(0, plan.q_row)
    else:                         # [NG, H, max_q] (padded per group)
        lse = lse[plan.grp.long(), :, plan.within.long()]
    return out, lse.float()


def _shared_prefix_ref(q, k_cache, v_cache, plan: CascadePlan, scale: float):
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((B, H), -float("inf"), dtype=torch.float32, device=q.device)
    keys, values = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    cu_q, cu_k, used = plan.cu_q.tolist(), plan.cu_k.tolist(), plan.used.tolist()
    for g in range(len(used)):
        if cu_q[g + 1] == cu_q[g]:
            continue
        rows = plan.perm[cu_q[g]:cu_q[g + 1]].long()
        k = keys[cu_k[g]:cu_k[g] + used[g]].float().repeat_interleave(H // Hkv, dim=1)
        v = values[cu_k[g]:cu_k[g] + used[g]].float().repeat_interleave(H // Hkv, dim=1)
        s = torch.einsum("rhd,nhd->rhn", q[rows].float(), k) * scale
        lse[rows] = torch.logsumexp(s, -1)
        out[rows] = torch.einsum("rhn,nhd->rhd", torch.softmax(s, -1), v).to(q.dtype)
    return out, lse


def cascade_works(device, dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether this GPU and torch run the cascade (the varlen flash call with its key counts
    per group, and its log-sum-exp layout) and agree with the plain kernel: checked once on a
    small case; False, with a warning, where not."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        bs, NB, B = 16, 24, 4
        kc = torch.randn(NB, bs, kv_heads, head_dim, generator=g).to(device, dtype)
        vc = torch.randn(NB, bs, kv_heads, head_dim, generator=g).to(device, dtype)
        q = torch.randn(B, heads, head_dim, generator=g).to(device, dtype)
        tables = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7, 8], [1, 2, 3, 4, 9, 10],
                           [11, 12, 13, 14, 15, 16]], dtype=np.int32)
        pos = np.array([80, 70, 90, 77])
        host = plan_cascade(tables, pos, bs)
        layout = CascadeLayout(B, MAX_GROUPS)
        buf = np.zeros(layout.size(B, MAX_GROUPS), dtype=np.int32)
        layout.fill(buf, host, B)
        plan = layout.views(torch.from_numpy(buf).to(device), 6 * bs)
        t = torch.from_numpy(tables).to(device)
        lens = torch.from_numpy(pos + 1).to(device, torch.int32)
        scale = head_dim ** -0.5
        got = cascade_decode_attention(q, kc, vc, t, lens, scale, plan)
        want = paged_decode_attention(q, kc, vc, t, lens, scale)
        err = (got.float() - want.float()).abs().max().item()
        if not err < 2e-2:
            raise RuntimeError(f"differs from the plain kernel by {err:.3g}")
        return True
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.warning("weavelm: cascade attention for shared prefixes is off on this GPU (%s); "
                    "decode reads each sequence's copy of a shared prefix",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
