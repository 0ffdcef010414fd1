"""From an HTTP request to engine inputs, and from engine outputs back to text.

`prompt_ids` / `chat_ids` turn a request into token ids (400 for what cannot run), `sampling`
into `SamplingParams`; `results` submits the request to the engine loop and yields its text
deltas, ending it early when a stop string appears, and aborting it if the caller goes away.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from weavelm.engine.config import prompt_refusal
from weavelm.engine.sampler import SamplingParams
from weavelm.serve.protocol import APIError


@dataclass
class Served:
    """What the HTTP side knows of the model once the engine loop has loaded it."""
    name: str
    tokenizer: object            # None: token-id prompts only (`weavelm serve --shape`)
    vocab_size: int
    max_model_len: int
    kv_tokens: int               # tokens the KV cache holds
    # special tokens written in chat messages: control tokens (True) or plain text (False)
    parse_special_tokens: bool = False
    tool_parser: str | None = None  # --tool-call-parser: finds the calls of tool_choice "auto"


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def check_tokens(served: Served, ids: list[int]) -> list[int]:
    bad = [t for t in ids if not 0 <= t < served.vocab_size]
    if bad:
        raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{served.vocab_size - 1}): "
                   f"send ids of this model's tokenizer", "prompt")
    return ids


# No tokenizer's token is longer than this many characters: text longer than the context times
# this cannot fit, and is refused before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 64


def _check_size(served: Served, chars: int, param: str) -> None:
    if chars > served.max_model_len * MAX_CHARS_PER_TOKEN:
        raise _bad(f"the {param} has {chars:,} characters, more than a context of "
                   f"{served.max_model_len} tokens can hold: shorten it", param,
                   "context_length_exceeded")


def prompt_ids(served: Served, prompt) -> list[int]:
    """A completion's prompt: text, token ids, or a list holding one of either."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _bad(f"{len(prompt)} prompts in one request: send one prompt per request",
                       "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return check_tokens(served, prompt)
    if served.tokenizer is None:
        raise _bad("this server has no tokenizer (random weights of a shape): send the prompt "
                   "as a list of token ids", "prompt")
    _check_size(served, len(prompt), "prompt")
    from weavelm.errors import WeavelmError
    from weavelm.models.tokenizer import encode
    try:
        return check_tokens(served, encode(served.tokenizer, prompt))
    except WeavelmError as e:
        raise _bad(str(e), "prompt") from None


def chat_ids(served: Served, messages, tools=None) -> list[int]:
    """The messages (and the tools, if any) in the model's chat format, ready for the
    assistant's reply."""
    tok = served.tokenizer
    if tok is None:
        raise _bad("this server has no tokenizer (random weights of a shape): use "
                   "/v1/completions with the prompt as token ids", "messages")
    if not getattr(tok, "chat_template", None):
        raise _bad("this model has no chat template: use /v1/completions with a raw prompt",
                   "messages")
    from weavelm.serve.tools import template_messages, template_tools
    convo = template_messages(messages)
    tool_dicts = template_tools(tools) if tools else None
    _check_size(served, sum(len(m["content"] or "") for m in convo)
                + len(json.dumps(tool_dicts or [])), "messages")
    from weavelm.errors import WeavelmError
    from weavelm.models.tokenizer import encode_chat
    try:
        for m in convo:
            (m["content"] or "").encode("utf-8")
        ids = encode_chat(tok, convo, served.parse_special_tokens, tool_dicts)
    except UnicodeEncodeError:
        raise _bad("a message is not valid UTF-8 (it holds a lone surrogate): send UTF-8 text",
                   "messages") from None
    except WeavelmError as e:
        raise _bad(str(e), "messages") from None
    return check_tokens(served, ids)


