"""`weavelm`: a thin typed shell over the Python API.

    weavelm generate [MODEL] -p PROMPT [--tp N] [--chat] ...
    weavelm env

User errors print one line (`error: ...`) and exit with status 2.
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
    return wrapper


@app.command()
@user_errors
def generate(
    model: options.ModelArg = None,
    prompt: list[str] = typer.Option([DEFAULT_PROMPT], "--prompt", "-p",
                                     help="Prompt; repeat for a batch."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (ranks started here "
                                           "unless a launcher already did)."),
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
    dev = options.check_tp(tp, device)
    timeout_of(dev.type, collective_timeout)          # checks $WEAVELM_COLLECTIVE_TIMEOUT too
    options.check_mode(mode)
    if chat is not False:               # the template's renderer imports while the model resolves
        from weavelm.models.chat_template import warm_up
        warm_up()
    source = resolve_model(model, allow_pickle=allow_pickle)
    model_config = ModelConfig.from_hf(source.config, source.config_file)
    config = options.engine_config(
        model_config, model=str(source.path), tp=tp, device=str(dev), dtype=dtype,
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
    if dev.type == "cpu" and tp > cores:
        typer.echo(f"warning: {tp} CPU ranks share {cores} cores; each rank gets one thread and "
                   f"TP {tp} will run slower than a smaller TP here", err=True)
    from weavelm.engine.memory import check_fits, estimate
    from weavelm.engine.model_runner import CPU_KV_BYTES
    step = max_num_batched_tokens if dev.type == "cuda" else \
        min(max_num_batched_tokens, sum(map(len, token_lists)))
    width = resolve_dtype(dtype, dev).itemsize
    check_fits(estimate(model_config, tp, width, step, step + max_new_tokens * len(token_lists),
                        kv_cap=None if dev.type == "cuda" else CPU_KV_BYTES), tp,
               str(dev), f"{source.name} ({width}-byte weights, TP {tp})",
               budget=gpu_memory_utilization if dev.type == "cuda" else 1.0)
    from weavelm.parallel.launch import run_ranks

    from .generate_cmd import generate_rank
    run_ranks(generate_rank, tp, dict(config=config, params=params, token_lists=token_lists,
                                      prompts=list(prompt)))


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


def _int_list(text: str, what: str) -> list[int]:
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


def _check_plot(path: str | None) -> None:
    """Refuse --plot before the benchmark runs when matplotlib is missing."""
    import importlib.util

    from weavelm.errors import check
    check(path is None or importlib.util.find_spec("matplotlib") is not None,
          "--plot needs matplotlib: pip install 'weavelm[plot]' or drop --plot")


def _report(table: str, result: dict, json_out: str | None) -> None:
    """Print a benchmark's table (rank 0) and keep its numbers as JSON if asked."""
    typer.echo(table)
    if json_out:
        import json
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)


