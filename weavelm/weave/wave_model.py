"""The wave model: where to cut a batch into halves A and B so both fill whole GEMM waves.

TokenWeave runs a prefill batch of T tokens as two halves so that one half's all-reduce (fused
with residual + RMSNorm) hides behind the other half's compute. A naive 50/50 cut can leave a
partial GEMM wave in *each* half, so the two halves cost one or two waves more than the unsplit
batch (up to +21% on Llama-70B MLPs). The published code pads T to 256 and adds an offset in
{0, 128, 256} to the half, found per (model, TP, token bucket) by a day-long grid search. Here
an analytic wave model picks the cut, and `weavelm tune` (`weavelm/bench/tune.py`) corrects it
per machine with a few dozen timed prefills.

Wave model
----------
A per-rank GEMM `[M, k] @ [k, n]` is computed in output tiles of `tile_m x tile_n` (default
128 x 256, typical of bf16 cuBLAS/CUTLASS kernels on Hopper), one tile per SM at a time:

    tiles(M)  = ceil(M / tile_m) * ceil(n / tile_n)
    waves(M)  = ceil(tiles(M) / num_sms)
    time(M)   = sum over the layer's GEMMs of waves(M) * k          (arbitrary unit)

The unsplit batch costs time(T); a split at s costs time(s) + time(T - s). A good s makes both
halves fill whole waves, so their sum is no more than the unsplit cost.

A mixture-of-experts layer's expert GEMMs are grouped GEMMs (`GemmShape.experts`, `top_k`):
each of E experts runs on its routed rows, m * top_k / E of them when routing is uniform, so
its tiles are E * ceil(m * top_k / E / tile_m) * ceil(n / tile_n).

Assumptions (each is why `tune` exists): one fixed tile shape (real libraries choose per shape,
and may use split-K or stream-K); one resident tile per SM; every tile costs the same, in
proportion to k; routing is uniform over the experts; a partial wave costs a full wave; GEMMs
run one after another. Attention, norms and element-wise kernels are left out: their cost
scales smoothly with tokens. `num_sms` is the SMs the GEMMs get: pass fewer than the card has
when the other half's communication kernel holds some of them.

Causal attention
----------------
The wave model balances GEMM work, but when one sequence straddles the cut, causal attention is
lopsided: half A's queries see only A's keys, half B's see all of them. In the weave, B's
post-MLP reduction hides behind A's attention block, the shortest block of a layer, and it is
the one reduction the compute stream waits for. So when one sequence holds more than half the
batch, the model centres its window on T/2 + T/8 (`CAUSAL_BIAS`, `causal_bias`): a larger A
gives B's reduction a longer attention block to hide behind. The profile and the gain:
benchmarks/RESULTS.md (where the weave's time goes) and benchmarks/HISTORY.md (round 4).

Alignment rule
--------------
The first half `s` is a multiple of `align`, by default lcm(tp, 8): divisible by tp so that every
rank owns the same number of the first half's rows in the reduce-scatter/RMSNorm shard (as in
TokenWeave), and by 8 so that split sizes stay coarse (fewer distinct shapes, a small search,
and no ragged sub-8-row MMA tile at the cut). The second half `T - s` may be any size: the
communicators split uneven row counts themselves (`row_range`), and padding T is not the
splitter's job. `s` stays within `max_imbalance * T/2` of T/2 (and, with the causal bias above,
of T/2 + T/8), because the overlap only pays when the halves take similar time.

The tuned tables that correct the model per machine are `split_table.py`; the engine asks
`splitter.Splitter`, which uses both.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable


DEFAULT_MIN_TOKENS = 1024      # TokenWeave's threshold for Llama/Qwen2; below it: fused kernel only
CAUSAL_BIAS = 1 / 8            # first half larger by T/8 when one sequence dominates (see below)
DEFAULT_NUM_SMS = 132          # H100 SXM / H200
TILE_M, TILE_N = 128, 256      # bf16 Hopper GEMM output tile (tokens x output features)


@dataclass(frozen=True)
class GemmShape:
    """One per-rank GEMM of a decoder layer: `n` output features on this rank, `k` input features.

    A grouped GEMM over `experts` experts, each token routed to `top_k` of them, runs once per
    expert on its routed rows: m tokens give ceil(m * top_k / experts) rows per expert when
    routing is uniform (the wave model's assumption; random router weights route about so).
    """
    n: int
    k: int
    name: str = ""
    experts: int = 1
    top_k: int = 1


__all__ = ["GemmShape", "gemm_waves", "modeled_time", "default_align", "split_window",
           "causal_bias", "choose_split"]


def gemm_waves(m: int, gemm: GemmShape, num_sms: int = DEFAULT_NUM_SMS, *,
               tile_m: int = TILE_M, tile_n: int = TILE_N) -> int:
    """Waves of `num_sms` tiles that an `m`-token GEMM of this shape needs (0 for m = 0); a
    grouped (expert) GEMM: the tiles of every expert's ceil(m * top_k / experts) rows."""
    rows = -(-m * gemm.top_k // gemm.experts)
    tiles = gemm.experts * -(-rows // tile_m) * -(-gemm.n // tile_n)
    return -(-tiles // num_sms)


def modeled_time(m: int, gemms: Iterable[GemmShape], num_sms: int = DEFAULT_NUM_SMS, *,
                 tile_m: int = TILE_M, tile_n: int = TILE_N) -> int:
    """Modeled cost of `m` tokens through `gemms`: sum of waves * k (arbitrary unit)."""
    return sum(gemm_waves(m, g, num_sms, tile_m=tile_m, tile_n=tile_n) * g.k for g in gemms)


def default_align(tp: int) -> int:
    """lcm(tp, 8): the granularity of the first half (see "Alignment rule" above)."""
    return math.lcm(tp, 8)


def split_window(num_tokens: int, align: int, max_imbalance: float,
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
                 table=None, tile_m: int = TILE_M,
                 tile_n: int = TILE_N, bias: float = 0.0) -> int | None:
    """Size of the first half of a `num_tokens` batch, or None for "don't split". `table`: a
    measured `split_table.SplitTable` or None.

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
    lo, hi = split_window(num_tokens, align, max_imbalance)
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
        lo, hi = split_window(num_tokens, align, max_imbalance, bias)[0], hi
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
