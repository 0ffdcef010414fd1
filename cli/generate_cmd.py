"""`weavelm generate` on each rank (the CLI checks its input, then starts the ranks
with `parallel.launch.run_ranks`; this module is what they execute)."""
from __future__ import annotations

import sys


class TokenPrinter:
    """Prints the decoded text of sequence 0 to stdout as its tokens arrive (rank 0 only)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, seq: int, token: int) -> None:
        if seq != 0:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def generate_rank(opts: dict) -> None:
    """Build the LLM of `opts["config"]` (an EngineConfig the CLI checked) on this rank and
    generate for already-tokenized prompts; rank 0 streams the first answer and prints the
    others after it."""
    from weavelm.engine.llm import LLM
    llm = LLM.from_config(opts["config"])
    printer = TokenPrinter(llm.tokenizer) if llm.state.is_first else None
    outs = llm.generate_from_ids(opts["token_lists"], opts["params"], on_token=printer,
                                 prompts=opts["prompts"])
    if llm.state.is_first:
        sys.stdout.write("\n")
        for out in outs[1:]:
            sys.stdout.write(f"---\n{out.text}\n")
        sys.stdout.flush()
        sys.stderr.write(speed_line(llm.stats) + "\n")


def speed_line(stats: dict) -> str:
    """`time to first token ..., decode ... tok/s` from `LLM.stats` of the last generate."""
    ttft = stats.get("ttft_s")
    line = "time to first token " + ("—" if ttft is None else f"{ttft * 1e3:.0f} ms")
    tokens, seconds = stats.get("decode_tokens", 0), stats.get("decode_s", 0.0)
    if tokens and seconds > 0:
        line += f", decode {tokens / seconds:.1f} tok/s ({tokens} tokens in {seconds:.2f} s)"
    return line
