"""A lazy GGUF header reader: metadata and tensor table parsed in milliseconds, tensor data
memory-mapped (`read_header(path)`; cached per file, size and mtime)."""
from __future__ import annotations

import functools
import math
import mmap
import os
import pathlib
import struct
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from weavelm.errors import WeavelmError


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The parsed, memory-mapped GGUF at `path`; a one-line WeavelmError if missing or corrupt."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise WeavelmError(f"GGUF file not found: {p}")
    stat = p.stat()
    # The key includes size and mtime so a file replaced on disk is read afresh.
    return _open_reader(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    # Cached: config, tensors and tokenizer each need the header, and the mapping stays valid.
    return GGUFHeader(path)


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
