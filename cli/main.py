"""`weavelm`: a thin typed shell over the Python API.

    weavelm generate [MODEL] -p PROMPT [--tp N] [--chat] ...
    weavelm env

User errors print one line (`error: ...`) and exit with status 2. So does a rank that a launcher
(torchrun) started when a peer rank goes away or stops answering (one line per host: its first
rank's).
"""
from __future__ import annotations

import functools
from typing import Optional

import typer

from . import options

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="Tensor-parallel LLM inference that hides all-reduce behind compute.")

DEFAULT_PROMPT = "What is the capital of France?"


def user_errors(fn):
    """Turn WeavelmError (and Ctrl-C, SIGTERM) into one line on stderr instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from weavelm.errors import Terminated, WeavelmError
        try:
            return fn(*args, **kwargs)
        except WeavelmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except Terminated:
            typer.echo("terminated (SIGTERM): all ranks stopped", err=True)
            raise typer.Exit(143)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except Exception as e:
            _launched_peer_failure(e)
            raise
    return wrapper


PEER_REPORT_GRACE_S = 5.0   # how long a launcher's other ranks leave the first one to report


def _launched_peer_failure(e: Exception) -> None:
    """Under a launcher (WORLD_SIZE set) a collective that failed because a peer went away or
    timed out ends this rank with one line instead of a traceback; of a host's ranks only the
    first (LOCAL_RANK 0) prints it, the others' lines would repeat it. They wait a little before
    leaving: the launcher stops a host's ranks once one exits, and the first one may still be
    shutting down (rank 0's HTTP server). Returns if `e` is not such a failure."""
    import os
    if "WORLD_SIZE" not in os.environ:
        return                          # spawned ranks report to `launch.spawn`, which names one
    from weavelm.parallel.launch import peer_failure
    line = peer_failure(e)
    if line is None:
        return
    if os.environ.get("LOCAL_RANK", "0") == "0":
        typer.echo(f"error: rank {os.environ.get('RANK', '?')}: a collective failed ({line}): a "
                   f"peer rank went away or stopped answering, so this host's ranks stop; if it "
                   f"was only slow, raise --collective-timeout (or WEAVELM_COLLECTIVE_TIMEOUT)",
                   err=True)
    else:
        import time
        time.sleep(PEER_REPORT_GRACE_S)
    raise typer.Exit(2)


@app.command()
@user_errors
def generate(
    model: options.ModelArg = None,
    prompt: list[str] = typer.Option([DEFAULT_PROMPT], "--prompt", "-p",
                                     help="Prompt; repeat for a batch."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (ranks started here "
                                           "unless a launcher already did)."),
    pp: options.Pp = 1,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat",
                                        help="Apply the chat template [default: if the model "
                                             "has one]."),
    device: options.Device = None,
    dtype: options.Dtype = None,
    max_model_len: options.MaxModelLen = None,
    allow_pickle: options.AllowPickle = False,
    backend: options.Backend = None,
    gpu_memory_utilization: options.GpuMemoryUtilization = 0.9,
    max_num_seqs: options.MaxNumSeqs = 256,
    max_num_batched_tokens: options.MaxNumBatchedTokens = 8192,
    enforce_eager: options.EnforceEager = False,
    enable_prefix_caching: options.PrefixCaching = True,
    quantization: options.Quantization = None,
    kv_cache_dtype: options.KvCacheDtype = "auto",
    mode: options.Mode = "auto",
    collective_timeout: Optional[float] = typer.Option(None, "--collective-timeout", help=(
        "Seconds a rank waits for peers [default: $WEAVELM_COLLECTIVE_TIMEOUT or 30 CPU/300 GPU].")),
):
    """Generate text, streaming tokens as they come."""
    from weavelm.engine.config import check_prompt
    from weavelm.engine.model_loading import resolve_dtype
    from weavelm.engine.sampler import SamplingParams
    from weavelm.errors import check
    from weavelm.models.config import ModelConfig
    from weavelm.models.loader import resolve_model
    from weavelm.parallel.state import collective_timeout as timeout_of

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed)   # checked before ranks start
    options.check_model_arg(model)
    dev = options.check_tp(tp, device, pp)
    timeout_of(dev.type, collective_timeout)          # checks $WEAVELM_COLLECTIVE_TIMEOUT too
    options.check_mode(mode)
    if chat is not False:               # the template's renderer imports while the model resolves
        from weavelm.models.chat_template import warm_up
        warm_up()
    source = resolve_model(model, allow_pickle=allow_pickle)
    model_config = ModelConfig.from_hf(source.config, source.config_file)
    config = options.engine_config(
        model_config, model=str(source.path), tp=tp, pp=pp, device=str(dev), dtype=dtype,
        max_model_len=max_model_len, allow_pickle=allow_pickle, backend=backend, mode=mode,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
        enable_prefix_caching=enable_prefix_caching, quantization=quantization,
        kv_cache_dtype=kv_cache_dtype, collective_timeout=collective_timeout)
    # Tokenize here, before any rank starts or loads weights, so a bad prompt fails fast.
    from weavelm.models.tokenizer import apply_chat, encode, load_tokenizer
    tokenizer = load_tokenizer(source.path)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    token_lists = []
    for p in prompt:
        ids = apply_chat(tokenizer, p) if chat else encode(tokenizer, p)
        check(len(ids) > 0, "the prompt is empty: give some text with -p")
        check_prompt(len(ids), config.max_model_len)
        token_lists.append(ids)
    from weavelm.parallel.launch import usable_cores
    cores = usable_cores()
    layout = f"TP {tp}" + (f" x PP {pp}" if pp > 1 else "")
    if dev.type == "cpu" and tp * pp > cores:
        typer.echo(f"warning: {tp * pp} CPU ranks share {cores} cores; each rank gets one thread "
                   f"and {layout} will run slower than fewer ranks here", err=True)
    from weavelm.engine.memory import estimate
    from weavelm.engine.model_runner import CPU_KV_BYTES
    step = max_num_batched_tokens if dev.type == "cuda" else \
        min(max_num_batched_tokens, sum(map(len, token_lists)))
    width = resolve_dtype(dtype, dev).itemsize
    options.check_memory(estimate(model_config, tp, width, step,
                                  step + max_new_tokens * len(token_lists),
                                  kv_cap=None if dev.type == "cuda" else CPU_KV_BYTES),
                         tp, pp, str(dev), f"{source.name} ({width}-byte weights, {layout})",
                         budget=gpu_memory_utilization if dev.type == "cuda" else 1.0)
    from weavelm.parallel.launch import run_ranks

    from .generate_cmd import generate_rank
    run_ranks(generate_rank, tp * pp, dict(config=config, params=params,
                                           token_lists=token_lists, prompts=list(prompt)))


