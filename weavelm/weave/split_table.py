"""Tuned split tables: what `weavelm tune` measured per (model shape, TP, GPU).

`SplitTable` holds measured results per (model shape, TP, GPU): for each token bucket the best
`split_offset` (s - T//2) and whether splitting lost (`no_split`), plus `min_tokens`, the smallest
bucket from which splitting won at every larger bucket. Tables live in
`<cache>/splits/<key>.json`, `<cache>` being `$WEAVELM_CACHE`, else `$XDG_CACHE_HOME/weavelm`, else
`~/.cache/weavelm`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import tempfile
import warnings
from dataclasses import dataclass, field

from weavelm.cache_dir import cache_root
from weavelm.weave.wave_model import DEFAULT_MIN_TOKENS

TABLE_VERSION = 1


def model_key(config) -> str:
    """Key of a model's layer shape, e.g. "h8192-i28672-a64-kv8" (plus "-d<head_dim>" when
    unusual). The layer count is left out on purpose: the best split depends on each layer's
    GEMMs, so a table tuned on a few layers serves the full model. `config`: a ModelConfig."""
    key = (f"h{config.hidden_size}-i{config.intermediate_size}-a{config.num_heads}"
           f"-kv{config.num_kv_heads}")
    default_head_dim = config.hidden_size // config.num_heads
    return key if config.head_dim == default_head_dim else f"{key}-d{config.head_dim}"


def table_key(model: str, tp: int, gpu_name: str) -> str:
    """Key of a tuned table: model shape, TP degree, GPU name."""
    return f"{model}-tp{tp}-{gpu_name}"


def _sanitize(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "default"


@dataclass
class SplitTable:
    """Measured split points for one (model shape, TP, GPU) key.

    entries: {bucket_tokens: {"split_offset": s - T//2, "no_split": bool}};
    min_tokens: smallest bucket from which splitting won at every larger bucket (None: never won);
    meta: free-form facts about the tuning run (measure calls, timings).
    """
    key: str
    entries: dict[int, dict] = field(default_factory=dict)
    min_tokens: int | None = DEFAULT_MIN_TOKENS
    meta: dict = field(default_factory=dict)

    @staticmethod
    def path_for(key: str) -> pathlib.Path:
        return cache_root() / "splits" / f"{_sanitize(key)}.json"

    def lookup(self, num_tokens: int) -> dict | None:
        """The entry of the bucket nearest `num_tokens` in log distance (ties: larger bucket)."""
        if not self.entries:
            return None
        t = math.log(max(num_tokens, 1))
        bucket = min(self.entries, key=lambda b: (abs(math.log(b) - t), -b))
        return self.entries[bucket]

    def to_json(self) -> dict:
        return {"version": TABLE_VERSION, "key": self.key, "min_tokens": self.min_tokens,
                "entries": {str(b): dict(e) for b, e in sorted(self.entries.items())},
                "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict) -> "SplitTable":
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"split table version {data.get('version')!r}, "
                             f"expected {TABLE_VERSION}")
        entries = {int(b): {"split_offset": int(e["split_offset"]), "no_split": bool(e["no_split"])}
                   for b, e in data["entries"].items()}
        mt = data.get("min_tokens")
        return cls(data["key"], entries, None if mt is None else int(mt), data.get("meta", {}))

    def save(self) -> pathlib.Path:
        """Write the table atomically (temp file + os.replace); returns its path."""
        path = self.path_for(self.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _cached_load.cache_clear()
        return path

    @classmethod
    def load(cls, key: str) -> "SplitTable | None":
        """The saved table for `key`, or None when there is none (or it is unreadable: warns)."""
        try:
            path = cls.path_for(key)
            with open(path) as f:
                return cls.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"ignoring unreadable split table for {key!r}: {e}", stacklevel=2)
            return None


def cached_table(key: str) -> SplitTable | None:
    """`SplitTable.load(key)`, read once per process and cache directory."""
    try:
        root = str(cache_root())
    except RuntimeError:   # no home directory to expand: no cache, the model decides
        return None
    return _cached_load(key, root)


@functools.lru_cache(maxsize=64)
def _cached_load(key: str, root: str) -> SplitTable | None:
    return SplitTable.load(key)
