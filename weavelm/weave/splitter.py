"""Where the engine cuts a step for the weave: the one entry point the engine calls.

    splitter = Splitter(config, tp)               # a ModelConfig; this machine's GPU
    s = splitter.split(num_tokens, seq_lens)      # first-half size, or None: don't split

The wave model (`wave_model.py`) proposes the cut from the model family's per-layer GEMMs
(its registry entry); a table that `weavelm tune` measured on this GPU (`split_table.py`)
overrides it per token bucket and sets the threshold below which splitting does not pay.
"""
from __future__ import annotations

from typing import Iterable

from weavelm.weave.split_table import SplitTable, cached_table, model_key, table_key
from weavelm.weave.wave_model import DEFAULT_NUM_SMS, causal_bias, choose_split

# The engine prefills eagerly (no CUDA graphs for prefill yet), and two eager halves are
# host-bound on small batches, so below this size the weave loses to the fused schedule
# (benchmarks/RESULTS.md, prefill eager). Without a tuned table this is the engine's threshold;
# `weavelm tune` measures the machine's own.
EAGER_MIN_TOKENS = 8192


def current_gpu() -> tuple[str, int]:
    """(GPU name, SM count) of the current CUDA device; ("cpu", 132) without one."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return props.name, props.multi_processor_count
    except Exception:   # a broken CUDA setup must not break the CPU path
        pass
    return "cpu", DEFAULT_NUM_SMS


class Splitter:
    """Chooses the weave's cut for one model at one TP degree on one GPU.

    min_tokens: the threshold below which a step is not split. None: the tuned table's, else
    EAGER_MIN_TOKENS (the engine's `auto` mode); 0: split whatever can be split (an explicit
    `mode="weave"`, benchmarks).
    """

    def __init__(self, config, tp: int, *, min_tokens: int | None = None,
                 gpu_name: str | None = None, num_sms: int | None = None):
        name, sms = current_gpu()
        self.config, self.tp = config, tp
        self.gpu_name = gpu_name or name
        self.num_sms = num_sms or sms
        self.gemms = tuple(config.layer_gemms(tp))
        self.table: SplitTable | None = cached_table(
            table_key(model_key(config), tp, self.gpu_name))
        if min_tokens is None and self.table is None:
            min_tokens = EAGER_MIN_TOKENS
        self.min_tokens = min_tokens

    def split(self, num_tokens: int, seq_lens: Iterable[int] | None = None,
              **kwargs) -> int | None:
        """First-half size for a step of `num_tokens` tokens in sequences (or pieces) of
        `seq_lens` (they set the wave model's causal bias; None: unknown), or None for no
        split. Extra keywords go to `wave_model.choose_split`."""
        kwargs.setdefault("bias", causal_bias(num_tokens, seq_lens))
        kwargs.setdefault("min_tokens", self.min_tokens)
        return choose_split(num_tokens, self.tp, self.gemms, self.num_sms, table=self.table,
                            **kwargs)