@bench_app.command("prefill")
@user_errors
def bench_prefill(
    shape: str = typer.Option("llama3-70b", help="Model shape: llama3-8b, llama3-70b, "
                                                 "qwen2.5-72b, mixtral-8x7b, mixtral-8x22b, "
                                                 "qwen3-30b-a3b (random weights; MoE routing "
                                                 "about uniform)."),
    layers: int = typer.Option(8, help="Decoder layers to build."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree."),
    tokens: str = typer.Option("1k,2k,4k,8k,16k", help="Prefill token counts."),
    modes: str = typer.Option("baseline,fused,weave,nocomm", help="Schedules to time."),
    backend: str = typer.Option("auto", help="Communicator for fused/weave: auto, p2p, "
                                             "multimem, torch."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Split the tokens into "
                                                               "sequences of this length."),
    repeats: int = typer.Option(5, help="Timed repeats (median)."),
    ctas: Optional[str] = typer.Option(None, help="CTAs of the fused kernel in the weave; a "
                                                  "list (8,16,32) times each, keeps the best."),
    carveout: str = typer.Option("auto", help="SMs the weave's GEMMs leave to the fused kernel: "
                                              "auto (one per CTA) or a number (0: none)."),
    graph: Optional[bool] = typer.Option(None, "--graph/--eager", help="Time CUDA-graph "
                                         "replays of each prefill (no host launch cost: the "
                                         "default on GPUs) or eager calls (the only way on CPU)."),
    device: Optional[str] = typer.Option(None, help="cuda (default if present) or cpu."),
    quantization: options.Quantization = None,
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results here."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG plot here (needs matplotlib)."),
):
    """Prefill latency per schedule (baseline, fused, weave, nocomm), side by side."""
    from weavelm.bench.prefill import bench_prefill_rank, format_table, plot as plot_fn
    from weavelm.bench.shapes import shape_config
    from weavelm.weave.executor import parse_mode
    from weavelm.errors import check
    from weavelm.models.config import ModelConfig
    from weavelm.parallel.launch import run_ranks
    from weavelm.parallel.state import max_tp_for_device, resolve_device
    mode_list = [parse_mode(m.strip()).value for m in modes.split(",") if m.strip()]
    token_list = _int_list(tokens, "--tokens")
    dev = resolve_device(device)
    ModelConfig.from_hf(shape_config(shape, layers)).check_tp(tp)
    available = max_tp_for_device(device)
    check(tp <= available, f"--tp {tp} needs {tp} GPUs but {available} are visible: lower --tp")
    check(repeats >= 1, f"--repeats must be at least 1, got {repeats}")
    check(seq_len is None or seq_len >= 1, f"--seq-len must be at least 1, got {seq_len}")
    if ctas:
        check(max(_int_list(ctas, "--ctas")) <= 128, f"--ctas must be 1..128, got {ctas}")
    check(carveout == "auto" or (carveout.isdigit() and int(carveout) < 128),
          f"--carveout must be 'auto' or a number of SMs below 128, got {carveout!r}")
    check(not graph or dev.type == "cuda", "--graph needs CUDA GPUs: drop it on CPU")
    if graph is None:
        graph = dev.type == "cuda"
    opts = dict(shape=shape, layers=layers, tp=tp, tokens=token_list, modes=mode_list,
                backend=backend if dev.type == "cuda" else "torch", seq_len=seq_len,
                repeats=repeats, device=str(dev), ctas=_int_list(ctas, "--ctas") if ctas else None,
                carveout=carveout if carveout == "auto" else int(carveout), graph=graph,
                quantization=options.check_quantization(quantization))
    _check_plot(plot)
    from weavelm.engine.memory import check_fits, estimate
    T = max(token_list)
    check_fits(estimate(ModelConfig.from_hf(shape_config(shape, layers)), tp, 2, T), tp,
               str(dev), f"bench prefill of {shape} ({layers} layers, {T} tokens, TP {tp})",
               layers_flag="--layers", tokens_flag="--tokens")
    result = run_ranks(bench_prefill_rank, tp, opts)
    if result is None:
        return
    _report(format_table(result), result, json_out)
    if plot:
        plot_fn(result, plot)
        typer.echo(f"plot written to {plot}")


