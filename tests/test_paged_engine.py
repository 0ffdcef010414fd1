"""The engine over the paged KV cache on CPU: greedy tokens equal a transformers greedy loop for
a batch of mixed-length prompts at TP 1, 2 and 4, with blocks smaller than the prompts (each
sequence spans many blocks), a prefill token budget that cuts the longest prompt into chunks,
and a pool of exactly the blocks the batch needs; one more prompt than that pool holds is
served by preempting (and recomputing) the newest sequence, with the same tokens; every block is
free afterwards. The block allocator survives 1000 random operations without a leak."""
import random

import pytest

from tiny_models import greedy_reference, make_tiny
from weavelm.engine.block_manager import RESERVED_BLOCKS, BlockAllocator, NoFreeBlocks
from weavelm.parallel.launch import spawn

BLOCK = 4
NEW = 9
BUDGET = 24          # tokens per prefill step: the 37-token prompt takes two steps


def _prompts():
    g = random.Random(11)
    return [[g.randrange(3, 103) for _ in range(n)] for n in (19, 5, 37, 12)]


def _exact_blocks(prompts) -> int:
    # The last sampled token is never written to the cache.
    return RESERVED_BLOCKS + sum(-(-(len(p) + NEW - 1) // BLOCK) for p in prompts)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    out = {}
    for kind in ("llama", "mistral"):          # mistral: a sliding window of 16 < the prompts
        model = make_tiny(kind, root / kind, seed=7, kv_heads=2)
        out[kind] = (str(root / kind), greedy_reference(model, _prompts(), NEW))
    return out


def _generate(tp, path, prompts, blocks):
    from weavelm import LLM, SamplingParams
    llm = LLM(path, tp=tp, device="cpu", progress=False, block_size=BLOCK,
              num_kv_blocks=blocks, max_num_batched_tokens=BUDGET)
    outs = llm.generate_from_ids(prompts, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    allocator = llm.runner.blocks
    leaked = allocator.capacity - allocator.num_free
    more = llm.generate_from_ids(prompts + [prompts[0]],
                                 SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    return ([o.token_ids for o in outs], leaked, [o.token_ids for o in more],
            llm.engine.scheduler.num_preempted, allocator.capacity - allocator.num_free)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_paged_greedy_equals_transformers(tiny, tp, kind):
    path, want = tiny[kind]
    prompts = _prompts()
    blocks = _exact_blocks(prompts)
    got, leaked, more, preempted, leaked_after = (
        spawn(_generate, tp, tp, path, prompts, blocks) if tp > 1
        else _generate(1, path, prompts, blocks))
    assert got == want
    assert more == want + [want[0]] and preempted > 0
    assert leaked == 0 and leaked_after == 0


def test_block_allocator_no_leak_after_random_operations():
    rng = random.Random(0)
    alloc = BlockAllocator(64, block_size=4)
    held: list[list[int]] = []
    for _ in range(1000):
        if held and (rng.random() < 0.45 or alloc.num_free == 0):
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 6)
            if n > alloc.num_free:
                with pytest.raises(NoFreeBlocks):
                    alloc.allocate(n)
                continue
            blocks = alloc.allocate(n)
            assert 0 not in blocks                                  # the scratch block
            held.append(blocks)
        in_use = [b for t in held for b in t]
        assert len(in_use) == len(set(in_use))                      # never handed out twice
        assert alloc.num_free + len(in_use) == alloc.capacity
    for t in held:
        alloc.free(t)
    assert alloc.num_free == alloc.capacity == 63
    with pytest.raises(ValueError):
        alloc.free([5])                                             # double free is caught


def test_grow_extends_a_table_to_cover_tokens():
    alloc = BlockAllocator(10, block_size=4)
    table: list[int] = []
    alloc.grow(table, 1)
    assert len(table) == 1
    alloc.grow(table, 4)
    assert len(table) == 1
    alloc.grow(table, 9)
    assert len(table) == 3 and alloc.num_free == 6


def _stop_mid_batch(path, prompts, blocks, stop):
    from weavelm import LLM, SamplingParams
    llm = LLM(path, tp=1, device="cpu", progress=False, block_size=BLOCK, num_kv_blocks=blocks,
              max_num_batched_tokens=BUDGET)
    llm.engine.stop_ids = {stop}
    outs = llm.generate_from_ids(prompts, SamplingParams(max_new_tokens=NEW))
    return outs, llm.runner.blocks.capacity - llm.runner.blocks.num_free


def test_eos_mid_batch_stops_one_sequence_only(tiny):
    """Decoding runs one step ahead of the host: a sequence that stops on EOS while the others
    go on keeps exactly its tokens up to the stop, in the exact pool, with no leak."""
    path, full = tiny["llama"]
    stop = full[1][2]                                    # sequence 1's third greedy token
    outs, leaked = _stop_mid_batch(path, _prompts(), _exact_blocks(_prompts()), stop)
    for o, want in zip(outs, full):
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert o.token_ids == want[:cut]
        assert o.finish_reason == ("stop" if stop in want else "length")
    assert leaked == 0
