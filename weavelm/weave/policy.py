"""Which schedule each step runs: the engine's `mode` setting turned into (mode, split).

`auto` (the default): on GPUs with TP > 1, the weave from the splitter's threshold up and the
fused kernel below it, and fused decode; on CPU or at TP 1 (nothing to hide) the baseline.
An explicit mode is obeyed: `weave` splits every step that can be split (decode steps, a few
tokens each, run baseline), `fused`, `baseline` and `nocomm` run as named.
"""
from __future__ import annotations

from typing import Iterable

from weavelm.weave.executor import Mode, parse_mode
from weavelm.weave.splitter import Splitter
from weavelm.parallel.state import ParallelState


class SchedulePolicy:
    def __init__(self, mode: str | Mode, config, state: ParallelState):
        self.overlap_pays = state.device.type == "cuda" and state.world_size > 1
        self.config, self.tp = config, state.world_size
        self.set_mode(mode)

    def set_mode(self, mode: str | Mode) -> None:
        parsed = None if mode == "auto" else parse_mode(mode)     # raises before any change
        self.auto, self.mode = parsed is None, parsed
        self._splitter: Splitter | None = None

    @property
    def splitter(self) -> Splitter:
        if self._splitter is None:      # reads the tuned table: only when a weave is possible
            self._splitter = Splitter(self.config, self.tp,
                                      min_tokens=None if self.auto else 0)
        return self._splitter

    def prefill(self, num_tokens: int, seq_lens: Iterable[int] | None = None
                ) -> tuple[Mode, int | None]:
        """(mode, split) for a step of `num_tokens` tokens in sequences of `seq_lens` (they tell
        the splitter where causal attention makes one half cheaper)."""
        if self.auto:
            if not self.overlap_pays:
                return Mode.BASELINE, None
        elif self.mode is not Mode.WEAVE:
            return self.mode, None
        split = self.splitter.split(num_tokens, seq_lens)
        return (Mode.WEAVE, split) if split is not None else (Mode.FUSED, None)

    def decode(self) -> Mode:
        if self.auto:
            return Mode.FUSED if self.overlap_pays else Mode.BASELINE
        return Mode.BASELINE if self.mode is Mode.WEAVE else self.mode