@bench_app.command("throughput")
@user_errors
def bench_throughput(
    shape: str = typer.Option("llama3-8b", help="Model shape (random weights): llama3-8b, "
                                                "llama3-70b, qwen2.5-72b, mixtral-8x7b, "
                                                "mixtral-8x22b, qwen3-30b-a3b."),
    layers: Optional[int] = typer.Option(None, help="Decoder layers to build [default: all]."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree."),
    mode: str = typer.Option("auto", help="Schedule: auto, baseline, fused or weave."),
    num_requests: int = typer.Option(1000, "--num-requests", help="Requests in the workload."),
    input_len: Optional[int] = typer.Option(None, "--input-len", help="Fixed prompt length "
                                            "[default: log-normal, median 1024, max 8192]."),
    output_len: Optional[int] = typer.Option(None, "--output-len", help="Fixed output length "
                                             "[default: log-normal, median 128, max 512]."),
    input_max: int = typer.Option(8192, "--input-max", help="Cap of the prompt lengths."),
    prefix_len: int = typer.Option(0, "--prefix-len", help="Tokens of a shared prefix before "
                                                           "each prompt (0: none)."),
    num_prefixes: int = typer.Option(1, "--num-prefixes", help="Distinct shared prefixes, "
                                                               "taken in turn."),
    seed: int = typer.Option(0, help="Workload and weights seed."),
    enable_prefix_caching: options.PrefixCaching = True,
    quantization: options.Quantization = None,
    kv_cache_dtype: options.KvCacheDtype = "auto",
    max_num_seqs: options.MaxNumSeqs = 256,
    max_num_batched_tokens: options.MaxNumBatchedTokens = 8192,
    gpu_memory_utilization: options.GpuMemoryUtilization = 0.9,
    backend: str = typer.Option("auto", help="Communicator: auto, p2p, multimem, torch."),
    device: Optional[str] = typer.Option(None, help="cuda (default if present) or cpu."),
    compare: Optional[str] = typer.Option(None, help="hf: also time transformers on the same "
                                                     "requests (static batches of 16; TP 1)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results here."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG plot here (needs matplotlib)."),
):
    """Serve a seeded synthetic workload; throughput, TTFT/TPOT and the roofline bound."""
    from weavelm.bench.shapes import shape_config
    from weavelm.bench.throughput import format_result, plot as plot_fn, throughput_rank
    from weavelm.engine.config import EngineConfig
    from weavelm.weave.executor import parse_mode
    from weavelm.errors import check
    from weavelm.models.config import ModelConfig
    from weavelm.parallel.launch import run_ranks
    from weavelm.parallel.state import max_tp_for_device, resolve_device
    dev = resolve_device(device)
    ModelConfig.from_hf(shape_config(shape, layers)).check_tp(tp)
    check(tp <= max_tp_for_device(device), f"--tp {tp} needs {tp} GPUs: lower --tp")
    if mode != "auto":
        parse_mode(mode)
    check(num_requests >= 1, f"--num-requests must be at least 1, got {num_requests}")
    check(compare in (None, "hf"), f"--compare takes hf, got {compare!r}")
    check(compare is None or tp == 1, "--compare hf runs transformers on one device: use --tp 1")
    for name, v in (("--input-len", input_len), ("--output-len", output_len)):
        check(v is None or v >= 1, f"{name} must be at least 1, got {v}")
    config = EngineConfig(tp=tp, device=str(dev), mode=mode,
                          backend=backend if dev.type == "cuda" else "torch",
                          gpu_memory_utilization=gpu_memory_utilization,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=enable_prefix_caching,
                          quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    check(prefix_len >= 0 and num_prefixes >= 1, f"--prefix-len must be >= 0 and "
                                                  f"--num-prefixes >= 1, got {prefix_len}, "
                                                  f"{num_prefixes}")
    opts = dict(shape=shape, layers=layers, config=config, num_requests=num_requests,
                input_len=input_len, output_len=output_len, input_max=input_max, seed=seed,
                compare=compare, prefix_len=prefix_len, num_prefixes=num_prefixes)
    _check_plot(plot)
    from weavelm.engine.memory import check_fits, estimate
    from weavelm.engine.model_loading import resolve_dtype
    cfg = ModelConfig.from_hf(shape_config(shape, layers))
    from weavelm.engine.model_runner import CPU_KV_BYTES
    check_fits(estimate(cfg, tp, resolve_dtype(None, dev).itemsize, max_num_batched_tokens,
                        kv_cap=None if dev.type == "cuda" else CPU_KV_BYTES),
               tp, str(dev), f"bench throughput of {shape} ({cfg.num_layers} layers, TP {tp})",
               budget=gpu_memory_utilization if dev.type == "cuda" else 1.0,
               layers_flag="--layers")
    result = run_ranks(throughput_rank, tp, opts)
    if result is None:
        return
    _report(format_result(result), result, json_out)
    if plot:
        plot_fn(result, plot)
        typer.echo(f"plot written to {plot}")


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
    opts = dict(shape=shape, layers=layers, tp=tp, tokens=_int_list(tokens, "--tokens"),
                backend=backend, seq_len=seq_len, device="cuda")
    result = run_ranks(tune_rank, tp, opts)
    if result is not None:
        import json
        typer.echo(json.dumps(result["table"], indent=1))
        typer.echo(f"saved to {result['path']}")


from .serve_cmd import register  # noqa: E402 - registers `serve` and `bench serve`
register(app, bench_app, user_errors)


def main():
    app()


if __name__ == "__main__":
    main()
