"""weavelm: tensor-parallel LLM inference that hides all-reduce behind compute (TokenWeave)."""
from weavelm.errors import WeavelmError

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import weavelm` stays cheap (the CLI answers --help without importing torch).
    if name in ("LLM", "Completion"):
        from weavelm.engine import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from weavelm.engine.sampler import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'weavelm' has no attribute {name!r}")


__all__ = ["LLM", "Completion", "SamplingParams", "WeavelmError", "__version__"]