@app.command()
@user_errors
def env():
    """Report devices, NVLink peers, runnable communicator backends and multicast policy."""
    import torch

    from weavelm.parallel.backends import available_backends, fused_choice
    from weavelm.parallel.multicast_guard import multicast_allowed
    typer.echo(f"torch {torch.__version__}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    typer.echo(f"CUDA devices: {n}")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        peers = [j for j in range(n) if j != i and torch.cuda.can_device_access_peer(i, j)]
        typer.echo(f"  cuda:{i} {p.name}, {p.multi_processor_count} SMs, "
                   f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                   f"peer access to {peers or 'none'}")
    allowed, reason = multicast_allowed(0 if n else None)
    typer.echo(f"multicast: {'allowed' if allowed else 'not allowed'} ({reason})")
    peers = n >= 2 and all(torch.cuda.can_device_access_peer(i, j)
                           for i in range(n) for j in range(n) if i != j)
    usable = {"torch": "here (NCCL on GPUs, gloo on CPU)",
              "p2p": "here" if peers else "not here: needs 2 or more GPUs with peer access",
              "multimem": "here" if peers and allowed else
                          "not here: needs multicast allowed and GPUs with peer access"}
    typer.echo("communicator backends (auto picks the first usable of multimem, p2p, torch):")
    for name in available_backends()[:-1]:
        typer.echo(f"  {name}: {usable[name]}")
    if n >= 2:
        transport, why = fused_choice(0, n)
    else:
        transport, why = "none", "fewer than 2 GPUs: collectives go through torch"
    typer.echo(f"fused transport: {transport} ({why})")
    typer.echo("CPU ranks: gloo (any --tp on --device cpu)")


bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Benchmarks measured in one run.")
app.add_typer(bench_app, name="bench")


@app.command()
@user_errors
def tune(
    shape: str = typer.Option("llama3-70b", help="Model shape (random weights)."),
    layers: int = typer.Option(4, help="Decoder layers to build for timing."),
    tp: int = typer.Option(1, "--tp"),
    tokens: str = typer.Option("1k,2k,4k,8k,16k", help="Token buckets to tune."),
    backend: str = typer.Option("auto"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
):
    """Measure a few split points per token bucket on this machine and cache the best ones."""
    import torch

    from weavelm.bench.shapes import shape_config
    from weavelm.bench.tune import tune_rank
    from weavelm.errors import check
    from weavelm.models.config import ModelConfig
    from weavelm.parallel.launch import run_ranks
    ModelConfig.from_hf(shape_config(shape, layers)).check_tp(tp)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check(n >= 1, "weavelm tune times GPU kernels: run it on a machine with CUDA GPUs")
    check(tp <= n, f"--tp {tp} needs {tp} GPUs but {n} are visible: lower --tp")
    check(seq_len is None or seq_len >= 1, f"--seq-len must be at least 1, got {seq_len}")
    opts = dict(shape=shape, layers=layers, tp=tp, tokens=options.int_list(tokens, "--tokens"),
                backend=backend, seq_len=seq_len, device="cuda")
    result = run_ranks(tune_rank, tp, opts)
    if result is not None:
        import json
        typer.echo(json.dumps(result["table"], indent=1))
        typer.echo(f"saved to {result['path']}")


from .bench_cmd import register as register_bench  # noqa: E402 - `bench prefill|throughput`
from .serve_cmd import register  # noqa: E402 - registers `serve` and `bench serve`
register_bench(bench_app, user_errors)
register(app, bench_app, user_errors)


def main():
    app()


if __name__ == "__main__":
    main()
