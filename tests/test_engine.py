"""The step-level engine on CPU (gloo): continuous batching with chunked prefill.

Requests arrive while others decode, prompts are cut into chunks by token budgets of 1, 3 (less
than a block) and 64 tokens, a tiny pool forces preemption, one request is aborted and one is
longer than the context: greedy tokens equal a transformers greedy loop at TP 1, 2 and 4, the
bad request finishes with a one-line error while the others finish, and every block is free
afterwards. At TP 2 and 4 the weave runs mixed steps (decode tokens + prefill chunks) and gives
the baseline's tokens."""
import random

import pytest
import torch

from tiny_models import make_tiny
from weavelm.engine.block_manager import RESERVED_BLOCKS
from weavelm.parallel.launch import spawn

BLOCK, NEW = 4, 8


def _prompts():
    g = random.Random(5)
    return {name: [g.randrange(3, 103) for _ in range(n)]
            for name, n in (("a", 21), ("b", 6), ("c", 30), ("e", 9))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "llama"
    model = make_tiny("llama", path, seed=9, kv_heads=2)
    want = {}
    with torch.no_grad():
        for name, p in _prompts().items():
            ids = list(p)
            for _ in range(NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            want[name] = ids[len(p):]
    return str(path), want


def _drive(tp, path, budget, blocks, mode):
    """The scripted arrivals; returns what each request produced and the engine's counters."""
    from weavelm import LLM, SamplingParams
    llm = LLM(path, tp=tp, device="cpu", progress=False, block_size=BLOCK, mode=mode,
              max_num_batched_tokens=budget, num_kv_blocks=blocks, max_model_len=64)
    engine, params = llm.engine, SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    woven = []
    decide = llm.policy.prefill
    llm.policy.prefill = lambda n, lens=None: woven.append((n, list(lens or []),
                                                             decide(n, lens))) or woven[-1][2]
    prompts, done = _prompts(), {}

    def step(times=1):
        for _ in range(times):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.token_ids, out.finish_reason)

    engine.add_request("a", prompts["a"], params)
    engine.add_request("b", prompts["b"], params)
    while len(engine.seqs["a"].output_token_ids) < 2:
        step()                                       # a is decoding
    engine.add_request("c", prompts["c"], params)    # arrives mid-decode
    engine.add_request("d", [7] * 70, params)        # longer than the context (64)
    engine.add_request("e", prompts["e"], params)
    step(2)
    aborted = engine.abort_request("e")              # its blocks come back at once
    free_after_abort = engine.runner.blocks.num_free
    while engine.has_unfinished_requests():
        step()
    blocks_left = engine.runner.blocks.capacity - engine.runner.blocks.num_free
    mixed_woven = sum(1 for n, lens, (m, split) in woven
                      if split is not None and 1 in lens and max(lens) > 1)
    return dict(done=done, preempted=engine.scheduler.num_preempted, blocks_left=blocks_left,
                aborted=aborted, free_after_abort=free_after_abort, mixed_woven=mixed_woven,
                records_left=sorted(engine.seqs))


def _run(tp, *args):
    return spawn(_drive, tp, tp, *args) if tp > 1 else _drive(1, *args)


def _check(r, want):
    for name in ("a", "b", "c"):
        assert r["done"][name] == (want[name], "length"), name
    tokens, reason = r["done"]["d"]
    assert tokens == [] and reason.startswith("error: ") and "context holds 64" in reason
    assert "\n" not in reason
    assert r["aborted"] is True and "e" not in r["done"]
    assert r["blocks_left"] == 0
    assert r["records_left"] == []          # finished and aborted requests left the engine


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("budget", [1, 3, 64])
def test_engine_greedy_equals_transformers(tiny, tp, budget):
    path, want = tiny
    _check(_run(tp, path, budget, None, "baseline"), want)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_preemption_recomputes_and_keeps_tokens(tiny, tp):
    path, want = tiny
    # 10 blocks: a (7 at its end) and b (4) cannot both finish at once; c (10) fits alone
    blocks = RESERVED_BLOCKS + 10
    r = _run(tp, path, 64, blocks, "baseline")
    _check(r, want)
    assert r["preempted"] > 0


@pytest.mark.parametrize("tp", [2, 4])
def test_weave_on_mixed_steps_equals_baseline(tiny, tp):
    path, want = tiny
    r = _run(tp, path, 64, None, "weave")
    _check(r, want)
    assert r["mixed_woven"] > 0            # some step mixed decode tokens and a prefill chunk


def _drive_stop(tp, path, stop_id):
    """All four prompts at once, `stop_id` as EOS: every output the engine gives back."""
    from weavelm import LLM, SamplingParams
    llm = LLM(path, tp=tp, device="cpu", progress=False, block_size=BLOCK,
              max_num_batched_tokens=16, max_model_len=64)
    engine = llm.engine
    engine.stop_ids = {stop_id}
    for name, prompt in _prompts().items():
        engine.add_request(name, prompt, SamplingParams(max_new_tokens=NEW))
    seen, done = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append((list(out.token_ids), list(out.new_token_ids)))
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason)
    return dict(done=done, seen=seen,
                blocks_left=engine.runner.blocks.capacity - engine.runner.blocks.num_free)


