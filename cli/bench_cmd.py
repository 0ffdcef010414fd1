"""`weavelm bench prefill` and `weavelm bench throughput` (registered on the bench app by
`register`; `bench serve` is in serve_cmd.py)."""
from __future__ import annotations

from typing import Optional

import typer

from . import options


def _check_plot(path: str | None) -> None:
    """Refuse --plot before the benchmark runs when matplotlib is missing."""
    import importlib.util

    from weavelm.errors import check
    check(path is None or importlib.util.find_spec("matplotlib") is not None,
          "--plot needs matplotlib: pip install 'weavelm[plot]' or drop --plot")


def _run_and_report(rank_fn, ranks: int, opts: dict, table_fn, plot_fn, plot,
                    json_out) -> None:
    """Run a benchmark on `ranks` ranks; rank 0 prints its table, keeps its numbers as JSON and
    draws its plot if asked."""
    from weavelm.parallel.launch import run_ranks
    result = run_ranks(rank_fn, ranks, opts)
    if result is None:
        return
    typer.echo(table_fn(result))
    if json_out:
        import json
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)
    if plot:
        plot_fn(result, plot)
        typer.echo(f"plot written to {plot}")


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
    from weavelm.parallel.state import max_tp_for_device, resolve_device
    mode_list = [parse_mode(m.strip()).value for m in modes.split(",") if m.strip()]
    token_list = options.int_list(tokens, "--tokens")
    dev = resolve_device(device)
    ModelConfig.from_hf(shape_config(shape, layers)).check_tp(tp)
    available = max_tp_for_device(device)
    check(tp <= available, f"--tp {tp} needs {tp} GPUs but {available} are visible: lower --tp")
    check(repeats >= 1, f"--repeats must be at least 1, got {repeats}")
    check(seq_len is None or seq_len >= 1, f"--seq-len must be at least 1, got {seq_len}")
    if ctas:
        check(max(options.int_list(ctas, "--ctas")) <= 128, f"--ctas must be 1..128, got {ctas}")
    check(carveout == "auto" or (carveout.isdigit() and int(carveout) < 128),
          f"--carveout must be 'auto' or a number of SMs below 128, got {carveout!r}")
    check(not graph or dev.type == "cuda", "--graph needs CUDA GPUs: drop it on CPU")
    if graph is None:
        graph = dev.type == "cuda"
    opts = dict(shape=shape, layers=layers, tp=tp, tokens=token_list, modes=mode_list,
                backend=backend if dev.type == "cuda" else "torch", seq_len=seq_len,
                repeats=repeats, device=str(dev),
                ctas=options.int_list(ctas, "--ctas") if ctas else None,
                carveout=carveout if carveout == "auto" else int(carveout), graph=graph,
                quantization=options.check_quantization(quantization))
    _check_plot(plot)
    from weavelm.engine.memory import check_fits, estimate
    T = max(token_list)
    check_fits(estimate(ModelConfig.from_hf(shape_config(shape, layers)), tp, 2, T), tp,
               str(dev), f"bench prefill of {shape} ({layers} layers, {T} tokens, TP {tp})",
               layers_flag="--layers", tokens_flag="--tokens")
    _run_and_report(bench_prefill_rank, tp, opts, format_table, plot_fn, plot, json_out)


def bench_throughput(
    shape: str = typer.Option("llama3-8b", help="Model shape (random weights): llama3-8b, "
                                                "llama3-70b, qwen2.5-72b, mixtral-8x7b, "
                                                "mixtral-8x22b, qwen3-30b-a3b."),
    layers: Optional[int] = typer.Option(None, help="Decoder layers to build [default: all]."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree."),
    pp: options.Pp = 1,
    mode: str = typer.Option("auto", help="Schedule: auto, baseline, fused or weave."),
    num_requests: options.NumRequests = 1000,
    input_len: options.InputLen = None,
    output_len: options.OutputLen = None,
    input_max: options.InputMax = 8192,
    prefix_len: options.PrefixLen = 0,
    num_prefixes: options.NumPrefixes = 1,
    dataset_shape: options.DatasetShape = "synthetic",
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
    dev = options.check_tp(tp, device, pp)
    cfg = ModelConfig.from_hf(shape_config(shape, layers))
    cfg.check_tp(tp)
    check(pp <= cfg.num_layers, f"--pp {pp} needs at least {pp} decoder layers, the shape "
                                f"has {cfg.num_layers}: lower --pp or raise --layers")
    if mode != "auto":
        parse_mode(mode)
    work = options.workload(num_requests, input_len, output_len, input_max, prefix_len,
                            num_prefixes, dataset_shape)
    check(compare in (None, "hf"), f"--compare takes hf, got {compare!r}")
    check(compare is None or tp * pp == 1,
          "--compare hf runs transformers on one device: use --tp 1 --pp 1")
    config = EngineConfig(tp=tp, pp=pp, device=str(dev), mode=mode,
                          backend=backend if dev.type == "cuda" else "torch",
                          gpu_memory_utilization=gpu_memory_utilization,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=enable_prefix_caching,
                          quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    opts = dict(shape=shape, layers=layers, config=config, seed=seed, compare=compare, **work)
    _check_plot(plot)
    from weavelm.engine.memory import estimate
    from weavelm.engine.model_loading import resolve_dtype
    from weavelm.engine.model_runner import CPU_KV_BYTES
    layout = f"TP {tp}" + (f" x PP {pp}" if pp > 1 else "")
    options.check_memory(estimate(cfg, tp, resolve_dtype(None, dev).itemsize,
                                  max_num_batched_tokens,
                                  kv_cap=None if dev.type == "cuda" else CPU_KV_BYTES),
                         tp, pp, str(dev),
                         f"bench throughput of {shape} ({cfg.num_layers} layers, {layout})",
                         budget=gpu_memory_utilization if dev.type == "cuda" else 1.0,
                         layers_flag="--layers")
    _run_and_report(throughput_rank, tp * pp, opts, format_result, plot_fn, plot, json_out)


def register(bench_app, user_errors) -> None:
    bench_app.command("prefill")(user_errors(bench_prefill))
    bench_app.command("throughput")(user_errors(bench_throughput))
