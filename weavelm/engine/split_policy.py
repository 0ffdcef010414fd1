"""Where the engine cuts a prefill batch for the weave: the wave-aware splitter's choice, or the
tuned table that `weavelm tune` left for this model shape, TP degree and GPU."""
from __future__ import annotations

from weavelm.engine.splitter import split_point_for, tuned_table_for

# The engine prefills eagerly (no CUDA graphs for prefill yet), and two eager halves are
# host-bound on small batches: on 4xH100 with llama3-70b the eager weave lost to the fused
# schedule at 4K tokens (37.85 vs 32.07 ms) and won at 8K (61.65 vs 64.06; benchmarks/RESULTS.md,
# round 3). Without a tuned table this is the engine's threshold; `weavelm tune` measures the
# machine's own.
EAGER_MIN_TOKENS = 8192


def choose_split_for(llm, num_tokens: int, seq_lens=None) -> int | None:
    """First-half size for a prefill of `num_tokens` tokens in sequences of `seq_lens` (None:
    unknown), or None for no split.

    With `mode="weave"` asked for explicitly, any batch that can be split is split (tests and
    benchmarks pin the schedule); with `auto`, the tuned table's threshold decides, else
    EAGER_MIN_TOKENS.
    """
    tp = llm.state.world_size
    if llm.mode != "auto":
        min_tokens = 0
    else:
        min_tokens = None if tuned_table_for(llm.config, tp) is not None else EAGER_MIN_TOKENS
    return split_point_for(num_tokens, llm.config, tp, min_tokens=min_tokens,
                           seq_lens=seq_lens)
