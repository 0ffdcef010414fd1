"""`weavelm serve` (an OpenAI-compatible HTTP server) and `weavelm bench serve` (a load generator
against one), registered on the app by `register`."""
from __future__ import annotations

import math
import os
import signal
from typing import Optional

import typer

from . import options

SHAPES_HELP = "llama3-8b, llama3-70b, qwen2.5-72b, mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b"


def serve(
    model: options.ModelArg = None,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every one)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree (rank 0 serves HTTP)."),
    pp: options.Pp = 1,
    shape: Optional[str] = typer.Option(None, help=f"Serve random weights of a model shape "
                                                   f"instead ({SHAPES_HELP}); prompts must "
                                                   f"then be token ids."),
    layers: Optional[int] = typer.Option(None, help="With --shape: decoder layers to build."),
    seed: int = typer.Option(0, help="With --shape: the weights' seed."),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="With --shape: a tokenizer directory whose vocabulary fits "
                                  "the shape's (text prompts, structured output)."),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", help="The name clients pass as `model` [default: the "
                                          "MODEL argument, the shape, or the default model's]."),
    device: options.Device = None,
    dtype: options.Dtype = None,
    max_model_len: options.MaxModelLen = None,
    allow_pickle: options.AllowPickle = False,
    backend: options.Backend = None,
    mode: options.Mode = "auto",
    gpu_memory_utilization: options.GpuMemoryUtilization = 0.9,
    max_num_seqs: options.MaxNumSeqs = 256,
    max_num_batched_tokens: options.MaxNumBatchedTokens = 8192,
    enforce_eager: options.EnforceEager = False,
    enable_prefix_caching: options.PrefixCaching = True,
    quantization: options.Quantization = None,
    kv_cache_dtype: options.KvCacheDtype = "auto",
    num_kv_blocks: Optional[int] = typer.Option(None, "--num-kv-blocks",
                                                help="Fix the KV cache's size in blocks."),
    shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout",
                                           help="Seconds running requests get to finish after "
                                                "SIGINT/SIGTERM before they are cancelled."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every HTTP request."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="WEAVELM_API_KEY", show_envvar=False,
        help="Clients must send 'Authorization: Bearer KEY' (/health and /metrics stay open); "
             "prefer $WEAVELM_API_KEY, which other users of the machine cannot read in ps."),
    tool_call_parser: Optional[str] = typer.Option(
        None, "--tool-call-parser", help="How to find tool calls in a reply for tool_choice "
                                         "'auto': hermes or llama3_json (vLLM's names)."),
    chat_template: Optional[str] = typer.Option(
        None, "--chat-template", help="A jinja chat template file to use instead of the "
                                      "model's."),
    header_timeout: float = typer.Option(10.0, "--header-timeout",
                                         help="Seconds a connection has to send its request "
                                              "line and headers before it is closed."),
    parse_special_tokens: bool = typer.Option(
        False, "--parse-special-tokens-in-messages",
        help="Read special tokens written in chat messages as control tokens (vLLM's way); by "
             "default they are text, so no message can forge a turn or a role."),
):
    """Serve the model over the OpenAI HTTP API (completions, chat, models, health, metrics)."""
    from weavelm.errors import check
    from weavelm.models.config import ModelConfig

    check(0 < port < 65536, f"--port must be in 1..65535, got {port}")
    check(shutdown_timeout >= 0, f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    check(tool_call_parser in (None, "hermes", "llama3_json"),
          f"unknown --tool-call-parser {tool_call_parser!r}: choose hermes or llama3_json")
    check(header_timeout > 0 and math.isfinite(header_timeout),
          f"--header-timeout must be a positive number of seconds, got {header_timeout}")
    options.check_model_arg(model)
    dev = options.check_tp(tp, device, pp)
    if shape is not None:
        from weavelm.bench.shapes import shape_config
        check(model is None, "give either MODEL or --shape, not both")
        hf_config, name = shape_config(shape, layers), shape
        if tokenizer is not None:
            from weavelm.models.tokenizer import load_tokenizer
            size = len(load_tokenizer(tokenizer))
            check(size <= hf_config["vocab_size"],
                  f"--tokenizer {tokenizer} has {size} tokens, more than the {shape} shape's "
                  f"vocabulary of {hf_config['vocab_size']}: give one that fits")
    else:
        from weavelm.models.loader import resolve_model
        check(layers is None, "--layers goes with --shape: drop it")
        check(tokenizer is None, "--tokenizer goes with --shape (a model has its own): drop it")
        source = resolve_model(model, allow_pickle=allow_pickle)
        hf_config = source.config
        name = model or os.path.basename(str(source.path)).split(".")[0]   # SmolLM2-135M-Instruct
        model = str(source.path)
    options.check_mode(mode)
    config = options.engine_config(
        ModelConfig.from_hf(hf_config), model=model, tp=tp, pp=pp, device=str(dev), dtype=dtype,
        max_model_len=max_model_len, allow_pickle=allow_pickle, backend=backend, mode=mode,
        gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
        enable_prefix_caching=enable_prefix_caching, quantization=quantization,
        kv_cache_dtype=kv_cache_dtype, num_kv_blocks=num_kv_blocks)
    # only rank 0 listens: a launcher's other ranks on its host would find the port taken
    if os.environ.get("RANK", "0") == "0":
        _check_port(host, port)
    opts = dict(config=config, shape=shape, layers=layers, seed=seed, tokenizer=tokenizer,
                host=host, port=port,
                served_name=served_model_name or name, shutdown_timeout=shutdown_timeout,
                access_log=access_log, parse_special_tokens=parse_special_tokens,
                header_timeout=header_timeout, api_key=api_key or None,
                tool_parser=tool_call_parser,
                chat_template=_read_template(chat_template))
    from weavelm.parallel.launch import run_ranks
    try:
        from weavelm.serve.server import serve_rank
    except ModuleNotFoundError as e:
        from weavelm.errors import WeavelmError
        raise WeavelmError(f"weavelm serve needs the package '{e.name}', which is not installed: "
                           f"reinstall weavelm (pip install weavelm) or pip install {e.name}"
                           ) from None
    if tp * pp > 1 and "WORLD_SIZE" not in os.environ:
        _forward_signals(shutdown_timeout + 60)
    run_ranks(serve_rank, tp * pp, opts)


def _check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address that cannot be listened on, before any rank starts."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # as uvicorn binds: TIME_WAIT entries of an earlier run on this port do not block it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            from weavelm.errors import WeavelmError
            raise WeavelmError(f"cannot listen on {host}:{port} ({e.strerror}): pick another "
                               f"--port or --host") from None


def _read_template(path: str | None) -> str | None:
    """The text of a --chat-template file (checked here, before any rank starts)."""
    if path is None:
        return None
    from weavelm.errors import WeavelmError
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise WeavelmError(f"cannot read --chat-template {path} "
                           f"({getattr(e, 'strerror', None) or e}): give a UTF-8 jinja file"
                           ) from None
    try:
        import jinja2.sandbox
        jinja2.sandbox.ImmutableSandboxedEnvironment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise WeavelmError(f"--chat-template {path} is not valid jinja ({e.message}, line "
                           f"{e.lineno}): fix the template") from None
    return text


def _forward_signals(bound_s: float) -> None:
    """The ranks are this process's children: SIGINT/SIGTERM here asks rank 0 (the first one
    started) to shut down, and it stops the others; any rank still running `bound_s` later
    (one stuck in a collective, say) is killed."""
    import multiprocessing
    import threading

    def kill_all():
        for p in multiprocessing.active_children():
            p.kill()

    def forward(signum, frame):
        ranks = sorted(multiprocessing.active_children(), key=lambda p: p._identity)
        if not ranks:
            raise KeyboardInterrupt
        os.kill(ranks[0].pid, signal.SIGTERM)
        timer = threading.Timer(bound_s, kill_all)
        timer.daemon = True
        timer.start()
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)


