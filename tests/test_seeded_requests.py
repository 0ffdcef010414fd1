"""A seeded request owns its randomness: with temperature > 0 its tokens are the same through
`generate` alone, `generate` beside other requests (both orders, mates seeded otherwise,
unseeded or greedy), the step API with requests arriving mid-decode, after a preemption forced
by a tiny block pool, and `weavelm serve` over HTTP; at max_num_seqs 1 and 8 and at TP 1 and
2 (CPU, gloo). The reference is `generate` alone at TP 1. Also: the README's step-API loop runs
twice with the same request id, and the engine keeps no record of finished requests."""
import httpx
import pytest

from serve_run import start_server, stop_server
from tiny_models import make_tiny
from weavelm.parallel.launch import spawn

NEW = 12
P = [5, 17, 33, 8, 61, 2, 90, 14]                  # the seeded request's prompt
Q = [44, 3, 71, 71, 9, 28, 50, 6, 11, 97, 35]      # its batch-mates' prompts
R = [12, 19]


def _params(**kw):
    from weavelm import SamplingParams
    return SamplingParams(**{"max_new_tokens": NEW, "ignore_eos": True, **kw})


SEEDED = dict(temperature=0.9, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("seeded") / "llama"
    make_tiny("llama", path, seed=4)
    return str(path)


def _front_ends(tp, path, max_num_seqs):
    """The seeded request's tokens through each in-process front end of one engine."""
    from weavelm import LLM
    llm = LLM(path, tp=tp, device="cpu", progress=False, max_num_seqs=max_num_seqs)
    p = _params(**SEEDED)

    def gen(prompts, params):
        return [o.token_ids for o in llm.generate_from_ids(prompts, params)]

    out = {"alone": gen([P], p)[0],
           "with a mate of the same params": gen([P, Q], p)[0],
           "after a mate of the same params": gen([Q, P], p)[1],
           "beside other params": gen([Q, P, R], [_params(temperature=1.0), p, _params()])[1],
           "other seed": gen([P], _params(**{**SEEDED, "seed": 4321}))[0],
           "greedy": gen([P], _params())[0]}
    engine, done = llm.engine, {}

    def step():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.token_ids

    engine.add_request("q", Q, _params(temperature=1.2, seed=7))
    engine.add_request("r", R, _params(temperature=1.0))
    while "q" in engine.seqs and len(engine.seqs["q"].read_token_ids) < 3:
        step()
    engine.add_request("p", P, p)                      # joins while the others decode
    while engine.has_unfinished_requests():
        step()
    out["step API"] = done["p"]
    return out


def _preempted(tp, path):
    """The seeded request among others in a pool too small for all: (its tokens, preemptions)."""
    from weavelm import LLM
    from weavelm.engine.block_manager import RESERVED_BLOCKS
    llm = LLM(path, tp=tp, device="cpu", progress=False, block_size=4,
              num_kv_blocks=RESERVED_BLOCKS + 12, max_num_seqs=8)
    outs = llm.generate_from_ids([Q, P, R, Q], [_params(temperature=1.0), _params(**SEEDED),
                                                _params(), _params(temperature=0.7, seed=3)])
    return outs[1].token_ids, llm.engine.scheduler.num_preempted


def _run(fn, tp, *args):
    return spawn(fn, tp, tp, *args) if tp > 1 else fn(1, *args)


@pytest.fixture(scope="module")
def reference(tiny):
    return _front_ends(1, tiny, 8)["alone"]


@pytest.mark.parametrize("tp,max_num_seqs", [(1, 1), (1, 8), (2, 1), (2, 8)])
def test_a_seeded_request_gives_the_same_tokens_everywhere(tiny, reference, tp, max_num_seqs,
                                                           tmp_path):
    got = _run(_front_ends, tp, tiny, max_num_seqs)
    assert len(reference) == NEW
    assert got["other seed"] != reference and got["greedy"] != reference   # it really samples
    for how in ("alone", "with a mate of the same params", "after a mate of the same params",
                "beside other params", "step API"):
        assert got[how] == reference, how
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = start_server(tiny, tp, log, "--max-num-seqs", max_num_seqs)
        try:
            body = dict(model="tiny", prompt=P, max_tokens=NEW, ignore_eos=True,
                        return_token_ids=True, **SEEDED)
            with httpx.Client(timeout=60) as client:
                mates = [client.post(f"{url}/v1/completions", json=dict(
                    body, prompt=Q, seed=None, temperature=1.0)) for _ in range(2)]
                r = client.post(f"{url}/v1/completions", json=body)
            assert all(m.status_code == 200 for m in mates)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == reference
        finally:
            stop_server(proc)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_seeded_request_survives_preemption(tiny, reference, tp):
    tokens, preempted = _run(_preempted, tp, tiny)
    assert preempted > 0
    assert tokens == reference


def test_the_readme_step_loop_twice_with_one_id(tiny):
    from weavelm import LLM
    llm = LLM(tiny, tp=1, device="cpu", progress=False)
    engine, runs = llm.engine, []
    for _ in range(2):
        engine.add_request("r1", P, _params(**SEEDED))
        tokens = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens += o.new_token_ids
                assert o.request_id == "r1"
        runs.append(tokens)
        assert engine.seqs == {}                       # no record of the finished request
        assert llm.runner.blocks.num_free == llm.runner.blocks.capacity
    assert runs[0] == runs[1] and len(runs[0]) == NEW
    engine.add_request("r1", P, _params(**SEEDED))
    assert engine.abort_request("r1") is True          # aborted: gone at once
    assert engine.seqs == {} and engine.abort_request("r1") is False
    assert not engine.has_unfinished_requests()
