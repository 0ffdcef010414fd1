"""A request's outputs as the HTTP answer: one response (`collect` each engine request's text)
or server-sent events in OpenAI's chunk format (`stream`: the choices' chunks in the order they
come, usage when asked, then `data: [DONE]`). The common chunk, one token of text, is joined
from a template of the pydantic model's own JSON instead of built and dumped each time.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from weavelm.serve.protocol import (APIError, ChatChunk, ChatChunkChoice, Completion,
                                    CompletionChoice, Delta)
from weavelm.serve.responses import Job


def _sse(obj) -> str:
    text = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {text}\n\n"


def end_error(reason: str) -> APIError:
    if reason == "abort":
        return APIError(503, "the request was cancelled: the server is shutting down",
                        type="server_error", code="cancelled")
    if reason.startswith("error: the engine"):
        return APIError(500, reason[len("error: "):], type="server_error")
    return APIError(400, reason[len("error: "):])


async def collect(gen):
    """(text, token ids, finish reason, last engine output) of one engine request."""
    parts, toks, reason, last = [], [], None, None
    async with contextlib.aclosing(gen):
        async for delta, new, reason, out in gen:
            parts.append(delta)
            toks.extend(new)
            last = out
    if reason is None:                               # the client went away
        raise APIError(499, "the client closed the request")
    if reason not in ("stop", "length"):
        raise end_error(reason)
    return "".join(parts), toks, reason, last


def _chunk_json(chunk, include_usage: bool) -> str:
    """A chunk as OpenAI streams it: `usage` null on every chunk when the client asked for
    usage (it comes in a last chunk of its own), absent otherwise."""
    data = chunk.model_dump(mode="json")
    if data.get("usage") is None:
        if include_usage:
            data["usage"] = None
        else:
            data.pop("usage", None)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


MARK_TEXT, MARK_IDS = "\x00", [-1]


def _chunk_template(chunk_json: str) -> tuple[str, str, str]:
    """A chunk's JSON cut around its text (MARK_TEXT) and token ids (MARK_IDS, if there), so
    each token's chunk is string joins instead of a model build and dump (the same JSON)."""
    text = json.dumps(MARK_TEXT)
    i = chunk_json.index(text)
    head, rest = chunk_json[:i], chunk_json[i + len(text):]
    if '"token_ids":[-1]' in rest:
        j = rest.index('"token_ids":[-1]') + len('"token_ids":[')
        return "data: " + head, rest[:j], rest[j + 2:] + "\n\n"
    return "data: " + head, None, rest + "\n\n"


async def _merge(gens):
    """(index, item) of several async generators as their items come; all closed at the end."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as gen:
            async for item in gen:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    END = object()

    async def pump(i, gen):
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    await queue.put((i, item))
        finally:
            await queue.put((i, END))
    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is END:
                running -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stream(gens, job: Job, rid: str, model: str, req):
    """The request's server-sent events in OpenAI's chunk format (each choice's in the order
    they come), then its usage if asked for, then `data: [DONE]`."""
    chat, created = job.chat, int(time.time())
    usage_wanted, ids = req.include_usage(), bool(req.return_token_ids)
    Chunk = ChatChunk if chat else Completion

    def chunk(index, text, toks=None, reason=None, logprobs=None, role=None, calls=None):
        if chat:
            choice = ChatChunkChoice(index=index, delta=Delta(role=role, content=text,
                                                              tool_calls=calls),
                                     finish_reason=reason, logprobs=logprobs,
                                     token_ids=toks if ids else None)
        else:
            choice = CompletionChoice(index=index, text=text, finish_reason=reason,
                                      logprobs=logprobs, token_ids=toks if ids else None)
        return Chunk(id=rid, created=created, model=model, choices=[choice])

    templates = {}
    for r in job.requests:
        if chat:
            yield f"data: {_chunk_json(chunk(r.index, '', role='assistant'), usage_wanted)}\n\n"
        templates[r.index] = _chunk_template(_chunk_json(
            chunk(r.index, MARK_TEXT, MARK_IDS), usage_wanted))
    generated, ended, echoed = 0, set(), set()
    last_outs = [None] * len(job.requests)        # for usage: what the prefix cache held
    replies = [""] * len(job.requests)            # with tools: each reply, read whole
    reply_ids = [[] for _ in job.requests]
    texts = [job.texts(r) for r in job.requests]      # each choice's token texts so far
    async for i, (delta, new, reason, out) in _merge(gens):
        r = job.requests[i]
        last_outs[i] = out
        if reason is not None and reason not in ("stop", "length"):
            yield _sse(end_error(reason).body())
            yield "data: [DONE]\n\n"
            return
        if job.echo and i not in echoed:        # the prompt (its logprobs are known by now)
            echoed.add(i)
            prompt, text = None, job.echo_text(r)
            if job.logprobs is not None:
                prompt = job.completion_logprobs(job.prompt_entries(r, out), texts[i])
            yield f"data: {_chunk_json(chunk(r.index, text, [], None, prompt), usage_wanted)}\n\n"
        toks, entries = job.generated(new, out)
        generated += len(toks)
        if job.score_only and reason is None:
            continue
        if job.tools:                           # its calls are known once it has ended
            replies[i] += delta
            reply_ids[i] += toks
            if reason is None:
                continue
            content, calls, reason = job.tool_result(replies[i], reason)
            calls = [dict(c, index=k) for k, c in enumerate(calls)] if calls else None
            last = chunk(r.index, content, reply_ids[i], reason, calls=calls)
            yield (f"data: {_chunk_json(last, usage_wanted)}"
                   f"\n\n")
            ended.add(i)
            continue
        if reason is None and entries is None:
            head, mid, tail = templates[r.index]
            text = json.dumps(delta, ensure_ascii=False)
            yield (f"{head}{text}{mid}{','.join(map(str, toks))}{tail}" if mid is not None
                   else f"{head}{text}{tail}")
            continue
        logprobs = None
        if entries is not None:
            logprobs = job.chat_logprobs(entries, texts[i]) if chat else \
                job.completion_logprobs(entries, texts[i])
        text = "" if job.score_only else delta
        yield (f"data: {_chunk_json(chunk(r.index, text, toks, reason, logprobs), usage_wanted)}"
               f"\n\n")
        if reason is not None:
            ended.add(i)
    if len(ended) < len(job.requests):              # the client went away
        return
    if usage_wanted:
        usage = Chunk(id=rid, created=created, model=model, choices=[],
                      usage=job.usage(generated, last_outs))
        yield f"data: {_chunk_json(usage, True)}\n\n"
    yield "data: [DONE]\n\n"
