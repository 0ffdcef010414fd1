"""weavelm: tensor-parallel LLM inference that hides all-reduce behind compute (TokenWeave)."""
import os as _os

from weavelm.errors import WeavelmError

__version__ = "0.1.0"

# The CLI's source is the top-level cli/ (the product's layout). An install maps it to
# `weavelm.cli` (pyproject's package-dir); in a checkout this does the same, so the CLI is
# imported and run one way everywhere: `import weavelm.cli`, `python -m weavelm.cli.main`.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "cli", "main.py")) \
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)


def __getattr__(name):
    # Lazy: `import weavelm` stays cheap (the CLI answers --help without importing torch).
    if name in ("LLM", "Completion"):
        from weavelm.engine import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from weavelm.engine.sampler import SamplingParams
        return SamplingParams
    if name in ("WovenDecoderLayer", "WovenDecoder", "RMSNorm", "StepInput"):
        from weavelm.models import decoder
        return getattr(decoder, name)
    if name == "load_weights":
        from weavelm.models.loader import load_weights
        return load_weights
    if name == "EngineConfig":
        from weavelm.engine.config import EngineConfig
        return EngineConfig
    if name == "LLMEngine":
        from weavelm.engine.engine import LLMEngine
        return LLMEngine
    raise AttributeError(f"module 'weavelm' has no attribute {name!r}")


__all__ = ["LLM", "Completion", "SamplingParams", "EngineConfig", "LLMEngine", "WovenDecoderLayer",
           "WovenDecoder", "RMSNorm", "StepInput", "load_weights", "WeavelmError", "__version__"]
