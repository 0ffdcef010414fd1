"""Log-probabilities through the engine (`SamplingParams(logprobs=k, prompt_logprobs=k)`): every
generated and prompt token's log-probability, and its k most likely alternatives, equal
transformers' log_softmax of the same weights (float64 reference), greedy and sampled, with the
prompt prefilled in chunks and with a sequence preempted and recomputed."""
import pytest
import torch

from tiny_models import make_tiny

PROMPTS = [[5, 17, 33, 8, 9, 10, 61, 2, 44], [12, 19, 7], [90]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    path = tmp_path_factory.mktemp("logprobs") / "llama"
    make_tiny("llama", path, seed=3)
    return path, AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()


def _reference(hf, tokens):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0], -1)


def _check(hf, prompt, out, k, prompt_k):
    ref = _reference(hf, prompt + out.token_ids)
    assert len(out.logprobs) == len(out.token_ids)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry.token == tok
        assert abs(entry.logprob - row[tok].item()) < 1e-4
        assert [t for t, _ in entry.top] == row.topk(k).indices.tolist()
        assert max((abs(v - row[t].item()) for t, v in entry.top), default=0) < 1e-4
    if prompt_k is None:
        assert out.prompt_logprobs is None
        return
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[i], ref[i - 1]
        assert entry.token == prompt[i]
        assert abs(entry.logprob - row[prompt[i]].item()) < 1e-4
        assert [t for t, _ in entry.top] == row.topk(prompt_k).indices.tolist()


@pytest.mark.parametrize("chunk", [4, 64])
def test_logprobs_equal_transformers_greedy_and_sampled(tiny, chunk):
    from weavelm import LLM, SamplingParams
    path, hf = tiny
    llm = LLM(str(path), device="cpu", progress=False, max_num_batched_tokens=chunk)
    params = [SamplingParams(max_new_tokens=6, logprobs=3, prompt_logprobs=2),
              SamplingParams(max_new_tokens=6, temperature=0.9, top_k=5, seed=7, logprobs=0),
              SamplingParams(max_new_tokens=4, temperature=1.0, seed=1, logprobs=5,
                             prompt_logprobs=0)]
    outs = llm.generate_from_ids(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, outs):
        _check(hf, prompt, out, p.logprobs, p.prompt_logprobs)


def test_a_request_without_logprobs_beside_one_with(tiny):
    from weavelm import LLM, SamplingParams
    path, hf = tiny
    llm = LLM(str(path), device="cpu", progress=False)
    plain, scored = llm.generate_from_ids(PROMPTS[:2], [
        SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=5, logprobs=2)])
    alone = llm.generate_from_ids(PROMPTS[:1], SamplingParams(max_new_tokens=5))[0]
    assert plain.logprobs is None and plain.token_ids == alone.token_ids
    _check(hf, PROMPTS[1], scored, 2, None)


def test_prompt_logprobs_survive_preemption(tiny):
    """A cache of a few blocks: sequences are preempted mid-prompt and recomputed; each prompt
    token's log-probability is still there once, and right."""
    from weavelm import LLM, SamplingParams
    path, hf = tiny
    long = [(7 * i + 3) % 100 for i in range(40)]
    llm = LLM(str(path), device="cpu", progress=False, num_kv_blocks=7,
              max_num_batched_tokens=8)
    params = SamplingParams(max_new_tokens=20, prompt_logprobs=1, logprobs=1)
    outs = llm.generate_from_ids([long, long[::-1]], params)
    assert llm.engine.scheduler.num_preempted > 0
    for prompt, out in zip([long, long[::-1]], outs):
        _check(hf, prompt, out, 1, 1)


@pytest.mark.parametrize("kwargs", [dict(logprobs=-1), dict(logprobs=21), dict(logprobs=True),
                                    dict(prompt_logprobs=2.0)])
def test_bad_logprob_counts_are_one_line(kwargs):
    from weavelm import SamplingParams
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match="logprobs must be None or an integer in 0..20"):
        SamplingParams(**kwargs)
