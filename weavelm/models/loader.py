"""Find a model's files and stream its weights into each rank's shard.

A model is named by a local Hugging Face directory, a Hugging Face repo id (resolved through the
huggingface_hub cache; offline when cached), a `.gguf` file, or nothing (the default model).
Weights stream one tensor at a time; each parameter's `weight_loader` reads only its rank's
slice (safetensors slices are read lazily), so no rank ever holds the full model.
Pickle checkpoints (`*.bin`, `*.pt`) load only with `allow_pickle=True`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from weavelm.errors import WeavelmError, check
from weavelm.parallel.layers import default_weight_loader

HF_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass
class ModelSource:
    kind: str                       # "hf" (safetensors), "pickle" or "gguf"
    path: Path                      # model directory, or the .gguf file
    config: dict
    weight_files: list[Path] = field(default_factory=list)
    num_tensors: int | None = None  # for the progress bar

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> str:
        """Where the config came from, for error messages."""
        return str(self.path if self.kind == "gguf" else self.path / "config.json")


def _read_config(directory: Path) -> dict:
    cfg_path = directory / "config.json"
    check(cfg_path.is_file(), f"no config.json in {directory}: point MODEL at a Hugging Face "
                              f"model directory, a repo id or a .gguf file")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise WeavelmError(f"{cfg_path} is not valid JSON ({e.msg}, line {e.lineno}): "
                           f"re-download the model") from None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise WeavelmError(f"{index} is not valid JSON ({e.msg}, line {e.lineno}): "
                               f"re-download the model") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        check(isinstance(weight_map, dict) and weight_map,
              f"{index} has no weight_map (tensor name -> file): re-download the model")
        root = directory.resolve()
        for name in set(weight_map.values()):
            target = (directory / str(name)).resolve()
            check(target.parent == root,
                  f"{index} points tensor files outside the model directory ({name}): refused; "
                  f"shard files must sit beside the index")
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        check(not missing, f"missing checkpoint shard {', '.join(missing)} listed in "
                           f"{index.name}: download the complete model")
        return files
    return sorted(directory.glob("*.safetensors"))


def _check_safetensors(f: Path) -> int:
    """Read the header only (cheap): catch corrupt or truncated files before any rank starts.
    Returns the number of tensors in the file."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(f, framework="pt") as handle:
            return len(handle.keys())
    except (SafetensorError, OSError) as e:
        raise WeavelmError(f"corrupt or truncated safetensors file {f.name} ({e}): "
                           f"re-download it") from None


def _resolve_repo_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HF_FILE_PATTERNS,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        if offline:
            raise WeavelmError(f"model {repo_id!r} is not in the Hugging Face cache and "
                               f"HF_HUB_OFFLINE is set: download it first, or unset "
                               f"HF_HUB_OFFLINE") from None
    except Exception as e:                              # noqa: BLE001 - bad id, etc.
        if "Repo id must" in str(e) or "repo_id" in str(e):
            raise WeavelmError(f"{repo_id!r} is neither a local path nor a valid Hugging Face "
                               f"repo id: check the model name") from None
    from weavelm.models.hub import download
    return download(repo_id, HF_FILE_PATTERNS)         # bounded: names the host on a stall


def resolve_model(model: str | os.PathLike | None, allow_pickle: bool = False) -> ModelSource:
    """Locate config and weights for `model` and check that they can be loaded."""
    if model is None:
        from weavelm.models.gguf import default_model_path
        model = default_model_path()
    text = str(model)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        check(path.is_file(), f"GGUF file {text} does not exist: check the path")
        from weavelm.models.gguf import gguf_config, read_header
        config = gguf_config(path)
        return ModelSource("gguf", path, config, [path], len(read_header(path).tensors))
    if not path.exists():
        looks_like_path = text.startswith((".", "/", "~")) or text.count("/") != 1
        check(not looks_like_path, f"model path {text} does not exist: check the path, or give "
                                   f"a Hugging Face repo id like org/name")
        path = _resolve_repo_id(text)
    check(path.is_dir(), f"{text} is not a model directory or .gguf file: check the path")
    config = _read_config(path)
    files = _safetensors_files(path)
    if files:
        count = sum(_check_safetensors(f) for f in files)
        return ModelSource("hf", path, config, files, count)
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")) + list(path.glob("*.pth")))
    check(bool(pickles), f"no weights (*.safetensors) in {path}: download the model's "
                         f"safetensors files")
    check(allow_pickle, f"{path} holds only pickle checkpoints ({pickles[0].name}), which can run "
                        f"arbitrary code: convert them to safetensors, or pass --allow-pickle if "
                        f"you trust the source")
    return ModelSource("pickle", path, config, pickles)


def iter_checkpoint(source: ModelSource, skip=None) -> Iterator[tuple[str, object]]:
    """(name, tensor or lazy safetensors slice) for every tensor in the checkpoint; a GGUF's
    named by `skip(name)` are left out undecoded (safetensors slices cost nothing unread)."""
    if source.kind == "gguf":
        from weavelm.models.gguf import iter_gguf_tensors
        yield from iter_gguf_tensors(source.path, skip=skip)
        return
    if source.kind == "pickle":
        for f in source.weight_files:
            yield from _load_pickle(f).items()
        return
    from safetensors import SafetensorError, safe_open
    for f in source.weight_files:
        try:
            handle = safe_open(f, framework="pt")
        except SafetensorError as e:
            raise WeavelmError(f"corrupt or truncated safetensors file {f.name} ({e}): "
                               f"re-download it") from None
        for name in handle.keys():
            yield name, handle.get_slice(name)