def bench_serve(
    url: str = typer.Option("http://127.0.0.1:8000", help="The server's base URL."),
    model: Optional[str] = typer.Option(None, help="Model name [default: the server's]."),
    concurrency: int = typer.Option(64, help="Requests in flight at most."),
    request_rate: float = typer.Option(math.inf, "--request-rate",
                                       help="Arrivals per second (Poisson); inf = all at once."),
    shape: str = typer.Option("llama3-8b", help="Shape whose vocabulary the prompts' token "
                                                "ids come from (as `bench throughput`)."),
    vocab: Optional[int] = typer.Option(None, help="Token ids of the prompts below this "
                                                   "[default: the shape's vocabulary]."),
    num_requests: options.NumRequests = 1000,
    input_len: options.InputLen = None,
    output_len: options.OutputLen = None,
    input_max: options.InputMax = 8192,
    prefix_len: options.PrefixLen = 0,
    num_prefixes: options.NumPrefixes = 1,
    dataset_shape: options.DatasetShape = "synthetic",
    seed: int = typer.Option(0, help="Workload seed (the same workload as bench throughput)."),
    timeout: float = typer.Option(600.0, help="Seconds the whole run may take; requests still "
                                              "open then count as failed."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results here."),
    extra_body: Optional[str] = typer.Option(
        None, "--extra-body", help="JSON object merged into every request, e.g. "
                                   "'{\"logprobs\": 5}' or a guided_json schema."),
):
    """Load a running server with the synthetic workload of `bench throughput`; TTFT, TPOT,
    end-to-end latency and throughput."""
    from weavelm.bench.serve_load import format_result, run_load
    from weavelm.bench.shapes import shape_config
    from weavelm.errors import check
    check(concurrency >= 1, f"--concurrency must be at least 1, got {concurrency}")
    check(request_rate > 0, f"--request-rate must be > 0 (inf: all at once), got {request_rate}")
    work = options.workload(num_requests, input_len, output_len, input_max, prefix_len,
                            num_prefixes, dataset_shape)
    check(timeout > 0, f"--timeout must be > 0, got {timeout}")
    check(vocab is None or vocab >= 1, f"--vocab must be at least 1, got {vocab}")
    vocab = vocab or shape_config(shape)["vocab_size"]
    result = run_load(url.rstrip("/"), model, dict(
        work, vocab=vocab, seed=seed, extra=_extra_body(extra_body)),
        concurrency, request_rate, timeout)
    typer.echo(format_result(result))
    if json_out:
        import json
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
    check(result["failed"] == 0, f"{result['failed']} of {result['requests']} requests failed "
                                 f"(first: {result['first_error']}): see the server's log")


def _extra_body(text: str | None) -> dict:
    import json

    from weavelm.errors import WeavelmError
    if text is None:
        return {}
    try:
        body = json.loads(text)
    except ValueError as e:
        raise WeavelmError(f"--extra-body is not JSON ({e}): give an object like "
                           f"'{{\"logprobs\": 5}}'") from None
    if not isinstance(body, dict):
        raise WeavelmError("--extra-body must be a JSON object")
    return body


def register(app, bench_app, user_errors) -> None:
    app.command("serve")(user_errors(serve))
    bench_app.command("serve")(user_errors(bench_serve))
