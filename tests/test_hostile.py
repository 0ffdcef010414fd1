"""Hostile and broken checkpoints (issue: hardening). Each case is built here from a tiny random
Llama checkpoint, loaded through `weavelm generate`, and must end with exit code 2, one line that
names the problem, and nothing executed or left running.

Covered so far: tensors larger or smaller than the config says (whole-tensor shape check, not
only the rank's slice), a config with fewer heads than the weights, integer weights, and
repository tokenizer code (`auto_map` + `tokenization_*.py`) with "y" on stdin."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_run import assert_one_line_error
from tiny_models import make_tiny, save_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "llama"
    make_tiny("llama", d, seed=2)
    save_tiny_tokenizer(d)
    return d


def test_the_unbroken_checkpoint_generates(tiny):
    code, out, err = _generate(tiny)
    assert code == 0, err


def _copy(src, dst, tensors=None, config=None):
    """dst: src's checkpoint with `tensors(state) -> state` and `config(cfg) -> cfg` applied."""
    import shutil
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    state = load_file(f)
    if tensors:
        state = tensors(state)
    save_file(state, f)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(cfg)))
    return dst


def _grow_rows(name, extra):
    def edit(state):
        w = state[name]
        state[name] = torch.cat([w, torch.randn(extra, *w.shape[1:], dtype=w.dtype)])
        return state
    return edit


def _replace(name, shape=None, dtype=None):
    def edit(state):
        w = state[name]
        state[name] = torch.ones(shape or w.shape, dtype=dtype or w.dtype)
        return state
    return edit


def _poison(name, value):
    def edit(state):
        state[name].view(-1)[5] = value
        return state
    return edit


def _heads(n):
    def edit(cfg):
        cfg["num_attention_heads"] = n
        return cfg
    return edit


CASES = {
    # name: (tensor edit, config edit, words the one-line error must contain)
    "up_proj has more rows than intermediate_size": (
        _grow_rows("model.layers.0.mlp.up_proj.weight", 16), None, ["up_proj", "shape"]),
    "q_proj 640x64 for a 64x64 model": (
        _replace("model.layers.1.self_attn.q_proj.weight", (640, 64)), None,
        ["q_proj", "(640, 64)"]),
    "config says 2 heads for a 4-head checkpoint": (
        None, _heads(2), ["does not fit", "unsharded) shape"]),
    "int32 weights": (
        _replace("model.layers.0.mlp.down_proj.weight", dtype=torch.int32), None,
        ["down_proj", "floating"]),
    "embedding narrower than hidden_size": (
        _replace("model.embed_tokens.weight", (103, 32)), None, ["embed_tokens", "shape"]),
    # NaN or inf weights gave silently wrong tokens, greedy or sampled: refused as they load
    "a NaN in o_proj": (
        _poison("model.layers.1.self_attn.o_proj.weight", float("nan")), None,
        ["o_proj", "NaN or inf"]),
    "an inf in the norm": (
        _poison("model.layers.0.input_layernorm.weight", float("inf")), None, ["input_layernorm", "NaN or inf"]),
}


def _generate(path, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", "generate", str(path), "-p", "1 2 3",
                        "--no-chat", "--device", "cpu", "-n", "2"], cwd=ROOT, env=env,
                       input=stdin, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_is_refused(tiny, tmp_path, case):
    tensors, config, words = CASES[case]
    d = _copy(tiny, tmp_path / "bad", tensors, config)
    assert_one_line_error(*_generate(d), words)


def test_repository_tokenizer_code_never_runs(tiny, tmp_path):
    d = _copy(tiny, tmp_path / "remote")
    marker = tmp_path / "ran.txt"
    (d / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((d / "tokenizer_config.json").read_text()) \
        if (d / "tokenizer_config.json").exists() else {}
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*_generate(d, stdin="y\ny\n"), ["auto_map", "never runs"])
    assert not marker.exists()


# ----------------------------------------------------------------------------- API misuse

@pytest.fixture(scope="module")
def llm(tiny):
    from weavelm import LLM
    return LLM(str(tiny), device="cpu", progress=False)


