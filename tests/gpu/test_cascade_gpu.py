"""Cascade decode attention on one GPU (models/cascade.py): the varlen flash call over each
shared prefix plus the paged kernel over each sequence's own keys, merged, equals the plain
paged kernel; and an engine whose running sequences share a cached prompt decodes through the
cascade graphs to the same greedy tokens as with prefix caching off."""
import numpy as np
import pytest
import torch

from tiny_models import make_tiny

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sharers,prefix_blocks,own", [((3, 5, 1, 8), 32, 7), ((40,), 130, 2)])
def test_cascade_equals_paged_kernel(dtype, sharers, prefix_blocks, own):
    from weavelm.kernels.paged_attention import paged_decode_attention
    from weavelm.models.cascade import (MAX_GROUPS, CascadeLayout, cascade_decode_attention,
                                        cascade_order, plan_cascade)
    H, Hkv, D, bs = 32, 8, 128, 16
    rng = np.random.default_rng(0)
    rows, nxt = [], 1
    for n in sharers:                   # consecutive prefix blocks, own blocks after them
        prefix = list(range(nxt, nxt + prefix_blocks))
        nxt += prefix_blocks
        for _ in range(n):
            rows.append(prefix + list(range(nxt, nxt + own)))
            nxt += own
    B, W = len(rows), prefix_blocks + own
    G = B + 3                           # padded rows, as a graph of a larger batch has
    tables = np.zeros((G, W), dtype=np.int32)
    tables[:B] = rows
    pos = np.zeros(G, dtype=np.int64)
    pos[:B] = (W - 1) * bs + rng.integers(0, bs, B)
    g = torch.Generator(device="cuda").manual_seed(1)
    kc = torch.randn(nxt, bs, Hkv, D, device="cuda", generator=g).to(dtype)
    vc = torch.randn(nxt, bs, Hkv, D, device="cuda", generator=g).to(dtype)
    q = torch.randn(G, H, D, device="cuda", generator=g).to(dtype)
    host = plan_cascade(tables[:B], pos[:B], bs)
    assert host is not None and len(host.used) == sum(n > 1 for n in sharers)
    layout = CascadeLayout(G, MAX_GROUPS)
    buf = np.zeros(layout.size(G), dtype=np.int32)
    layout.fill(buf, host, B)
    plan = layout.views(torch.from_numpy(buf).cuda(), 4096)
    t = torch.from_numpy(tables).cuda()
    lens = torch.from_numpy(pos + 1).to("cuda", torch.int32)
    got = cascade_decode_attention(q, kc, vc, t, lens, D ** -0.5, plan,
                                   order=cascade_order(lens, plan))
    want = paged_decode_attention(q, kc, vc, t, lens, D ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_engine_decodes_shared_prompts_through_the_cascade(tmp_path):
    from weavelm import LLM, SamplingParams
    make_tiny("llama", tmp_path / "llama", seed=4, kv_heads=1, heads=2)
    system = [(7 * i) % 97 + 3 for i in range(90)]          # 5 full blocks and a bit
    prompts = [system + [40 + i, 11, 2 * i + 1] for i in range(5)] + [[4, 8, 15, 16]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    tokens = {}
    for caching in (True, False):
        llm = LLM(str(tmp_path / "llama"), tp=1, device="cuda", dtype="bfloat16",
                  progress=False, max_num_seqs=8, enable_prefix_caching=caching)
        assert llm.runner.cascade is caching
        replays = []
        if caching:                    # count the replays of the shared-prefix graph
            graph = llm.runner.cascade_graphs[8]

            class Counted:
                def replay(self):
                    replays.append(1)
                    graph.replay()
            llm.runner.cascade_graphs[8] = Counted()
        out = llm.generate_from_ids(prompts, params)
        tokens[caching] = [o.token_ids for o in out]
        if caching:
            assert [o.num_cached_tokens for o in out[1:5]] == [80] * 4
            assert len(replays) >= 20          # the decode steps of the five sharers
        del llm
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_continuations_equal_sdpa(dtype):
    """Pieces that continue their sequence, packed (1..300 queries after 1..2,000 earlier
    keys, grouped KV heads), in one varlen flash call: each equals SDPA with a lower-right
    causal mask on its own."""
    from weavelm.models.sdpa import varlen_flash, varlen_reference
    g = torch.Generator(device="cuda").manual_seed(5)
    H, Hkv, D = 32, 8, 128
    pieces = [(2, 1000), (300, 2048), (1, 17), (128, 128), (77, 1500)]   # (queries, keys)
    cu_q = torch.tensor([0] + list(np.cumsum([n for n, _ in pieces])), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(np.cumsum([m for _, m in pieces])), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), H, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, D, device="cuda", generator=g).to(dtype)
    got = varlen_flash(q, k, v, cu_q.cuda(), cu_k.cuda(), 300, 2048, D ** -0.5)
    assert got is not None
    want = varlen_reference(q.float(), k.float(), v.float(), cu_q, cu_k, D ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
