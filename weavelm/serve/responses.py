"""One API request as several engine requests (one per prompt and per sample, `n`), and their
outputs as OpenAI choices: text, log-probabilities in the completions' and the chat's formats,
vLLM's `prompt_logprobs`, echo.

    job = Job.plan(served, req, prompts, max_tokens, default_max, chat)   # 400s raised here
    ... each of job.requests runs through `handling.results` ...
    choice = job.completion_choice(i, text, toks, reason, out)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from weavelm.engine.logprobs import TokenLogprob
from weavelm.engine.sampler import SamplingParams
from weavelm.serve.handling import Served, _bad, sampling
from weavelm.serve.protocol import (ChatLogprobs, ChatTokenLogprob, CompletionLogprobs,
                                    PromptTokensDetails, TopLogprob, Usage)


class TokenTexts:
    """Each token's text as it reads in its sequence (a word-level or SentencePiece tokenizer
    puts the space before a word there, not in the token alone): decoded after the few tokens
    before it, as incremental detokenizers do. `offset` is where the next token's text
    starts."""

    CONTEXT = 6

    def __init__(self, tokenizer, context=()):
        self.tok, self.context, self.offset = tokenizer, list(context)[-self.CONTEXT:], 0
        self._before = None                     # the context's text, decoded once per position
        # the fast tokenizer's own decode: transformers' wrapper costs more than the decoding
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=False)
        else:
            self._decode = tokenizer.decode if tokenizer is not None else None

    def text(self, token: int, advance: bool = True) -> str:
        if self.tok is None:
            return ""
        if self._before is None:
            self._before = self._decode(self.context)
        before = self._before
        after = self._decode(self.context + [token])
        text = after[len(before):] if after.startswith(before) else self._decode([token])
        if advance:
            self.context = (self.context + [token])[-self.CONTEXT:]
            self.offset += len(text)
            self._before = None
        return text


@dataclass
class EngineRequest:
    index: int                      # the choice's index
    prompt_index: int
    ids: list[int]
    params: SamplingParams


@dataclass
class Job:
    served: Served
    chat: bool
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    requests: list[EngineRequest] = field(default_factory=list)
    logprobs: int | None = None      # alternatives per generated token (None: no logprobs)
    echo: bool = False               # completions: the prompt (and its logprobs) come first
    score_only: bool = False         # max_tokens=0: the prompt is scored, nothing generated
    tools: tuple = ()                # chat with tools: the function names
    tool_choice: object = None       # "auto", "required" or a NamedToolChoice (with tools)

    @classmethod
    def plan(cls, served: Served, req, prompts: list[list[int]], prompt_texts, max_tokens,
             default_max, chat: bool, tools=None) -> "Job":
        job = cls(served, chat, prompts, list(prompt_texts))
        structured = None
        if tools:
            from weavelm.serve.tools import tool_constraint
            job.tools = tuple(t.function.name for t in tools)
            job.tool_choice = req.tool_choice or "auto"
            if job.tool_choice == "auto" and served.tool_parser is None:
                raise _bad("tool_choice 'auto' needs a server started with --tool-call-parser "
                           "(hermes or llama3_json; vLLM's --enable-auto-tool-choice): or send "
                           "tool_choice 'required' or a named function", "tool_choice")
            structured = tool_constraint(tools, job.tool_choice, req.parallel_tool_calls)
        if chat:
            job.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            job.logprobs, job.echo = req.logprobs, bool(req.echo)
            job.score_only = max_tokens == 0
            if job.score_only and not job.echo:
                raise _bad("max_tokens=0 scores the prompt only: send it with echo: true",
                           "max_tokens")
        prompt_k = req.prompt_logprobs
        if job.echo and job.logprobs is not None:      # the echoed prompt's logprobs too
            prompt_k = max(prompt_k or 0, job.logprobs)
        n = req.n or 1
        for p, ids in enumerate(prompts):
            for j in range(n):
                seed = None if req.seed is None else (req.seed + j) % 2**63
                params = sampling(served, req, len(ids), 1 if job.score_only else max_tokens,
                                  default_max, job.logprobs, prompt_k, seed, structured)
                job.requests.append(EngineRequest(len(job.requests), p, ids, params))
        return job

    def tool_result(self, text: str, reason: str) -> tuple[str | None, list | None, str]:
        """(content, tool calls or None, finish reason) of a chat choice's text."""
        if not self.tools:
            return text, None, reason
        from weavelm.serve.tools import constrained_calls, parse_calls
        if self.tool_choice == "auto":
            content, calls = parse_calls(self.served.tool_parser, text, self.tools)
        else:
            try:
                content, calls = None, constrained_calls(text, self.tool_choice)
            except ValueError:                  # cut short by max_tokens: not JSON yet
                return text, None, reason
        if not calls:
            return content, None, reason
        return content, calls, "tool_calls"

    # -- pieces of a choice -----------------------------------------------------------------------
    def _token_text(self, token: int) -> str:
        """A token's text on its own (vLLM's `decoded_token`)."""
        tok = self.served.tokenizer
        return tok.decode([token]) if tok is not None else ""

    def usage(self, completion_tokens: int, outs) -> Usage:
        """Usage of the request, `outs` the engine requests' last outputs (None where none):
        the prompt tokens once per prompt, the cached ones as its first sample found them."""
        prompt = sum(len(p) for p in self.prompts)
        first = {}
        for r, out in zip(self.requests, outs):
            if r.prompt_index not in first and out is not None:
                first[r.prompt_index] = getattr(out, "num_cached_tokens", 0)
        return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens,
                     total_tokens=prompt + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(
                         cached_tokens=sum(first.values())))

    def generated(self, toks: list[int], out) -> tuple[list[int], list | None]:
        """The tokens (and their logprobs) a choice reports: none when scoring only."""
        if self.score_only:
            return [], [] if self.logprobs is not None else None
        entries = out.logprobs[-len(toks):] if (out is not None and out.logprobs and toks) \
            else []
        return toks, entries if self.logprobs is not None else None

    def echo_text(self, r: EngineRequest) -> str:
        text = self.prompt_texts[r.prompt_index]
        if text is None:
            tok = self.served.tokenizer
            text = tok.decode(r.ids) if tok is not None else ""
        return text

    def texts(self, r: EngineRequest) -> TokenTexts:
        """The token texts of a choice's logprobs: from the prompt's start when echoing, else
        after the prompt."""
        return TokenTexts(self.served.tokenizer, () if self.echo else r.ids)

    def completion_logprobs(self, entries: list, texts: TokenTexts) -> CompletionLogprobs:
        """The completions format of token entries (the echoed prompt's first); `texts`
        carries the token texts' context and offset from one call to the next."""
        out = CompletionLogprobs()
        for e in entries:
            alternatives = None
            if e.logprob is not None:
                alternatives = {texts.text(t, advance=False): v for t, v in e.top[:self.logprobs]}
            out.text_offset.append(texts.offset)
            out.tokens.append(texts.text(e.token))
            out.token_logprobs.append(e.logprob)      # None: the prompt's first token
            out.top_logprobs.append(alternatives)
        return out

    def prompt_entries(self, r: EngineRequest, out) -> list:
        """The prompt's entries for an echo: its first token has none."""
        raw = list(out.prompt_logprobs or []) if out is not None else []
        first = TokenLogprob(r.ids[0], None, []) if r.ids else None
        return ([first] if first else []) + [e for e in raw[1:] if e is not None]

    def chat_logprobs(self, entries: list, texts: TokenTexts) -> ChatLogprobs:
        content = []
        for e in entries:
            top = []
            for t, v in e.top[:self.logprobs]:
                t_text = texts.text(t, advance=False)
                top.append(TopLogprob(token=t_text, logprob=v, bytes=list(t_text.encode())))
            text = texts.text(e.token)
            content.append(ChatTokenLogprob(token=text, logprob=e.logprob,
                                            bytes=list(text.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)

    def vllm_prompt_logprobs(self, out) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob, rank,
        decoded_token}} for the token and its alternatives."""
        if out is None or out.prompt_logprobs is None:
            return None
        result = []
        for e in out.prompt_logprobs:
            if e is None:
                result.append(None)
                continue
            entry = {str(e.token): {"logprob": e.logprob, "decoded_token":
                                    self._token_text(e.token)}}
            for rank, (t, v) in enumerate(e.top, start=1):
                entry.setdefault(str(t), {"logprob": v, "decoded_token": self._token_text(t)})
                entry[str(t)]["rank"] = rank
            result.append(entry)
        return result