MISUSE = {
    "generate([123])": lambda llm: llm.generate([123]),
    "generate([None])": lambda llm: llm.generate([None]),
    "generate(None)": lambda llm: llm.generate(None),
    "params as a dict": lambda llm: llm.generate(["1 2"], {"max_new_tokens": 3}),
    "generate_from_ids([])": lambda llm: llm.generate_from_ids([], None),
    "token id out of range": lambda llm: llm.generate_from_ids([[1, 500]], None),
    "negative token id": lambda llm: llm.generate_from_ids([[1, -4]], None),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_api_misuse_is_aassert_one_line_error(llm, case):
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError) as e:
        MISUSE[case](llm)
    assert "\n" not in str(e.value)
    assert llm.runner.blocks.num_free == llm.runner.blocks.capacity   # nothing left behind


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature="hot"), "temperature"), (dict(seed="abc"), "seed"),
    (dict(seed=10 ** 23), "seed"), (dict(top_p="x"), "top_p"),
    (dict(max_new_tokens=True), "max_new_tokens")])
def test_bad_sampling_params(kwargs, needle):
    from weavelm import SamplingParams
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match=needle):
        SamplingParams(**kwargs)


def test_tiny_temperature_samples_greedily(llm):
    from weavelm import SamplingParams
    greedy = llm.generate_from_ids([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    tiny_t = llm.generate_from_ids([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=1e-40,
                                                               ignore_eos=True, seed=1))
    assert greedy[0].token_ids == tiny_t[0].token_ids


def test_bad_mode_fails_before_loading(tiny, monkeypatch):
    from weavelm import LLM
    from weavelm.errors import WeavelmError
    from weavelm.engine import model_loading
    monkeypatch.setattr(model_loading, "load_weights",
                        lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(WeavelmError, match="unknown mode 'turbo'"):
        LLM(str(tiny), device="cpu", progress=False, mode="turbo")
    with pytest.raises(WeavelmError, match="gpu_memory_utilization"):
        LLM(str(tiny), device="cpu", progress=False, gpu_memory_utilization=2.0)


# ----------------------------------------------------------------------------- shard index

def _sharded(tmp_path, edit):
    d = tmp_path / "sharded"
    make_tiny("llama", d, shard=True)
    save_tiny_tokenizer(d)
    index = d / "model.safetensors.index.json"
    index.write_text(edit(index.read_text()))
    return d


@pytest.mark.parametrize("edit,words", [
    (lambda text: text[: len(text) // 2], ["not valid JSON"]),
    (lambda text: json.dumps({"metadata": {}}), ["no weight_map"]),
    (lambda text: json.dumps({"weight_map": {
        k: "../other/model.safetensors" for k in json.loads(text)["weight_map"]}}),
     ["outside the model directory"]),
])
def test_bad_shard_index_is_refused(tmp_path, edit, words):
    assert_one_line_error(*_generate(_sharded(tmp_path, edit)), words)


def test_invalid_utf8_prompt(tiny):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", "generate", str(tiny), "-p",
                        b"caf\xe9 \xff".decode("utf-8", "surrogateescape"), "--no-chat",
                        "--device", "cpu", "-n", "2"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert_one_line_error(p.returncode, p.stdout, p.stderr, ["not valid UTF-8"])


# ----------------------------------------------------------------------------- config.json

CONFIGS = {
    "a list": (lambda cfg: [cfg], ["JSON object"]),
    "no hidden_size": (lambda cfg: {k: v for k, v in cfg.items() if k != "hidden_size"},
                       ["no hidden_size"]),
    "heads as a string": (lambda cfg: {**cfg, "num_attention_heads": "4"},
                          ["num_attention_heads", "positive integer"]),
    "zero heads": (lambda cfg: {**cfg, "num_attention_heads": 0}, ["num_attention_heads"]),
    "negative layers": (lambda cfg: {**cfg, "num_hidden_layers": -2}, ["num_hidden_layers"]),
    "hidden not divisible by heads": (
        lambda cfg: {**cfg, "num_attention_heads": 3, "num_key_value_heads": 3},
        ["not divisible by num_attention_heads"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_names_field_and_file(tiny, tmp_path, case):
    edit, words = CONFIGS[case]
    d = _copy(tiny, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("head_dim", None)
    (d / "config.json").write_text(json.dumps(edit(cfg)))
    assert_one_line_error(*_generate(d), words + ["config.json"])