def sampling(served: Served, req, n_prompt: int, max_tokens: int | None,
             default_max: int | None, logprobs: int | None = None,
             prompt_logprobs: int | None = None, seed: int | None = None,
             structured=None) -> SamplingParams:
    """SamplingParams of a request whose prompt has `n_prompt` tokens (400 when it cannot run)."""
    limit = served.max_model_len
    refusal = prompt_refusal(n_prompt, limit)
    if refusal is not None:
        raise _bad(refusal, "prompt", "context_length_exceeded" if n_prompt else None)
    room = limit - n_prompt
    if max_tokens is None:
        # unset: as much as the context and the KV cache leave (the cache may hold less than
        # the context), never a refusal for a limit the client did not set
        max_tokens = min(room, default_max or room, served.kv_tokens - n_prompt)
        if max_tokens < 1:
            raise _bad(f"the prompt has {n_prompt} tokens but the KV cache holds "
                       f"{served.kv_tokens}: shorten the prompt", "prompt",
                       "context_length_exceeded")
    elif max_tokens > room:
        raise _bad(f"max_tokens={max_tokens} with a prompt of {n_prompt} tokens exceeds the "
                   f"context of {limit}: lower max_tokens to {room} or shorten the prompt",
                   "max_tokens", "context_length_exceeded")
    if n_prompt + max_tokens > served.kv_tokens:
        raise _bad(f"the request may grow to {n_prompt + max_tokens} tokens but the KV cache "
                   f"holds {served.kv_tokens}: lower max_tokens", "max_tokens")
    top_k = req.top_k if req.top_k not in (None, -1) else 0
    # OpenAI's defaults: temperature 1, top_p 1 (send temperature 0 for greedy).
    return SamplingParams(max_new_tokens=max_tokens,
                          temperature=1.0 if req.temperature is None else req.temperature,
                          top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p,
                          seed=seed, ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs,
                          presence_penalty=req.presence_penalty or 0.0,
                          frequency_penalty=req.frequency_penalty or 0.0,
                          repetition_penalty=req.repetition_penalty or 1.0,
                          min_p=req.min_p or 0.0, logit_bias=req.bias(),
                          min_tokens=req.min_tokens or 0, stop_token_ids=req.stop_token_ids,
                          structured=structured or req.constraint())


class TextStream:
    """Incremental detokenization (a few tokens of context, as vLLM's) and stop strings: `add`
    returns the text that is safe to send (text that might be the start of a stop string waits
    until it is known not to be)."""

    def __init__(self, tokenizer, stops: list[str], include_stop: bool = False):
        self.tok, self.stops, self.include_stop = tokenizer, stops, include_stop
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text, self.sent = "", 0
        self.stopped = False

    def add(self, new_ids: list[int], finished: bool) -> str:
        if self.tok is None:
            return ""
        self.ids.extend(new_ids)
        if new_ids:
            decode = self.tok.decode
            before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            after = decode(self.ids[self.prefix:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(self.ids)
        if finished and self.read < len(self.ids):        # flush an incomplete character
            tail = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
            head = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
            self.text += tail[len(head):]
            self.read = len(self.ids)
        end = len(self.text)
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i != -1 and i < end:
                end, self.stopped = i + (len(s) if self.include_stop else 0), True
        if self.stopped:
            self.text = self.text[:end]
        elif not finished:
            end = max(self.sent, end - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta


async def results(loop, rid: str, tokens: list[int], params: SamplingParams, stops, tokenizer,
                  is_disconnected=None, include_stop: bool = False):
    """Yield (text delta, new token ids, finish reason or None, the engine's RequestOutput) of
    one request until it ends.
    Leaving early (the client went away, a stop string) ends the request in the engine."""
    q: asyncio.Queue = asyncio.Queue()
    text = TextStream(tokenizer, stops, include_stop)
    done = False
    loop.submit(rid, tokens, params, q)
    clock = asyncio.get_running_loop().time
    checked = clock()
    try:
        while not done:
            if is_disconnected is None:
                out = await q.get()
            else:
                try:
                    out = await asyncio.wait_for(q.get(), 1.0)
                except asyncio.TimeoutError:
                    out = None
                # once a second whether or not tokens came: a decoding request sends one
                # every step, and a client that left must not keep it running to max_tokens
                if out is None or clock() - checked >= 1.0:
                    checked = clock()
                    if await is_disconnected():
                        return
                if out is None:
                    continue
            delta = text.add(out.new_token_ids, out.finished)
            reason = out.finish_reason if out.finished else None
            if text.stopped:
                if not out.finished:
                    loop.abort(rid, "stop")
                reason = "stop"
            done = reason is not None
            yield delta, out.new_token_ids, reason, out
    finally:
        if not done:
            loop.abort(rid)
