"""Wave-aware token splitter: where to cut a prefill batch into halves A and B.

TokenWeave runs a prefill batch of T tokens as two halves so that one half's all-reduce (fused
with residual + RMSNorm) hides behind the other half's compute. A naive 50/50 cut can leave a
partial GEMM wave in *each* half, so the two halves cost one or two waves more than the unsplit
batch (up to +21% on Llama-70B MLPs). The published code pads T to 256 and adds an offset in
{0, 128, 256} to the half, found per (model, TP, token bucket) by a day-long grid search. Here
an analytic wave model picks the cut, and `tune` corrects it per machine with a few dozen timed
prefills.

Wave model
----------
A per-rank GEMM `[M, k] @ [k, n]` is computed in output tiles of `tile_m x tile_n` (default
128 x 256, typical of bf16 cuBLAS/CUTLASS kernels on Hopper), one tile per SM at a time:

    tiles(M)  = ceil(M / tile_m) * ceil(n / tile_n)
    waves(M)  = ceil(tiles(M) / num_sms)
    time(M)   = sum over the layer's GEMMs of waves(M) * k          (arbitrary unit)

The unsplit batch costs time(T); a split at s costs time(s) + time(T - s). A good s makes both
halves fill whole waves, so their sum is no more than the unsplit cost.

Assumptions (each is why `tune` exists): one fixed tile shape (real libraries choose per shape,
and may use split-K or stream-K); one resident tile per SM; every tile costs the same, in
proportion to k; a partial wave costs a full wave; GEMMs run one after another. Attention, norms
and element-wise kernels are left out: their cost scales smoothly with tokens. `num_sms` is the
SMs the GEMMs get: pass fewer than the card has when the other half's communication kernel holds
some of them.

Causal attention
----------------
The wave model balances GEMM work, but when one sequence straddles the cut, causal attention is
lopsided: half A's queries see only A's keys, half B's see all of them. In the weave, B's
post-MLP reduction hides behind A's attention block, the shortest block of a layer, and it is
the one reduction the compute stream waits for (profile under CUDA graphs, 4xH100, llama3-70b,
16K tokens cut at T/2: 330 us per layer, 2.6 ms in all; cut at T/2 + T/8: 0.5 ms). So when one
sequence holds more than half the batch, the model centres its window on T/2 + T/8
(`CAUSAL_BIAS`, `causal_bias`): on 4xH100 weave vs baseline went from 1.090x to 1.120x at 4K and
from 1.092x to 1.107x at 16K, and was level at 8K (benchmarks/RESULTS.md, round 4).

Alignment rule
--------------
The first half `s` is a multiple of `align`, by default lcm(tp, 8): divisible by tp so that every
rank owns the same number of the first half's rows in the reduce-scatter/RMSNorm shard (as in
TokenWeave), and by 8 so that split sizes stay coarse (fewer distinct shapes, a small search,
and no ragged sub-8-row MMA tile at the cut). The second half `T - s` may be any size: the
communicators split uneven row counts themselves (`row_range`), and padding T is not the
splitter's job. `s` stays within `max_imbalance * T/2` of T/2 (and, with the causal bias above,
of T/2 + T/8), because the overlap only pays when the halves take similar time.

Tuned tables
------------
`SplitTable` holds measured results per (model shape, TP, GPU): for each token bucket the best
`split_offset` (s - T//2) and whether splitting lost (`no_split`), plus `min_tokens`, the smallest
bucket from which splitting won at every larger bucket. Tables live in
`<cache>/splits/<key>.json`, `<cache>` being `$WEAVELM_CACHE`, else `$XDG_CACHE_HOME/weavelm`, else
`~/.cache/weavelm`. The engine's call:

    s = choose_split(T, tp, gemms, num_sms, table=SplitTable.load(key))   # None: don't split

or, from a model config, `split_point_for(T, config, tp)` (tables are loaded once per process).
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

DEFAULT_MIN_TOKENS = 1024      # TokenWeave's threshold for Llama/Qwen2; below it: fused kernel only
CAUSAL_BIAS = 1 / 8            # first half larger by T/8 when one sequence dominates (see below)
DEFAULT_NUM_SMS = 132          # H100 SXM / H200
TILE_M, TILE_N = 128, 256      # bf16 Hopper GEMM output tile (tokens x output features)
TABLE_VERSION = 1


@dataclass(frozen=True)
class GemmShape:
    """One per-rank GEMM of a decoder layer: `n` output features on this rank, `k` input features."""
    n: int
    k: int
    name: str = ""


def gemm_waves(m: int, gemm: GemmShape, num_sms: int = DEFAULT_NUM_SMS, *,
               tile_m: int = TILE_M, tile_n: int = TILE_N) -> int:
    """Waves of `num_sms` tiles that an `m`-token GEMM of this shape needs (0 for m = 0)."""
    tiles = -(-m // tile_m) * -(-gemm.n // tile_n)
    return -(-tiles // num_sms)


def modeled_time(m: int, gemms: Iterable[GemmShape], num_sms: int = DEFAULT_NUM_SMS, *,
                 tile_m: int = TILE_M, tile_n: int = TILE_N) -> int:
    """Modeled cost of `m` tokens through `gemms`: sum of waves * k (arbitrary unit)."""
    return sum(gemm_waves(m, g, num_sms, tile_m=tile_m, tile_n=tile_n) * g.k for g in gemms)


def default_align(tp: int) -> int:
    """lcm(tp, 8): the granularity of the first half (see "Alignment rule" above)."""
    return math.lcm(tp, 8)


def _window(num_tokens: int, align: int, max_imbalance: float,
            bias: float = 0.0) -> tuple[int, int]:
    """[lo, hi] of the aligned first-half sizes within max_imbalance * T/2 of the center
    T/2 + bias * T (lo > hi: none)."""
    center, reach = num_tokens * (0.5 + bias), num_tokens / 2 * max_imbalance
    lo = max(align, math.ceil((center - reach) / align) * align)
    hi = min(num_tokens - 1, math.floor((center + reach) / align) * align)
    hi -= hi % align
    return lo, hi


def causal_bias(num_tokens: int, seq_lens: Iterable[int] | None) -> float:
    """The wave model's first-half bias for a batch of these sequence lengths: CAUSAL_BIAS when
    one sequence holds more than half the tokens, else 0 (see "Causal attention"). None: the
    lengths are unknown, no bias."""
    if seq_lens is None:
        return 0.0
    return CAUSAL_BIAS if 2 * max(seq_lens, default=0) > num_tokens else 0.0


def choose_split(num_tokens: int, tp: int, gemms: Iterable[GemmShape],
                 num_sms: int = DEFAULT_NUM_SMS, *, min_tokens: int | None = None,
                 align: int | None = None, max_imbalance: float = 0.25,
                 table: "SplitTable | None" = None, tile_m: int = TILE_M,
                 tile_n: int = TILE_N, bias: float = 0.0) -> int | None:
    """Size of the first half of a `num_tokens` batch, or None for "don't split".

    None when `num_tokens` is below the threshold: `min_tokens` if given, else the table's
    measured `min_tokens` (a table in which splitting never won gives None for every size), else
    DEFAULT_MIN_TOKENS. Otherwise `s` with `s % align == 0`, `0 < s < T`. With a table holding an
    entry for the nearest bucket, that entry decides: its `no_split` gives None, else its offset
    (T//2 + offset, rounded to `align`, clamped to `|s - T/2| <= max_imbalance * T/2`). Without
    one, the wave model decides among `|s - c| <= max_imbalance * T/2`, c = T/2 + bias * T
    (`causal_bias`), and `s <= (1 + max_imbalance) * T/2`: minimal time(s) + time(T - s), ties
    broken by closeness to c, then by the larger first half. None also when no aligned size fits.
    """
    if tp < 1 or num_tokens < 0 or not 0 <= max_imbalance < 1 or not 0 <= bias < 0.5:
        raise ValueError(f"bad split request: num_tokens={num_tokens}, tp={tp}, "
                         f"max_imbalance={max_imbalance}, bias={bias}")
    align = default_align(tp) if align is None else align
    if align < 1 or align % tp:
        raise ValueError(f"align={align} must be a positive multiple of tp={tp}")
    if min_tokens is None:
        if table is not None:
            if table.min_tokens is None:
                return None
            min_tokens = table.min_tokens
        else:
            min_tokens = DEFAULT_MIN_TOKENS
    if num_tokens < max(min_tokens, 2):
        return None
    lo, hi = _window(num_tokens, align, max_imbalance)
    if lo > hi:
        return None
    entry = table.lookup(num_tokens) if table is not None else None
    if entry is not None:
        if entry["no_split"]:
            return None
        s = num_tokens // 2 + int(entry["split_offset"])
        s = (s + align // 2) // align * align
        return min(max(s, lo), hi)
    if bias:   # the window moves up, but no half gets more imbalanced than max_imbalance allows
        lo, hi = _window(num_tokens, align, max_imbalance, bias)[0], hi
        if lo > hi:
            return None
    return _model_split(num_tokens, tuple(gemms), num_sms, align, lo, hi, tile_m, tile_n,
                        round(num_tokens * (1 + 2 * bias)))


@functools.lru_cache(maxsize=4096)
def _model_split(num_tokens: int, gemms: tuple[GemmShape, ...], num_sms: int, align: int,
                 lo: int, hi: int, tile_m: int, tile_n: int, center2: int) -> int:
    """The wave model's best first half in [lo, hi]; ties: closest to center2 / 2."""
    def cost(s: int) -> int:
        return (modeled_time(s, gemms, num_sms, tile_m=tile_m, tile_n=tile_n)
                + modeled_time(num_tokens - s, gemms, num_sms, tile_m=tile_m, tile_n=tile_n))

    return min(range(lo, hi + 1, align), key=lambda s: (cost(s), abs(2 * s - center2), -s))


# ----------------------------------------------------------------------------------- shapes

def _get(cfg, *names, default=None):
    for name in names:
        value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _shape(cfg) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, heads, kv_heads, layers, head_dim) of an HF config dict or ModelConfig."""
    hidden = _get(cfg, "hidden_size")
    inter = _get(cfg, "intermediate_size")
    heads = _get(cfg, "num_attention_heads", "num_heads")
    kv = _get(cfg, "num_key_value_heads", "num_kv_heads", default=heads)
    layers = _get(cfg, "num_hidden_layers", "num_layers")
    if None in (hidden, inter, heads, layers):
        raise ValueError("config needs hidden_size, intermediate_size, num_attention_heads "
                         "and num_hidden_layers")
    head_dim = _get(cfg, "head_dim", default=hidden // heads)
    return hidden, inter, heads, kv, layers, head_dim


def model_key(config_like) -> str:
    """Key of a model's layer shape, e.g. "h8192-i28672-a64-kv8" (plus "-d<head_dim>" when
    unusual). The layer count is left out on purpose: the best split depends on each layer's
    GEMMs, so a table tuned on a few layers serves the full model.

    Accepts an HF config dict or a `ModelConfig`.
    """
    hidden, inter, heads, kv, _, head_dim = _shape(config_like)
    key = f"h{hidden}-i{inter}-a{heads}-kv{kv}"
    return key if head_dim == hidden // heads else f"{key}-d{head_dim}"


def gemms_for(config_like, tp: int) -> list[GemmShape]:
    """The per-rank GEMMs of one Llama-style decoder layer at TP degree `tp`.

    KV heads are replicated when tp exceeds their number, as the TP layers do.
    """
    hidden, inter, heads, kv, _, head_dim = _shape(config_like)
    q_heads, kv_heads = heads // tp, max(kv // tp, 1)
    return [GemmShape((q_heads + 2 * kv_heads) * head_dim, hidden, "qkv"),
            GemmShape(hidden, q_heads * head_dim, "o"),
            GemmShape(2 * inter // tp, hidden, "gate_up"),
            GemmShape(hidden, inter // tp, "down")]


def table_key(model: str, tp: int, gpu_name: str) -> str:
    """Key of a tuned table: model shape, TP degree, GPU name."""
    return f"{model}-tp{tp}-{gpu_name}"


# ----------------------------------------------------------------------------------- tables

def _cache_root() -> pathlib.Path:
    from weavelm.models.tokenizer import cache_root

    return cache_root()


def _sanitize(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "default"


@dataclass
class SplitTable:
    """Measured split points for one (model shape, TP, GPU) key.

    entries: {bucket_tokens: {"split_offset": s - T//2, "no_split": bool}};
    min_tokens: smallest bucket from which splitting won at every larger bucket (None: never won);
    meta: free-form facts about the tuning run (measure calls, timings).
    """
    key: str
    entries: dict[int, dict] = field(default_factory=dict)
    min_tokens: int | None = DEFAULT_MIN_TOKENS
    meta: dict = field(default_factory=dict)

    @staticmethod
    def path_for(key: str) -> pathlib.Path:
        return _cache_root() / "splits" / f"{_sanitize(key)}.json"

    def lookup(self, num_tokens: int) -> dict | None:
        """The entry of the bucket nearest `num_tokens` in log distance (ties: larger bucket)."""
        if not self.entries:
            return None
        t = math.log(max(num_tokens, 1))
        bucket = min(self.entries, key=lambda b: (abs(math.log(b) - t), -b))
        return self.entries[bucket]

    def to_json(self) -> dict:
        return {"version": TABLE_VERSION, "key": self.key, "min_tokens": self.min_tokens,
                "entries": {str(b): dict(e) for b, e in sorted(self.entries.items())},
                "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict) -> "SplitTable":
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"split table version {data.get('version')!r}, "
                             f"expected {TABLE_VERSION}")
        entries = {int(b): {"split_offset": int(e["split_offset"]), "no_split": bool(e["no_split"])}
                   for b, e in data["entries"].items()}
        mt = data.get("min_tokens")
        return cls(data["key"], entries, None if mt is None else int(mt), data.get("meta", {}))

    def save(self) -> pathlib.Path:
        """Write the table atomically (temp file + os.replace); returns its path."""
        path = self.path_for(self.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _cached_load.cache_clear()
        return path

    @classmethod
    def load(cls, key: str) -> "SplitTable | None":
        """The saved table for `key`, or None when there is none (or it is unreadable: warns)."""
        try:
            path = cls.path_for(key)
            with open(path) as f:
                return cls.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            warnings.warn(f"ignoring unreadable split table for {key!r}: {e}", stacklevel=2)
            return None


def _cached_table(key: str) -> SplitTable | None:
    """`SplitTable.load(key)`, read once per process and cache directory."""
    try:
        root = str(_cache_root())
    except RuntimeError:   # no home directory to expand: no cache, the model decides
        return None
    return _cached_load(key, root)


@functools.lru_cache(maxsize=64)
def _cached_load(key: str, root: str) -> SplitTable | None:
    return SplitTable.load(key)


def _device() -> tuple[str, int]:
    """(GPU name, SM count) of the current CUDA device; ("cpu", 132) without one."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return props.name, props.multi_processor_count
    except Exception:   # a broken CUDA setup must not break the CPU path
        pass
    return "cpu", DEFAULT_NUM_SMS


def split_point_for(num_tokens: int, config_like, tp: int, *, gpu_name: str | None = None,
                    num_sms: int | None = None, seq_lens: Iterable[int] | None = None,
                    **kwargs) -> int | None:
    """`choose_split` for a model config on this machine, with its tuned table if one is saved.

    GPU name and SM count default to the current CUDA device's; the table is loaded once per
    process (saving a table refreshes it). `seq_lens`, the batch's sequence lengths, set the
    model's `causal_bias`. Extra keywords go to `choose_split`.
    """
    kwargs.setdefault("bias", causal_bias(num_tokens, seq_lens))
    if gpu_name is None or num_sms is None:
        name, sms = _device()
        gpu_name = name if gpu_name is None else gpu_name
        num_sms = sms if num_sms is None else num_sms
    table = _cached_table(table_key(model_key(config_like), tp, gpu_name))
    return choose_split(num_tokens, tp, gemms_for(config_like, tp), num_sms, table=table, **kwargs)


def tuned_table_for(config_like, tp: int, gpu_name: str | None = None):
    """The table `weavelm tune` saved for this model shape, TP and GPU, or None."""
    if gpu_name is None:
        gpu_name = _device()[0]
    return _cached_table(table_key(model_key(config_like), tp, gpu_name))


# ----------------------------------------------------------------------------------- tuning

def candidate_splits(num_tokens: int, tp: int, gemms: Iterable[GemmShape],
                     num_sms: int = DEFAULT_NUM_SMS, candidates: int = 5, *,
                     align: int | None = None, max_imbalance: float = 0.25,
                     tile_m: int = TILE_M, tile_n: int = TILE_N) -> list[int]:
    """Up to `candidates` first-half sizes worth timing: the model's choice, the aligned half,
    a first half larger by T/8, then the model's choice +- j * step, step being half a tile row
    (rounded up to `align`).

    The T/8 candidate is for what the wave model leaves out: with causal attention half A's
    attention block is the cheaper one, and the reduction that hides behind it (B's, after the
    MLP) is the one the compute stream waits for (benchmarks/profile_weave.py); a larger A
    evens that out. On 4xH100, llama3-70b at 4K tokens: 1.120x over baseline at +T/8 against
    1.090x at T/2 (benchmarks/RESULTS.md, round 4)."""
    align = default_align(tp) if align is None else align
    gemms = tuple(gemms)
    best = choose_split(num_tokens, tp, gemms, num_sms, min_tokens=0, align=align,
                        max_imbalance=max_imbalance, tile_m=tile_m, tile_n=tile_n)
    if best is None:
        return []
    lo, hi = _window(num_tokens, align, max_imbalance)
    half = min(max((num_tokens // 2 + align // 2) // align * align, lo), hi)
    step = -(-max(tile_m // 2, 1) // align) * align
    out = [best] + ([half] if half != best else [])
    larger_a = min((num_tokens // 2 + num_tokens // 8) // align * align, hi)
    if larger_a > best + step and len(out) < candidates:
        out.append(larger_a)
    j = 1
    while len(out) < candidates and (best + j * step <= hi or best - j * step >= lo):
        for s in (best + j * step, best - j * step):
            if lo <= s <= hi and s not in out and len(out) < candidates:
                out.append(s)
        j += 1
    return out[:candidates]


def tune(measure: Callable[[int, int | None], float], buckets: Iterable[int], tp: int,
         gemms: Iterable[GemmShape], num_sms: int = DEFAULT_NUM_SMS, candidates: int = 5,
         repeats: int = 3, *, key: str = "", align: int | None = None,
         max_imbalance: float = 0.25, tile_m: int = TILE_M, tile_n: int = TILE_N) -> SplitTable:
    """Time a few splits per token bucket and keep the fastest (the table is returned, not saved).

    `measure(num_tokens, split)` returns the seconds of one prefill (`split=None`: unsplit). Per
    bucket it times the unsplit run and `candidate_splits` (at most `candidates`), each `repeats`
    times, round-robin, keeping the minimum: at most len(buckets) * (1 + candidates) * repeats
    calls (counted in `meta["measure_calls"]`), instead of a grid search.
    """
    from tqdm.auto import tqdm

    gemms = tuple(gemms)
    align = default_align(tp) if align is None else align
    buckets = sorted({int(b) for b in buckets})
    plans = {t: [None] + candidate_splits(t, tp, gemms, num_sms, candidates, align=align,
                                          max_imbalance=max_imbalance, tile_m=tile_m,
                                          tile_n=tile_n)
             for t in buckets}
    entries, wins, timings, calls = {}, {}, {}, 0
    with tqdm(total=sum(len(p) for p in plans.values()) * repeats, desc="tuning split points",
              unit="prefill", disable=None) as bar:
        for t in buckets:
            best_time: dict[int | None, float] = {}
            for _ in range(repeats):
                for s in plans[t]:
                    seconds = float(measure(t, s))
                    calls += 1
                    bar.update()
                    best_time[s] = min(seconds, best_time.get(s, math.inf))
            splits = [s for s in plans[t] if s is not None]
            if not splits:
                entries[t] = {"split_offset": 0, "no_split": True}
                wins[t] = False
                continue
            best = min(splits, key=lambda s: (best_time[s], abs(2 * s - t), -s))
            wins[t] = best_time[best] < best_time[None]
            entries[t] = {"split_offset": best - t // 2, "no_split": not wins[t]}
            timings[str(t)] = {"no_split_s": best_time[None], "best_split": best,
                               "best_split_s": best_time[best]}
    min_tokens = None
    for t in reversed(buckets):
        if not wins[t]:
            break
        min_tokens = t
    return SplitTable(key, entries, min_tokens,
                      {"measure_calls": calls, "repeats": repeats, "candidates": candidates,
                       "align": align, "num_sms": num_sms, "tile": [tile_m, tile_n],
                       "timings": timings})
