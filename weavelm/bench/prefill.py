"""`weavelm bench prefill` and `weavelm tune`: prefill latency of a random-weight model of a real
shape, per schedule, all measured in one run on the same model and inputs.

Modes (`weavelm.weave.executor`): baseline (NCCL all-reduce + fused add/RMSNorm), fused and
weave (the fused communicator: `--backend p2p`, or `torch` to run the same schedule over
NCCL/gloo), nocomm (every all-reduce removed: wrong output, the bound). Ratios are against baseline and nocomm from
the same run. Every rank runs this; rank 0 prints.
"""
from __future__ import annotations

import statistics
import time
import zlib

import torch


def random_model(shape: str, layers: int, tp: int, device, dtype, seed: int = 0,
                 max_positions: int = 65536, quantization: str | None = None):
    """(ModelConfig, model) of a named shape with random weights, each rank its own shard
    (`quantization="fp8"`: FP8 linear layers, the same draws quantized)."""
    from weavelm.bench.shapes import shape_config
    from weavelm.models.config import ModelConfig
    from weavelm.models.registry import family_for
    from weavelm.parallel.fp8 import fp8_layers
    cfg = ModelConfig.from_hf(shape_config(shape, layers))
    cfg.check_tp(tp)
    with fp8_layers(quantization):
        model = family_for(cfg.architecture).model_class(cfg, dtype=dtype, device=device,
                                                         max_positions=max_positions)
    fill_random(model, seed)
    return cfg, model.eval()


def fill_random(model, seed: int = 0) -> None:
    """N(0, 0.02) weights, each rank drawing its own shard; norms 1 and other replicated
    weights (an MoE router: `replicated`) drawn alike on every rank."""
    from weavelm.parallel.state import get_state
    p0 = next(model.parameters())
    gen = torch.Generator(device=p0.device)
    rank = get_state().rank
    # FP8 weights are drawn in the model's dtype first: the same numbers as an unquantized model
    dtype = next(p.dtype for p in model.parameters() if p.element_size() > 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)                          # replicated: identical on every rank
            else:
                shard = 0 if getattr(p, "replicated", False) else rank
                gen.manual_seed(seed * 1000 + shard * 7919 + zlib.crc32(name.encode()))
                store = getattr(p, "store_rows", None)    # FP8: draw, then quantize
                if store is None:
                    p.normal_(0.0, 0.02, generator=gen)   # this rank's shard
                else:
                    store(0, torch.empty(p.shape, dtype=dtype, device=p.device)
                          .normal_(0.0, 0.02, generator=gen))


def _lengths(num_tokens: int, seq_len: int | None) -> list[int]:
    """`num_tokens` cut into sequences of `seq_len` (the last one shorter)."""
    seq_len = seq_len or num_tokens
    return [min(seq_len, num_tokens - start) for start in range(0, num_tokens, seq_len)]


