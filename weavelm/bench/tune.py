"""`weavelm tune`: measure a few split points per token bucket on this machine and save the
table the engine's splitter then uses (`weavelm/weave/split_table.py`).

Instead of a grid search, each bucket times the unsplit prefill and a handful of candidates
around the wave model's choice (`candidate_splits`), a few times each, and keeps the fastest.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Iterable

import torch

from weavelm.weave.split_table import SplitTable
from weavelm.weave.wave_model import (
    DEFAULT_NUM_SMS, TILE_M, TILE_N, GemmShape, choose_split, default_align, split_window,
)
from weavelm.errors import check


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
    1.090x at T/2 (benchmarks/HISTORY.md, round 4)."""
    align = default_align(tp) if align is None else align
    gemms = tuple(gemms)
    best = choose_split(num_tokens, tp, gemms, num_sms, min_tokens=0, align=align,
                        max_imbalance=max_imbalance, tile_m=tile_m, tile_n=tile_n)
    if best is None:
        return []
    lo, hi = split_window(num_tokens, align, max_imbalance)
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


def tune_rank(opts: dict):
    """Measure a few split points per token bucket and save the table the engine will use."""
    from weavelm.bench.prefill import PrefillTimer
    from weavelm.weave.split_table import model_key, table_key
    from weavelm.parallel.state import init_parallel
    state = init_parallel(opts["tp"], opts["device"])
    check(state.device.type == "cuda", "weavelm tune measures GPU kernels: run it with GPUs")
    runner = PrefillTimer(opts["shape"], opts["layers"], opts["tp"], opts["backend"],
                          opts["seq_len"])

    def measure(num_tokens, split):
        mode = "weave" if split else "fused"
        return runner.time(num_tokens, mode, split, warmup=1, repeats=1)
    gpu = torch.cuda.get_device_name()
    num_sms = torch.cuda.get_device_properties(state.device).multi_processor_count
    table = tune(measure, opts["tokens"], opts["tp"], runner.splitter.gemms,
                 num_sms, key=table_key(model_key(runner.cfg), opts["tp"], gpu))
    if state.is_first:
        return {"path": str(table.save()), "table": json.loads(json.dumps(table.to_json()))}
    return None
