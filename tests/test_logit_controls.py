"""Penalties, logit_bias, min_p, min_tokens and stop_token_ids: the controlled logits equal a
float64 reference of the same formulas (loops over tokens, written from vLLM's and OpenAI's
definitions) on the same logits, batched rows with different settings side by side; and
through the engine, the tokens a greedy request picks follow those logits (one step ahead, the
token in flight counted)."""
import math

import numpy as np
import pytest
import torch

from tiny_models import make_tiny


def _reference(logits, params, prompt, output, stop_ids):
    """One row, float64, token by token."""
    x = logits.double().clone()
    V = x.numel()
    for t, v in (params.logit_bias or {}).items():
        x[t] += v
    counts = {t: output.count(t) for t in set(output)}
    seen = set(output) | (set(prompt) if params.repetition_penalty != 1 else set())
    for t in range(V):
        p = params.repetition_penalty
        if t in seen and p != 1:
            x[t] = x[t] / p if x[t] > 0 else x[t] * p
        c = counts.get(t, 0)
        x[t] -= params.frequency_penalty * c + params.presence_penalty * (1 if c else 0)
    if len(output) < params.min_tokens:
        for t in set(stop_ids) | set(params.stop_token_ids or ()):
            x[t] = -math.inf
    return x


def test_controls_equal_the_reference_formulas():
    from weavelm.engine.logit_controls import Controlled, apply_controls, has_controls
    from weavelm.engine.sampler import SamplingParams
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(5, V, generator=g) * 3
    rows = [
        (SamplingParams(presence_penalty=0.7, frequency_penalty=0.3), [1, 2, 3], [4, 4, 9, 1]),
        (SamplingParams(repetition_penalty=1.3), [5, 6, 7], [6, 8, 8]),
        (SamplingParams(logit_bias={3: 5.0, 7: -100, 49: 0.5}), [1], [2]),
        (SamplingParams(), [1], [2]),                                   # no controls
        (SamplingParams(min_tokens=3, stop_token_ids=[11], repetition_penalty=0.8,
                        presence_penalty=-1.5, frequency_penalty=2, logit_bias={11: 3.0}),
         [11, 12], [12, 40]),
    ]
    stop = frozenset({2, 0})
    controlled = [Controlled(i, p, torch.tensor(out), prompt, len(out), stop)
                  for i, (p, prompt, out) in enumerate(rows) if has_controls(p)]
    got = apply_controls(logits, controlled)
    for i, (p, prompt, out) in enumerate(rows):
        want = _reference(logits[i], p, prompt, out, stop if has_controls(p) else ())
        assert torch.allclose(got[i].double(), want, atol=1e-5, equal_nan=False), i
    assert torch.equal(got[3], logits[3])


def test_min_p_drops_exactly_the_unlikely_tokens():
    from weavelm.engine.sampler import SamplingParams, sample
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2000))
    params = [SamplingParams(temperature=1.0, min_p=0.4)] * 2000
    tokens = sample(logits, params, [None] * 2000, torch.Generator().manual_seed(1))
    freq = np.bincount(tokens.numpy(), minlength=4) / 2000
    assert freq[3] == 0 and freq[2] == 0 and freq[1] > 0  # 0.15 and 0.05 < 0.4 x 0.5
    assert abs(freq[0] - 0.5 / 0.8) < 0.04               # the rest renormalized


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from weavelm import LLM
    path = tmp_path_factory.mktemp("controls") / "llama"
    make_tiny("llama", path, seed=9)
    return LLM(str(path), device="cpu", progress=False)


def test_a_penalized_greedy_request_follows_the_penalized_logits(llm):
    """Greedy with penalties: each token is the argmax of the reference-penalized logits of
    the model (transformers-free: the engine's own logits, scored afresh per step)."""
    from weavelm import SamplingParams
    prompt = [5, 17, 33, 8]
    params = SamplingParams(max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.5,
                            repetition_penalty=1.2, ignore_eos=True)
    out = llm.generate_from_ids([prompt], params)[0]
    for i, tok in enumerate(out.token_ids):
        seq = prompt + out.token_ids[:i]
        scored = llm.generate_from_ids([seq], SamplingParams(max_new_tokens=1, logprobs=20,
                                                             ignore_eos=True))[0]
        raw = torch.full((103,), -1e9, dtype=torch.float64)
        for t, v in scored.logprobs[0].top:       # logprobs = logits - logsumexp: same order
            raw[t] = v
        want = _reference(raw, params, prompt, out.token_ids[:i], ()).argmax().item()
        assert tok == want, (i, tok, want)
    assert len(set(out.token_ids)) > 6              # the penalties spread the choice


def test_bias_min_tokens_and_stop_token_ids_through_the_engine(llm):
    from weavelm import SamplingParams
    prompt = [5, 17, 33, 8]
    forced = llm.generate_from_ids([prompt], SamplingParams(
        max_new_tokens=5, logit_bias={42: 100.0}, ignore_eos=True))[0]
    assert forced.token_ids == [42] * 5
    stopped = llm.generate_from_ids([prompt], SamplingParams(
        max_new_tokens=8, logit_bias={42: 100.0}, stop_token_ids=[42]))[0]
    assert stopped.token_ids == [42] and stopped.finish_reason == "stop"
    late = llm.generate_from_ids([prompt], SamplingParams(
        max_new_tokens=8, logit_bias={42: 100.0, 43: 50.0}, stop_token_ids=[42],
        min_tokens=3))[0]
    assert late.token_ids == [43, 43, 43, 42] and late.finish_reason == "stop"


@pytest.mark.parametrize("kwargs,needle", [
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=float("nan")),
                                                     "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(logit_bias={"5": 1}), "logit_bias"), (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"), (dict(stop_token_ids=[-3]), "stop_token_ids")])
def test_bad_controls_are_one_line(kwargs, needle):
    from weavelm import SamplingParams
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match=needle):
        SamplingParams(**kwargs)


def test_a_bias_on_a_token_outside_the_vocabulary_is_refused(llm):
    from weavelm import SamplingParams
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match="outside this model's vocabulary"):
        llm.engine.add_request("b", [5, 6], SamplingParams(logit_bias={500: 1.0}))
    assert "b" not in llm.engine.seqs