class PrefillTimer:
    """One model, inputs per token count, and a timer for (mode, split) on one Executor."""

    def __init__(self, shape: str, layers: int, tp: int, backend: str, seq_len: int | None,
                 dtype=torch.bfloat16, quantization: str | None = None):
        from weavelm.weave.executor import Executor
        from weavelm.weave.splitter import Splitter
        from weavelm.parallel.backends import make_communicator
        from weavelm.parallel.state import get_state
        self.state = get_state()
        self.device = self.state.device
        self.cfg, self.model = random_model(shape, layers, tp, self.device, dtype,
                                            quantization=quantization)
        self.tp, self.seq_len, self.dtype = tp, seq_len, dtype
        self.executor = Executor(self.model, make_communicator(backend, self.state))
        self.schedule = self.executor.config        # weave CTAs and SM carveout
        self.backend = self.executor.comm.name
        self.splitter = Splitter(self.cfg, tp, min_tokens=0)
        self.last_host = None

    def _inputs(self, num_tokens):
        from weavelm.engine.block_manager import BLOCK_SIZE
        from weavelm.models.attention import prefill_batch
        from weavelm.models.decoder import StepInput
        lengths = _lengths(num_tokens, self.seq_len)
        batch, positions, num_blocks = prefill_batch(lengths, BLOCK_SIZE, self.device)
        g = torch.Generator().manual_seed(num_tokens)
        ids = torch.randint(0, self.cfg.vocab_size, (num_tokens,), generator=g).to(self.device)
        cache = self.model.make_kv_cache(num_blocks, BLOCK_SIZE)
        return ids, StepInput(positions, cache, batch)

    def forward(self, num_tokens, mode, split=None, inputs=None):
        ids, step = inputs or self._inputs(num_tokens)
        with torch.no_grad():
            return self.executor.run(ids, step, mode, split)

    def _capture(self, num_tokens, mode, split, inputs):
        """One prefill captured in a CUDA graph (every rank captures the same collectives)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):        # warm up on the capture stream (cuBLAS handles)
            self.forward(num_tokens, mode, split, inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.forward(num_tokens, mode, split, inputs)
        torch.cuda.synchronize()
        return graph

    def time(self, num_tokens, mode, split=None, warmup=2, repeats=5, graph=False) -> float:
        """Median seconds of one prefill (CUDA events on GPU, host clock on CPU). graph=True
        times replays of a CUDA graph of the prefill: no host launch cost. `self.last_host`
        keeps the median host time of the eager calls (launch cost: host-bound if close to
        the step time)."""
        import torch.distributed as dist
        inputs = self._inputs(num_tokens)
        for _ in range(warmup):
            self.forward(num_tokens, mode, split, inputs)
        run = lambda: self.forward(num_tokens, mode, split, inputs)  # noqa: E731
        captured = None
        if graph and self.device.type == "cuda":
            captured = self._capture(num_tokens, mode, split, inputs)
            run = captured.replay
        times, host = [], []
        for _ in range(repeats):
            if self.tp > 1:
                dist.barrier()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                t = time.perf_counter()
                run()
                host.append(time.perf_counter() - t)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
        del captured
        self.last_host = statistics.median(host) if host else None
        t = torch.tensor([statistics.median(times)], dtype=torch.float64)
        if self.tp > 1:                               # the slowest rank is the step time
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def split_for(self, num_tokens):
        return self.splitter.split(num_tokens, _lengths(num_tokens, self.seq_len))


def bench_prefill_rank(opts: dict) -> list[dict] | None:
    from weavelm.weave.executor import WEAVE_CTAS
    from weavelm.parallel.state import init_parallel
    state = init_parallel(opts["tp"], opts["device"])
    runner = PrefillTimer(opts["shape"], opts["layers"], opts["tp"], opts["backend"],
                          opts["seq_len"], quantization=opts.get("quantization"))
    ctas_list = opts.get("ctas") or [None]
    schedule = runner.schedule
    schedule.sm_carveout = opts.get("carveout", "auto")
    graph = opts.get("graph", False)
    rows = []
    for T in opts["tokens"]:
        split = runner.split_for(T)
        row = {"tokens": T, "split": split}
        for mode in opts["modes"]:
            # The weave is timed at each CTA count asked for; `weave` keeps the best.
            for c in (ctas_list if mode == "weave" else [None]):
                schedule.weave_ctas = c or WEAVE_CTAS
                # No per-rank OOM handling: a rank that skipped a mode would leave the others
                # waiting in a collective. An OOM ends the run on every rank.
                t = runner.time(T, mode, split if mode == "weave" else None,
                                repeats=opts["repeats"], graph=graph)
                if runner.last_host is not None:
                    row.setdefault("host", {})[mode if c is None else f"{mode}@{c}"] = \
                        runner.last_host
                if mode == "weave" and len(ctas_list) > 1:
                    row[f"weave@{c}"] = t
                    if t is not None and (row.get("weave") is None or t < row["weave"]):
                        row["weave"], row["weave_ctas"] = t, c
                else:
                    row[mode] = t
        schedule.weave_ctas = WEAVE_CTAS
        rows.append(row)
        if state.is_first and opts.get("verbose", True):
            print("  " + ", ".join(f"{k}={v * 1e3:.2f} ms" if isinstance(v, float) else
                                   f"{k}={v}" for k, v in row.items() if k != "host"),
                  flush=True)
    if state.is_first:
        meta = dict(shape=opts["shape"], layers=opts["layers"], tp=opts["tp"],
                    backend=runner.backend, device=torch.cuda.get_device_name()
                    if state.device.type == "cuda" else "cpu", seq_len=opts["seq_len"],
                    graph=graph, carveout=schedule.sm_carveout, moe=moe_note(runner.cfg))
        return {"meta": meta, "rows": rows}
    return None


def moe_note(cfg) -> str | None:
    """What a random-weight MoE shape routes: about T * top_k / E tokens per expert."""
    if not cfg.num_experts:
        return None
    return (f"MoE: {len(cfg.moe_layers)} of {cfg.num_layers} layers route each token to "
            f"{cfg.num_experts_per_tok} of {cfg.num_experts} experts; random router weights "
            f"route about uniformly (T*{cfg.num_experts_per_tok}/{cfg.num_experts} tokens per "
            f"expert), trained routers less evenly")


def format_table(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    modes = [m for m in ("baseline", "fused", "weave", "nocomm") if m in rows[0]]
    modes += [k for k in rows[0] if k.startswith("weave@")]
    head = (f"prefill, {meta['shape']} ({meta['layers']} layers), TP={meta['tp']}, "
            f"{meta['device']}, fused backend {meta['backend']}, "
            f"{'CUDA graphs' if meta.get('graph') else 'eager'}, weave SM carveout "
            f"{meta.get('carveout', 'auto')}; ms, median; ratios from this run")
    lines = [head] + ([meta["moe"]] if meta.get("moe") else []) + ["",
             "| tokens | split | " + " | ".join(f"{m} ms" for m in modes)
             + " | weave vs baseline | fused vs baseline | weave / nocomm |",
             "| --- | --- | " + " | ".join("---" for _ in modes) + " | --- | --- | --- |"]

    def ms(v):
        return f"{v * 1e3:.2f}" if isinstance(v, float) else "—"

    def ratio(a, b):
        return f"{a / b:.3f}x" if isinstance(a, float) and isinstance(b, float) else "—"
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['split']} | " + " | ".join(ms(r.get(m)) for m in modes)
                     + f" | {ratio(r.get('baseline'), r.get('weave'))} | "
                     f"{ratio(r.get('baseline'), r.get('fused'))} | "
                     f"{ratio(r.get('weave'), r.get('nocomm'))} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in ("fused", "weave", "nocomm"):
        if mode in rows[0]:
            ax.plot(tokens, [r["baseline"] / r[mode] if r.get(mode) else None for r in rows],
                    marker="o", label=f"{mode} speedup vs baseline")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefill tokens")
    ax.set_ylabel("speedup over baseline")
    m = result["meta"]
    ax.set_title(f"{m['shape']} {m['layers']} layers, TP={m['tp']}, {m['device']}, "
                 f"{'CUDA graphs' if m.get('graph') else 'eager'}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