@pytest.mark.parametrize("tp", [1, 2])
def test_stop_while_the_next_step_is_in_flight(tiny, tp):
    """The engine queues step k + 1 before it reads step k: a sequence that stops at step k
    has already been given step k + 1, whose token must be dropped. Outputs never show a token
    the host has not read."""
    from weavelm.engine.step_rows import PLACEHOLDER
    path, want = tiny
    stop_id = want["a"][3]                          # a stops at its 4th token
    r = spawn(_drive_stop, tp, tp, path, stop_id) if tp > 1 else _drive_stop(1, path, stop_id)
    stopped = 0
    for name, tokens in want.items():
        if stop_id in tokens:
            n = tokens.index(stop_id) + 1
            assert r["done"][name] == (tokens[:n], "stop"), name
            stopped += n < NEW
        else:
            assert r["done"][name] == (tokens, "length"), name
    assert stopped >= 1                             # some sequence stopped before its budget
    assert all(PLACEHOLDER not in t and PLACEHOLDER not in new for t, new in r["seen"])
    assert r["blocks_left"] == 0


@pytest.mark.parametrize("before", [(700, 10, 10), (50_000, 7, 3), (0, 10, 10)])
def test_engine_makes_young_collections_rarer_and_never_more_frequent(tiny, before):
    """An engine raises Python's young-generation threshold (its steps allocate many small
    objects, and each collection cascade walked every sequence's tokens), leaves a higher one
    and the older generations' as they were, and leaves a disabled collector (0) off."""
    import gc

    from weavelm import LLM
    from weavelm.engine.engine import GC_YOUNG_THRESHOLD
    saved = gc.get_threshold()
    try:
        gc.set_threshold(*before)
        llm = LLM(tiny[0], tp=1, device="cpu", dtype="float32", progress=False)
        young = before[0] if before[0] == 0 else max(before[0], GC_YOUNG_THRESHOLD)
        assert gc.get_threshold() == (young, *before[1:])
        del llm
    finally:
        gc.set_threshold(*saved)


def test_step_outputs_keep_the_tokens_they_were_given(tiny):
    """Each step's output of a request holds the tokens generated up to that step, unchanged by
    the steps after it (an output reads the engine's own token list up to its count)."""
    from weavelm import LLM, SamplingParams
    llm = LLM(tiny[0], tp=1, device="cpu", dtype="float32", progress=False)
    prompt = _prompts()["a"]
    llm.engine.add_request("a", prompt, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    outs = []
    while llm.engine.seqs or not outs:
        outs += [o for o in llm.engine.step() if o.request_id == "a"]
    final = outs[-1].token_ids
    assert outs[-1].finished and final == tiny[1]["a"]
    for o in outs:
        n = len(o.token_ids)
        assert o.token_ids == final[:n] and o.new_token_ids == final[n - len(o.new_token_ids):n]
    assert [len(o.token_ids) for o in outs] == list(range(1, NEW + 1))
