"""The model-family registry: everything weavelm knows about a family, in one entry.

A family is one model class plus the facts the rest of the library needs about it:

* how `config.json` maps onto `ModelConfig` (`config_flags`, `config_hook`),
* which checkpoint tensors are packed into one parameter (`packed_modules`),
* how its GGUF files name tensors (`gguf_architecture`, `gguf_block_names`, `gguf_permute_qk`),
* the per-rank GEMMs of one decoder layer (`layer_gemms`), which the weave's splitter models.

Adding a family is one new module that defines the model class and calls `register_family`,
plus its module name in `BUILTIN_FAMILY_MODULES` (families are imported on first lookup).
Code outside may register its own family the same way (tests do).

Packed modules map a checkpoint module name to (parameter module, shard id): `"q_proj":
("qkv_proj", "q")` loads `...q_proj.weight` into `...qkv_proj.weight` with `shard_id="q"`. A `*`
in the checkpoint name matches an integer index, which is put in front of the shard id:
`"experts.*.w1": ("experts.w13", 0)` loads `...experts.5.w1.weight` with `shard_id=(5, 0)`.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from weavelm.errors import check
from weavelm.weave.wave_model import GemmShape  # noqa: F401 - families import it from here

BUILTIN_FAMILY_MODULES = ("weavelm.models.llama", "weavelm.models.moe")


@dataclass(frozen=True)
class ModelFamily:
    architecture: str                          # config.json `architectures[0]`
    model_class: type                          # built as cls(config, dtype=, device=, max_positions=)
    layer_gemms: Callable[[Any, int], list[GemmShape]]   # (ModelConfig, tp) -> per-rank GEMMs
    packed_modules: dict[str, tuple[str, Any]] = field(default_factory=dict)
    config_flags: dict[str, Any] = field(default_factory=dict)   # ModelConfig fields it fixes
    # (hf config dict, parsed ModelConfig fields) -> None: checks and adjusts the fields.
    config_hook: Callable[[dict, dict], None] | None = None
    gguf_architecture: str | None = None       # GGUF `general.architecture`
    gguf_block_names: dict[str, str] = field(default_factory=dict)  # blk.N.<gguf> -> HF name
    gguf_permute_qk: bool = False              # llama.cpp's llama converter permutes q/k rows
    gguf_moe: bool = False                     # its GGUFs have `{arch}.expert_count` > 0

    def map_checkpoint_name(self, name: str) -> tuple[str, Any]:
        """(parameter name, shard id or None) for a checkpoint tensor name."""
        return map_checkpoint_name(name, self.packed_modules)


def map_checkpoint_name(name: str, packed_modules: dict[str, tuple[str, Any]]
                        ) -> tuple[str, Any]:
    """(parameter name, shard id or None) for a checkpoint tensor name, through a packed-module
    table (`{"q_proj": ("qkv_proj", "q"), ...}`; a `*` captures an expert index)."""
    for pattern, (target, shard) in _compiled(packed_modules):
        match = pattern.search(name)
        if match:
            index = match.groupdict().get("index")
            shard_id = shard if index is None else (int(index), shard)
            return name[:match.start()] + f".{target}." + name[match.end():], shard_id
    return name, None


_FAMILIES: dict[str, ModelFamily] = {}
_loaded_builtins = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` known under its architecture name (a later entry replaces an earlier)."""
    _FAMILIES[family.architecture] = family
    return family


def _families() -> dict[str, ModelFamily]:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for module in BUILTIN_FAMILY_MODULES:
            importlib.import_module(module)
    return _FAMILIES


def family_for(architecture: str | None) -> ModelFamily:
    families = _families()
    check(architecture in families, f"unsupported architecture {architecture!r}: weavelm runs "
                                    f"{', '.join(families)}")
    return families[architecture]


def family_for_gguf(gguf_architecture: str | None, experts: bool = False) -> ModelFamily:
    """The family a GGUF file's `general.architecture` loads as (the first registered), with
    experts or without (`{arch}.expert_count` > 0: llama.cpp writes Mixtral as "llama")."""
    families = [f for f in _families().values() if f.gguf_architecture is not None]
    for family in families:
        if family.gguf_architecture == gguf_architecture and family.gguf_moe == experts:
            return family
    names = sorted({f.gguf_architecture for f in families})
    check(gguf_architecture not in names,
          f"GGUF architecture {gguf_architecture!r} {'with' if experts else 'without'} experts "
          f"is not supported")
    check(False, f"GGUF architecture {gguf_architecture!r} is not supported: use one of "
                 f"{', '.join(names)}")


def _compiled(packed: dict[str, tuple[str, Any]]):
    key = tuple(packed.items())
    if key not in _PATTERNS:
        _PATTERNS[key] = [
            (re.compile(r"\." + re.escape(ckpt).replace(r"\*", r"(?P<index>\d+)") + r"\."), rule)
            for ckpt, rule in packed.items()]
    return _PATTERNS[key]


_PATTERNS: dict[tuple, list] = {}
