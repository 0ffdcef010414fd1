"""Architecture name (config.json `architectures[0]`) -> model class, imported lazily."""
from __future__ import annotations

import importlib

from weavelm.errors import check

_REGISTRY = {
    "LlamaForCausalLM": ("weavelm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("weavelm.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("weavelm.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("weavelm.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return list(_REGISTRY)


def model_class(architecture: str):
    check(architecture in _REGISTRY, f"unsupported architecture {architecture!r}: weavelm runs "
                                     f"{', '.join(_REGISTRY)}")
    module, name = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), name)
