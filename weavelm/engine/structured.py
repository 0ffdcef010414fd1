"""Structured output: a request's tokens constrained to a JSON schema, any JSON, a regular
expression, one of a list of strings, or an EBNF grammar, through xgrammar (the grammar engine
vLLM and SGLang use by default: grammars compiled once per tokenizer and cached, a token
bitmask per step filled on the host in microseconds and applied to the logits on the device).

    constraint = Constraint("json", schema_text)             # or "regex", "choice", "grammar"
    grammars = Grammars(tokenizer, vocab_size, stop_ids)      # one per engine
    matcher = grammars.matcher(constraint)                    # one per sequence
    grammars.mask(logits, [(row, matcher), ...])              # before sampling
    matcher.accept_token(token)                               # after it is read

A constrained sequence's next mask needs its last token accepted, so the engine reads a step
with constrained rows before it launches the next one (no step ahead for them). JSON is
generated compact (no free whitespace: a small model given the choice can loop on spaces).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from weavelm.errors import WeavelmError, check

KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What the output must be. `spec`: for "json" a JSON schema as text (None: any JSON
    object), for "regex" the expression, for "choice" a tuple of strings, for "grammar" EBNF
    (xgrammar's dialect of GBNF, `root ::= ...`)."""
    kind: str
    spec: str | tuple | None = None

    def __post_init__(self):
        check(self.kind in KINDS, f"a constraint's kind is one of {', '.join(KINDS)}, got "
                                  f"{self.kind!r}")
        if self.kind == "json":
            check(self.spec is None or isinstance(self.spec, str),
                  "a json constraint's spec is a JSON schema as text (or None: any JSON)")
            if self.spec is not None:
                try:
                    schema = json.loads(self.spec)
                except ValueError as e:
                    raise WeavelmError(f"the JSON schema is not valid JSON ({e}): send a "
                                       f"schema object") from None
                check(isinstance(schema, dict), "the JSON schema must be an object")
        elif self.kind == "choice":
            check(isinstance(self.spec, tuple) and 0 < len(self.spec) <= 1024
                  and all(isinstance(c, str) and c for c in self.spec),
                  "a choice constraint takes 1 to 1024 non-empty strings")
        else:
            check(isinstance(self.spec, str) and self.spec,
                  f"a {self.kind} constraint takes a non-empty string")


class Grammars:
    """The compiled grammars of one tokenizer (cached by constraint) and the step's masks."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        try:
            import xgrammar
        except ImportError:
            raise WeavelmError("structured output needs the package 'xgrammar', which is not "
                               "installed: pip install xgrammar") from None
        self.xgr = xgrammar
        self.vocab_size = vocab_size
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=2)
        self._compiled: dict[Constraint, object] = {}
        self._bitmask = None

    def compile(self, c: Constraint):
        """The compiled grammar of `c` (cached); a WeavelmError naming what is wrong."""
        if c in self._compiled:
            return self._compiled[c]
        try:
            if c.kind == "json":
                grammar = self.compiler.compile_json_schema(
                    c.spec or '{"type": "object"}', any_whitespace=False)
            elif c.kind == "regex":
                grammar = self.compiler.compile_regex(c.spec)
            elif c.kind == "choice":
                ebnf = "root ::= " + " | ".join(json.dumps(s) for s in c.spec)
                grammar = self.compiler.compile_grammar(ebnf)
            else:
                grammar = self.compiler.compile_grammar(c.spec)
        except Exception as e:                      # noqa: BLE001 - xgrammar's parse errors
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise WeavelmError(f"the {c.kind} constraint does not compile ({reason}): fix "
                               f"it") from None
        if len(self._compiled) > 256:               # bounded: drop the oldest
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[c] = grammar
        return grammar

    def matcher(self, c: Constraint):
        return self.xgr.GrammarMatcher(self.compile(c))

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, object]]) -> None:
        """Set the logits of the tokens each (row, matcher) forbids to -inf, in place."""
        if not rows:
            return
        B = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < B:
            self._bitmask = self.xgr.allocate_token_bitmask(max(B, 8), self.vocab_size)
        bitmask = self._bitmask[:B]
        for row, matcher in rows:
            matcher.fill_next_token_bitmask(bitmask, row)
        self.xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True),
            vocab_size=self.vocab_size, indices=[row for row, _ in rows])


def constraint_rows(owners) -> list[tuple[int, object]]:
    """(row, matcher) of the owners whose requests are constrained."""
    return [(i, s.matcher) for i, s in enumerate(owners) if s.matcher is not None]