def _load_pickle(f: Path) -> dict:
    """A pickle checkpoint's tensors, with torch's weights-only unpickler (no code runs).
    The zip format of torch.save (torch >= 1.6) is memory-mapped; the legacy format (before 1.6,
    or `_use_new_zipfile_serialization=False`) cannot be, and is read whole."""
    import pickle
    import re
    import warnings
    import zipfile
    zipped = zipfile.is_zipfile(f)
    try:
        with warnings.catch_warnings():             # torch warns about pickle protocols
            warnings.simplefilter("ignore")
            state = torch.load(f, map_location="cpu", mmap=zipped, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: paragraphs about weights_only around the reason; keep the reason.
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it names {named.group(1)}" if named else \
            (re.findall(r"Unsupported [^.\n]*", str(e)) or [type(e).__name__])[0][:120]
        raise WeavelmError(f"pickle checkpoint {f.name} holds more than tensors, which weavelm "
                           f"never unpickles ({reason}): convert it to safetensors where you "
                           f"trust it") from None
    except Exception as e:                          # noqa: BLE001 - not a torch.save file at all
        raise WeavelmError(f"could not read pickle checkpoint {f.name} ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]}): weavelm reads torch.save files "
                           f"(zip or legacy format) holding a dict of tensors; convert it to "
                           f"safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]                 # a training checkpoint's weights
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:1] \
        if isinstance(state, dict) else None
    check(isinstance(state, dict) and not bad,
          f"pickle checkpoint {f.name} is not a dict of tensor names to tensors "
          f"({type(state).__name__}{f', {bad[0]!r} is not a tensor' if bad else ''}): save "
          f"model.state_dict(), or convert it to safetensors")
    return state


def load_weights(model: nn.Module, source, progress: bool = False,
                 packed_modules: dict | None = None) -> None:
    """Stream a checkpoint into `model`'s shards; fail on any missing or unexpected tensor.

    `source` is a `ModelSource`, a path or repo id (`resolve_model`), or any iterable of
    (Hugging Face name, tensor) pairs (e.g. a transformers model's `state_dict().items()`).
    Checkpoint names map to parameters through a packed-module table: `packed_modules`, else
    the model family's (`ModelFamily.packed_modules`, for a model with a registered
    `config.architecture`), else none (every name is a parameter name). A packed parameter is
    complete when every id in its `shard_ids` has arrived. Any TP-built model loads this way,
    a model of one's own too: each parameter's `weight_loader` takes its rank's slice.
    """
    from weavelm.models.registry import family_for, map_checkpoint_name
    config = getattr(model, "config", None)
    if packed_modules is None:
        packed_modules = family_for(config.architecture).packed_modules \
            if getattr(config, "architecture", None) else {}
    if isinstance(source, (str, os.PathLike)):
        source = resolve_model(source)
    params = dict(model.named_parameters(remove_duplicate=False))
    # a pipeline stage skips the tensors of the modules other stages hold, unread
    elsewhere = tuple(getattr(model, "missing_prefixes", lambda: [])())
    tied = getattr(config, "tie_word_embeddings", False)
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    shards: dict[str, set] = {}           # parameter name -> shard ids loaded into it
    unexpected: list[str] = []
    if isinstance(source, ModelSource):
        skip = (lambda name: name.startswith(elsewhere)) if elsewhere else None
        items, desc, total = iter_checkpoint(source, skip), f"loading {source.name}", \
            source.num_tensors
    else:
        items, desc, total = iter(source), "loading weights", None
    if progress:
        from tqdm.auto import tqdm
        # disable=None: a bar on terminals, silence in logs and pipes.
        items = tqdm(items, desc=desc, total=total, unit=" tensors", leave=False, disable=None)
    for name, tensor in items:
        if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = map_checkpoint_name(name, packed_modules)
        if elsewhere and target.startswith(elsewhere):
            continue
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        try:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
        except ValueError as e:
            raise WeavelmError(f"checkpoint tensor {name} does not fit the model ({e}): "
                               f"config.json and weights disagree") from None
        except Exception as e:                          # noqa: BLE001 - I/O on a damaged file
            raise WeavelmError(f"could not read checkpoint tensor {name} ({e}): the checkpoint "
                               f"is damaged, re-download it") from None
        shards.setdefault(target, set()).add(shard_id)
    check(not unexpected, f"checkpoint has {len(unexpected)} tensors this model does not use "
                          f"(e.g. {unexpected[0] if unexpected else ''}): wrong config.json?")
    missing = sorted(n for n in expected
                     if n not in shards
                     or shards[n] != set(getattr(params[n], "shard_ids", (None,))))
    check(not missing, f"checkpoint is missing {len(missing)} tensors (e.g. "
                       f"{missing[0] if missing else ''}): incomplete download or wrong "
                       f"config.json")
    check_finite(model)
    for module in model.modules():     # e.g. FP8 block scales -> the layer's per-row scales
        finish = getattr(module, "process_weights_after_loading", None)
        if finish is not None:
            finish()


def check_finite(model: nn.Module) -> None:
    """Refuse weights holding NaN or inf (a damaged or overflowed checkpoint): they would give
    silently wrong tokens, greedy or sampled. One pass over the weights, one host sync."""
    named = [(n, p) for n, p in model.named_parameters()
             if p.is_floating_point() and p.element_size() > 1]   # fp8: no isfinite in torch
    if not named:
        return
    flags = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
    bad = [n for (n, _), ok in zip(named, flags) if not ok]
    check(not bad, f"weight {bad[0] if bad else ''} holds NaN or inf values"
                   f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: the checkpoint is "
                   f"damaged or overflowed its dtype; re-download or re-export it")
