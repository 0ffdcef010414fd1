"""Where the engine cuts a prefill batch for the weave: the wave-aware splitter's choice, or the
tuned table that `weavelm tune` left for this model shape, TP degree and GPU."""
from __future__ import annotations

from weavelm.engine.splitter import split_point_for


def choose_split_for(llm, num_tokens: int) -> int | None:
    """First-half size for a prefill of `num_tokens` tokens, or None for no split.

    With `mode="weave"` asked for explicitly, any batch that can be split is split (tests and
    benchmarks pin the schedule); with `auto`, the splitter's threshold decides.
    """
    forced = llm.mode != "auto"
    return split_point_for(num_tokens, llm.config, llm.state.world_size,
                           min_tokens=0 if forced else None)
