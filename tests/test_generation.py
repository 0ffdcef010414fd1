"""Generation: batching prompts of different lengths changes nothing, sampling is seeded and
honours its parameters, EOS stops a sequence."""
import pytest
import torch

from tiny_models import make_tiny
from weavelm.engine.sampler import SamplingParams, sample
from weavelm.errors import WeavelmError
from weavelm.parallel.launch import spawn

PROMPTS = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8], [30, 31, 32, 33, 34, 35, 36, 37, 38,
                                                          39, 40, 41, 42, 43, 44, 45, 46, 47]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    paths = {}
    for kind in ("llama", "qwen3"):
        make_tiny(kind, root / kind, seed=3)
        paths[kind] = str(root / kind)
    return paths


def _batched_vs_single(tp, path):
    from weavelm import LLM
    llm = LLM(path, tp=tp, device="cpu", progress=False)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate_from_ids(PROMPTS, params)]
    single = [llm.generate_from_ids([p], params)[0].token_ids for p in PROMPTS]
    return batched, single


@pytest.mark.parametrize("tp,kind", [(1, "llama"), (1, "qwen3"), (2, "llama")])
def test_batched_equals_one_prompt_at_a_time(tiny, tp, kind):
    result = (spawn(_batched_vs_single, tp, tp, tiny[kind]) if tp > 1
              else _batched_vs_single(1, tiny[kind]))
    batched, single = result
    assert all(len(b) == 12 for b in batched)
    assert batched == single


def test_seeded_sampling_and_eos(tiny):
    from weavelm import LLM
    llm = LLM(tiny["llama"], tp=1, device="cpu", progress=False)
    hot = SamplingParams(max_new_tokens=16, temperature=1.5, seed=7, ignore_eos=True)
    a = llm.generate_from_ids(PROMPTS, hot)
    b = llm.generate_from_ids(PROMPTS, hot)
    c = llm.generate_from_ids(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.5,
                                                      seed=8, ignore_eos=True))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    greedy = llm.generate_from_ids(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))
    top1 = llm.generate_from_ids(PROMPTS, SamplingParams(max_new_tokens=16, temperature=2.0,
                                                         top_k=1, seed=1, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]

    # Make the 4th greedy token of sequence 0 the EOS: generation must stop right there.
    stop = greedy[0].token_ids[3]
    llm.engine.stop_ids = {stop}
    out = llm.generate_from_ids([PROMPTS[0]], SamplingParams(max_new_tokens=16))[0]
    first = greedy[0].token_ids.index(stop)
    assert out.token_ids == greedy[0].token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_sampler_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    def draw(params):
        return int(sample(logits, [params], [None], g))
    draws = [draw(SamplingParams(temperature=1.0, top_p=0.7)) for _ in range(300)]
    assert set(draws) == {0, 1}                       # 0.5 + 0.3 covers top_p = 0.7
    draws = [draw(SamplingParams(temperature=1.0, top_k=3)) for _ in range(300)]
    assert set(draws) == {0, 1, 2}
    assert draw(SamplingParams()) == 0


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(top_k=-2), dict(max_new_tokens=0)])
def test_invalid_sampling_values(kwargs):
    with pytest.raises(WeavelmError):
        SamplingParams(**kwargs)
