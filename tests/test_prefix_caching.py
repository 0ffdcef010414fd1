"""Automatic prefix caching on CPU (tiny Llama, fp32, blocks of 4 tokens): requests that share
prefixes of 0, 3 (a block - 1), 4, 5 and 14 (3.5 blocks) tokens get the same greedy tokens and
logits (their top log-probabilities) with caching on as off and as transformers, at TP 1, 2 and
4, with a prefill budget smaller than a block; their cached prefix is the block-aligned length,
and the model runs on exactly the remaining tokens. Preemption from a tiny pool, an abort in the
middle of a shared prefill, and 10,000 random allocator operations keep everything consistent.
"""
import random

import pytest
import torch

from tiny_models import make_tiny
from weavelm.parallel.launch import spawn

BLOCK = 4
NEW = 6
SHARED = (0, 3, 4, 5, 14)


def _prompts():
    g = random.Random(5)
    base = [g.randrange(3, 103) for _ in range(20)]
    # the base prompt first: its blocks are cached before the others arrive
    out = [base]
    for n in SHARED:
        out.append(base[:n] + [g.randrange(3, 103) for _ in range(7)])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "llama"
    model = make_tiny("llama", path, seed=21, kv_heads=2)
    want = []
    with torch.no_grad():
        for p in _prompts():
            ids = list(p)
            for _ in range(NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            want.append(ids[len(p):])
    return str(path), want


def _one_by_one(tp, path, caching, budget):
    """Each prompt alone, in order: tokens, top-5 logprobs, cached tokens, tokens computed."""
    from weavelm import LLM, SamplingParams
    llm = LLM(path, tp=tp, device="cpu", progress=False, block_size=BLOCK,
              max_num_batched_tokens=budget, enable_prefix_caching=caching)
    computed = []
    step = llm.engine.runner.step

    def counting(pieces, late=None):
        computed[-1] += sum(len(p.token_ids) for p in pieces)
        return step(pieces, late=late)
    llm.engine.runner.step = counting
    tokens, logprobs, cached = [], [], []
    for p in _prompts():
        computed.append(0)
        out = llm.generate_from_ids([p], SamplingParams(max_new_tokens=NEW, ignore_eos=True,
                                                        logprobs=5))[0]
        tokens.append(out.token_ids)
        logprobs.append([[v for _, v in e.top] for e in out.logprobs])
        cached.append(out.num_cached_tokens)
    blocks = llm.runner.blocks
    blocks.check()
    return tokens, logprobs, cached, computed, blocks.capacity - blocks.num_free


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_cached_prefixes_give_the_same_tokens_and_logits(tiny, tp):
    path, want = tiny
    run = (lambda caching, budget: spawn(_one_by_one, tp, tp, path, caching, budget)) \
        if tp > 1 else (lambda caching, budget: _one_by_one(1, path, caching, budget))
    for budget in (3, 64):                        # 3: every prefill in chunks under a block
        on, off = run(True, budget), run(False, budget)
        assert on[0] == off[0] == want
        for a, b in zip(on[1], off[1]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
        # the base prompt found nothing; each other its shared prefix, block-aligned
        expected = [0] + [n // BLOCK * BLOCK for n in SHARED]
        assert on[2] == expected and off[2] == [0] * len(expected)
        # the model ran on exactly what was not cached: prompt rest + NEW - 1 decode tokens
        assert on[3] == [len(p) - c + NEW - 1 for p, c in zip(_prompts(), expected)]
        assert on[4] == 0 and off[4] == 0          # nothing held after the requests ended


def test_a_batch_with_preemption_and_an_abort_mid_prefill(tiny):
    """All prompts at once from a pool too small for them (preemption, recompute picks the
    cache up again), after a request sharing their prefix was aborted halfway through its
    prefill: the same tokens as transformers."""
    from weavelm import LLM, SamplingParams
    path, want = tiny
    prompts = _prompts()
    llm = LLM(path, device="cpu", progress=False, block_size=BLOCK, max_num_batched_tokens=5,
              num_kv_blocks=12)
    engine = llm.engine
    engine.add_request("early", prompts[0] + [9, 9, 9], SamplingParams(max_new_tokens=NEW))
    engine.step()
    engine.step()                                   # 10 of its 23 prompt tokens computed
    assert engine.seqs["early"].num_computed == 10
    assert engine.abort_request("early")
    outs = llm.generate_from_ids(prompts, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert engine.scheduler.num_preempted > 0
    assert outs[0].num_cached_tokens == 8            # the aborted request's two full blocks
    llm.runner.blocks.check()
    assert llm.runner.blocks.num_free == llm.runner.blocks.capacity
    assert engine.reset_prefix_cache() and llm.runner.blocks.num_cached == 0
    again = llm.generate_from_ids(prompts[:1], SamplingParams(max_new_tokens=NEW,
                                                              ignore_eos=True))[0]
    assert again.num_cached_tokens == 0 and again.token_ids == want[0]


def test_samples_of_one_prompt_compute_it_once(tiny):
    """Four requests on one prompt arriving together (the server's n = 4) and a fifth on
    another: the first computes the prompt, the other three wait for its blocks and compute
    only the part after them, while the fifth is admitted in the first step all the same;
    every output equals transformers'."""
    from weavelm import LLM, SamplingParams
    path, want = tiny
    prompts = _prompts()
    llm = LLM(path, device="cpu", progress=False, block_size=BLOCK, max_num_batched_tokens=64)
    steps = []
    step = llm.engine.runner.step

    def counting(pieces, late=None):
        steps.append([len(p.token_ids) for p in pieces])
        return step(pieces, late=late)
    llm.engine.runner.step = counting
    p, other = prompts[5], prompts[1]                       # 21 tokens, and 7
    outs = llm.generate_from_ids([p] * 4 + [other],
                                 SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == [want[5]] * 4 + [want[1]]
    cached = (len(p) - 1) // BLOCK * BLOCK
    assert [o.num_cached_tokens for o in outs] == [0, cached, cached, cached, 0]
    assert steps[0] == [len(p), len(other)]                  # the others wait, the fifth not
    assert sum(map(sum, steps)) == len(p) + 3 * (len(p) - cached) + len(other) \
        + 5 * (NEW - 1)
    llm.runner.blocks.check()


def test_prompt_logprobs_compute_the_whole_prompt(tiny):
    from weavelm import LLM, SamplingParams
    path, _ = tiny
    llm = LLM(path, device="cpu", progress=False, block_size=BLOCK)
    p = _prompts()[0]
    llm.generate_from_ids([p], SamplingParams(max_new_tokens=1))
    hit = llm.generate_from_ids([p], SamplingParams(max_new_tokens=1))[0]
    scored = llm.generate_from_ids([p], SamplingParams(max_new_tokens=1, prompt_logprobs=1))[0]
    assert hit.num_cached_tokens == 16 and scored.num_cached_tokens == 0
    assert len(scored.prompt_logprobs) == len(p)


def test_the_allocator_keeps_its_books_over_random_operations():
    """10,000 random allocate / share (lookup) / name (register) / free / evict operations:
    reference counts, the free list and the cache stay consistent, and no block is handed to a
    writer while someone holds it."""
    from weavelm.engine.block_manager import BlockAllocator, NoFreeBlocks
    g = random.Random(0)
    a = BlockAllocator(40, 4, caching=True)
    held: list[list[int]] = []                     # each: one holder's blocks
    written = set()                                # blocks some holder may write
    for _ in range(10_000):
        op = g.random()
        if op < 0.35:
            n = g.randrange(1, 5)
            after = g.choice([None, g.randrange(42)])   # (blocks taken out of turn)
            try:
                blocks = a.allocate(n, after=after)
            except NoFreeBlocks:
                assert a.num_free < n
                continue
            assert not set(blocks) & {b for h in held for b in h}, "a held block handed out"
            held.append(blocks)
            written.update(blocks)
        elif op < 0.55 and held:
            blocks = g.choice(held)
            a.register(blocks[0], bytes([g.randrange(8)]))
        elif op < 0.75:
            found = a.lookup([bytes([g.randrange(8)])])
            if found:
                held.append(found)
        elif held:
            blocks = held.pop(g.randrange(len(held)))
            a.free(blocks)
        if g.random() < 0.01:
            a.reset_cache()
        a.check()
    for blocks in held:
        a.free(blocks)
    a.check()
    assert a.num_free == a.capacity


def test_a_sequence_grows_along_consecutive_blocks():
    """Blocks after a writer's last one are taken where free (a prompt's blocks form one run
    that decode reads in place), others in the usual order, none twice."""
    from weavelm.engine.block_manager import BlockAllocator
    a = BlockAllocator(20, 4)
    first = a.allocate(3)                          # 1, 2, 3
    other = a.allocate(2)                          # 4, 5
    a.free(other)                                  # 4, 5 back at the end of the queue
    assert a.allocate(2, after=first[-1]) == [4, 5]
    assert a.allocate(2) == [6, 7]                 # the stale queue entries are skipped
    table = [7]
    a.grow(table, 12)
    assert table == [7, 8, 9]
    assert a.allocate(1, after=9) == [10] and a.allocate(1, after=3) == [11]
    a.check()
    assert a.num_free == a.capacity - 11


def test_blocks_taken_out_of_turn_do_not_pile_up_in_the_queue():
    """Sequences growing along their blocks while others come and go: the free queue's stale
    entries (blocks taken out of turn) are dropped before they outnumber the free blocks."""
    import random

    from weavelm.engine.block_manager import BlockAllocator
    g = random.Random(1)
    a = BlockAllocator(2000, 4)
    live = [a.allocate(1) for _ in range(20)]
    for _ in range(20_000):
        i = g.randrange(len(live))
        if g.random() < 0.05:
            a.free(live[i])
            live[i] = a.allocate(1)
        else:
            a.grow(live[i], (len(live[i]) + 1) * 4)
            if len(live[i]) > 40:
                a.free(live[i])
                live[i] = a.allocate(1)
        assert len(a._free) <= 2 * a.num_free + 64 + 1
    a.check()


def test_caching_off_and_bad_values():
    from weavelm import EngineConfig
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match="enable_prefix_caching must be True or False"):
        EngineConfig(enable_prefix_caching="yes")


def test_claims_are_gone_when_every_request_has_ended(tiny):
    """After requests that shared prompts ran, were preempted and were aborted, no prompt
    block is still counted as being computed (a stale count would hold later requests back)."""
    from weavelm import LLM, SamplingParams
    path, _ = tiny
    prompts = _prompts()
    llm = LLM(path, device="cpu", progress=False, block_size=BLOCK, max_num_batched_tokens=5,
              num_kv_blocks=12)
    engine = llm.engine
    engine.add_request("gone", prompts[5] + [9, 9], SamplingParams(max_new_tokens=NEW))
    engine.step()
    engine.abort_request("gone")
    llm.generate_from_ids(prompts * 2, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert engine.scheduler.num_preempted > 0
    assert engine.scheduler._computing == {}
