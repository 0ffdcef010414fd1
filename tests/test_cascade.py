"""Cascade decode attention (models/cascade.py): the plan that groups a decode step's sequences
on the runs of cache blocks they share, and the attention that reads each shared prefix once,
against the plain paged attention over every sequence's whole table.

B = sequences, H / Hkv = query / KV heads, D = head dim, bs = tokens per cache block.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from weavelm.kernels.paged_attention import paged_decode_attention_ref
from weavelm.models.cascade import (MAX_GROUPS, CascadeLayout, cascade_decode_attention,
                                    plan_cascade)

BS = 4


def shared_tables(prefixes, seed=0, gap=False):
    """Tables for sequences on shared prefixes: `prefixes` = [(prefix blocks, [own blocks of
    each sharer])]; prefix blocks are consecutive ids (with `gap`: one jump in the middle),
    own blocks come from a shuffled pool. Returns (tables [B, W] int32, positions [B])."""
    rng = np.random.default_rng(seed)
    pool = list(rng.permutation(np.arange(200, 400)))
    nxt, rows, pos = 1, [], []
    for n_prefix, owns in prefixes:
        prefix = list(range(nxt, nxt + n_prefix))
        if gap and n_prefix > 2:
            prefix[n_prefix // 2:] = [b + 50 for b in prefix[n_prefix // 2:]]
        nxt += n_prefix + 60
        for n_own in owns:
            rows.append(prefix + [int(pool.pop()) for _ in range(n_own)])
            pos.append((n_prefix + n_own - 1) * BS + int(rng.integers(0, BS)))
    W = max(map(len, rows)) + 1
    tables = np.zeros((len(rows), W), dtype=np.int32)
    for i, r in enumerate(rows):
        tables[i, :len(r)] = r
    return tables, np.array(pos)


def device_plan(host, G, B=None, max_keys=512):
    """The plan of B sequences (all G rows by default) in the layout of a G-row graph."""
    layout = CascadeLayout(G, MAX_GROUPS)
    buf = np.zeros(layout.size(G), dtype=np.int32)
    layout.fill(buf, host, G if B is None else B)
    return layout.views(torch.from_numpy(buf), max_keys)


def test_plan_groups_on_shared_runs():
    """Two prompts shared by 3 and 2 sequences, one sequence alone, one prompt shared by only
    one sequence: two groups, each with its prefix's blocks and every sharer's rows."""
    tables, pos = shared_tables([(6, [1, 2, 1]), (5, [3, 1]), (7, [2])])
    host = plan_cascade(tables, pos, BS)
    assert host is not None and len(host.used) == 2
    # the largest saving first: 2 extra readers of 6 blocks, then 1 of 5
    assert host.used.tolist() == [6 * BS, 5 * BS]
    assert host.cu_k.tolist() == [tables[0, 0] * BS, tables[3, 0] * BS]
    assert host.cu_q.tolist() == [0, 3, 5]
    assert sorted(host.perm[:3].tolist()) == [0, 1, 2] and sorted(host.perm[3:5].tolist()) == [3, 4]
    assert host.perm[5] == 5 and host.starts.tolist() == [24] * 3 + [20] * 2 + [0]
    assert sorted(host.perm.tolist()) == list(range(6))


def test_plan_stops_at_a_jump_and_before_each_query_block():
    """A prefix whose block ids jump halfway is cut at the jump; the shared run never reaches
    the block a query sits in; too short a run, or a single sequence, forms no group."""
    tables, pos = shared_tables([(10, [1, 1])], gap=True)
    assert plan_cascade(tables, pos, BS).used.tolist() == [5 * BS]
    tables, pos = shared_tables([(8, [0, 0])])            # queries inside the shared blocks
    pos[:] = 6 * BS + 1
    assert plan_cascade(tables, pos, BS).used.tolist() == [6 * BS]
    tables, pos = shared_tables([(3, [1, 1])])
    assert plan_cascade(tables, pos, BS) is None
    tables, pos = shared_tables([(9, [2])])
    assert plan_cascade(tables, pos, BS) is None


def test_plan_keeps_the_largest_groups():
    tables, pos = shared_tables([(4 + i, [1] * (2 + i % 3)) for i in range(MAX_GROUPS + 4)])
    host = plan_cascade(tables, pos, BS)
    assert len(host.used) == MAX_GROUPS
    savings = [(host.cu_q[g + 1] - host.cu_q[g] - 1) * host.used[g] for g in range(MAX_GROUPS)]
    assert savings == sorted(savings, reverse=True)
    grouped = host.starts > 0
    assert grouped.sum() == host.cu_q[-1]


@pytest.mark.parametrize("gap,groups,grouped", [(False, 3, 9), (True, 1, 2)])
def test_cascade_equals_plain_attention(gap, groups, grouped):
    """Every sequence's output (groups, sequences alone, graph padding rows) equals attention
    over its whole table, and the plan written into the fixed layout reads back as made."""
    tables, pos = shared_tables([(6, [1, 3, 2]), (9, [2, 1]), (5, [4]), (7, [1, 1, 1, 2])],
                                seed=1, gap=gap)
    B, H, Hkv, D = len(pos), 8, 2, 16
    g = torch.Generator().manual_seed(2)
    kc = torch.randn(420, BS, Hkv, D, generator=g)
    vc = torch.randn(420, BS, Hkv, D, generator=g)
    q = torch.randn(B + 2, H, D, generator=g)            # two padded rows, as in a graph
    host = plan_cascade(tables, pos, BS)
    assert host is not None and len(host.used) == groups     # with gaps: runs of 3, 4, 3
    plan = device_plan(host, B + 2, B)
    assert plan.perm[:B].tolist() == host.perm.tolist() and plan.perm[B:].tolist() == [B, B + 1]
    assert (plan.perm[plan.q_row.long()] == torch.arange(B + 2)).all()
    t = torch.zeros(B + 2, tables.shape[1], dtype=torch.int32)
    t[:B] = torch.from_numpy(tables)
    lens = torch.zeros(B + 2, dtype=torch.int32)
    lens[:B] = torch.from_numpy(pos + 1)
    lens[B:] = 1
    got = cascade_decode_attention(q, kc, vc, t, lens, D ** -0.5, plan)
    want = paged_decode_attention_ref(q, kc, vc, t, lens, D ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plan.starts[:B] > 0).sum() == grouped


def test_no_plan_fills_plain_rows():
    plan = device_plan(None, 5)
    assert plan.starts.tolist() == [0] * 5 and plan.perm.tolist() == list(range(5))
    assert plan.cu_q.tolist() == [0] * (MAX_GROUPS + 1)


def test_plan_splits_where_prompts_part():
    """A sharer whose query sits early does not cut its prompt's group short: the others form
    the group without it where that saves more key reads; and sequences on a common trunk
    that branch form the group that saves the most (the branch that continues the trunk's run
    of consecutive blocks, over trunk and branch), not one cut at the trunk."""
    def table(rows):
        t = np.zeros((len(rows), max(map(len, rows))), dtype=np.int32)
        for i, r in enumerate(rows):
            t[i, :len(r)] = r
        return t
    prompt = list(range(1, 11))                          # 10 consecutive blocks
    rows = [prompt + [100 + j] for j in range(4)]
    pos = np.array([4 * BS + 2] + [10 * BS + 1] * 3)     # row 0's query in block 5
    host = plan_cascade(table(rows), pos, BS)
    assert host.used.tolist() == [10 * BS] and host.cu_q.tolist() == [0, 3]   # 2x10 > 3x4
    assert host.starts.tolist() == [0] + [10 * BS] * 3
    trunk = list(range(21, 25))
    rows = [trunk + list(range(25, 31)) + [200 + j] for j in range(3)] \
        + [trunk + [60 + 5 * j, 61 + 5 * j] for j in range(2)]
    pos = np.array([10 * BS + 3] * 3 + [5 * BS + 1] * 2)
    host = plan_cascade(table(rows), pos, BS)
    assert host.used.tolist() == [10 * BS] and host.cu_k.tolist() == [21 * BS]   # 2x10 > 4x4
    assert host.starts.tolist() == [10 * BS] * 3 + [0, 0]


@pytest.mark.parametrize("seed", range(4))
def test_random_tries_of_prompts_plan_exact_groups(seed):
    """Random prompts branching from common runs (a trie), queries anywhere after them: every
    group's rows share its run (consecutive ids, before each query's block), groups are
    disjoint, and cascade attention equals plain attention for every row."""
    rng = np.random.default_rng(seed)
    tables, pos, nxt = [], [], 1
    for _ in range(3):                                   # trunks
        trunk = list(range(nxt, nxt + int(rng.integers(2, 9))))
        nxt += len(trunk) + 1
        for _ in range(int(rng.integers(1, 4))):         # branches continuing the trunk's run
            branch = trunk + list(range(nxt, nxt + int(rng.integers(0, 6))))
            nxt += 40
            for _ in range(int(rng.integers(1, 5))):     # sequences with their own blocks
                own = list(range(nxt, nxt + int(rng.integers(1, 4))))
                nxt += len(own) + 1
                tables.append(branch + own)
                pos.append(int(rng.integers(len(branch) // 2, len(tables[-1]))) * BS
                           + int(rng.integers(0, BS)))
    B, W = len(tables), max(map(len, tables))
    t = np.zeros((B, W), dtype=np.int32)
    for i, r in enumerate(tables):
        t[i, :len(r)] = r
    pos = np.array(pos)
    host = plan_cascade(t, pos, BS, min_blocks=2)
    if host is not None:
        seen = set()
        for g in range(len(host.used)):
            members = host.perm[host.cu_q[g]:host.cu_q[g + 1]].tolist()
            n = host.used[g] // BS
            assert len(members) >= 2 and not seen & set(members)
            seen |= set(members)
            for r in members:
                assert (t[r, :n] == np.arange(n) + host.cu_k[g] // BS).all()
                assert n <= pos[r] // BS and host.starts[r] == n * BS
    H, Hkv, D = 4, 2, 8
    g = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(nxt + 1, BS, Hkv, D, generator=g), torch.randn(nxt + 1, BS, Hkv, D,
                                                                       generator=g)
    q = torch.randn(B, H, D, generator=g)
    tt, lens = torch.from_numpy(t), torch.from_numpy(pos + 1).int()
    want = paged_decode_attention_ref(q, kc, vc, tt, lens, D ** -0.5)
    if host is not None:
        got = cascade_decode_attention(q, kc, vc, tt, lens, D ** -0.5, device_plan(host, B))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
