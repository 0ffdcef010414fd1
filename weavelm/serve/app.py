"""The OpenAI-compatible HTTP app (FastAPI) over an `EngineLoop`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true = server-sent events)
    GET  /v1/models, /health, /metrics

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (including malformed JSON), a prompt over the context or an unknown model name, 404 for
an unknown route, 413 for a body over `max_body`, 503 while the model loads (or if it failed to).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from weavelm.serve.handling import Served, chat_ids, prompt_ids, results, sampling
from weavelm.serve.protocol import (APIError, ChatChoice, ChatChunk, ChatChunkChoice,
                                    ChatCompletion, ChatRequest, Completion, CompletionChoice,
                                    CompletionRequest, Delta, ModelCard, ModelList, Usage,
                                    error_body)

MAX_BODY = 8 << 20                 # bytes of one request body
COMPLETION_MAX_TOKENS = 16         # OpenAI's default for /v1/completions (chat: the context)


STALL_S = 10.0       # /health answers 503 once open requests wait this long for a step


def _error(status: int, message: str, param=None, code=None, type="invalid_request_error"):
    return JSONResponse(error_body(message, type, param, code), status_code=status)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413 (by Content-Length, or while reading them)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) <= self.limit:
            return await self.app(scope, receive, send)
        body, more, size = [], True, 0
        while more:                                  # read it all: the client gets its answer
            msg = await receive()
            if msg["type"] != "http.request":
                return
            size += len(msg.get("body", b""))
            if size <= self.limit:
                body.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        if size > self.limit:
            response = _error(413, f"the request body has {size} bytes, over the limit of "
                                   f"{self.limit}: send a smaller request", code="body_too_large")
            return await response(scope, receive, send)
        replayed = False

        async def replay():                          # the body once, then the real channel
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}
        return await self.app(scope, replay, send)


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends (a client that
    goes away has its request aborted in the engine at once)."""

    def __init__(self, gen):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json() if hasattr(obj, 'model_dump_json') else json.dumps(obj)}\n\n"


def _end_error(reason: str) -> APIError:
    if reason == "abort":
        return APIError(503, "the request was cancelled: the server is shutting down",
                        type="server_error", code="cancelled")
    if reason.startswith("error: the engine"):
        return APIError(500, reason[len("error: "):], type="server_error")
    return APIError(400, reason[len("error: "):])


def create_app(loop, served_name: str, metrics, max_body: int = MAX_BODY,
               shutdown_timeout_s: float = 10.0, parse_special_tokens: bool = False) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio
        loop.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(loop.stop, shutdown_timeout_s)

    app = FastAPI(title="weavelm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    state: dict = {}

    def served() -> Served:
        if loop.error is not None:
            what = "the model failed to load: " if loop.engine is None else ""
            raise APIError(503, f"{what}{loop.error}: see the server's log and restart it",
                           type="server_error")
        if not loop.ready.is_set():
            raise APIError(503, "the model is loading: retry in a moment", type="server_error",
                           code="loading")
        if "served" not in state:
            engine = loop.engine
            blocks = engine.runner.blocks
            state["served"] = Served(served_name, loop.tokenizer, engine.model_config.vocab_size,
                                     engine.max_model_len, blocks.capacity * blocks.block_size,
                                     parse_special_tokens)
        return state["served"]

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON "
                               f"({err.get('ctx', {}).get('error', 'parse error')}): send a JSON "
                               f"object")
        param = ".".join(loc) or None
        if param is None and err.get("type") in ("model_attributes_type", "dict_type",
                                                 "model_type", "missing"):
            return _error(400, "the request body is missing or not a JSON object: send one, "
                               "with Content-Type: application/json")
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        return _error(400, f"{param + ': ' if param else ''}{msg}", param,
                      str(err.get("type")) if err.get("type") else None)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 404:
            return _error(404, f"no route {request.url.path}: the API is /v1/completions, "
                               f"/v1/chat/completions, /v1/models, /health and /metrics",
                          code="unknown_url")
        if e.status_code == 405:
            return _error(405, f"method {request.method} is not allowed on {request.url.path}: "
                               f"the completions take POST, the others GET")
        return _error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        served()
        stalled = loop.stalled_seconds()
        if stalled > STALL_S:
            raise APIError(503, f"the engine has made no step for {stalled:.0f} s with requests "
                                f"open (a rank stopped or stuck?): see the server's log",
                           type="server_error", code="stalled")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        s = served()
        return ModelList(data=[ModelCard(id=s.name, max_model_len=s.max_model_len)])

    def served_as(name) -> Served:
        """The served model, if the request names it or none (400 otherwise)."""
        s = served()
        if name is not None and name != s.name:
            raise APIError(400, f"model {name!r} is not served here: this server serves "
                                f"{s.name!r}", "model", "model_not_found")
        return s

    async def answer(s: Served, req, request: Request, ids: list[int], max_tokens,
                     default_max, chat: bool):
        """Runs a request whose prompt is `ids`: its event stream, or its whole response."""
        params = sampling(s, req, len(ids), max_tokens, default_max)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gen = results(loop, rid, ids, params, req.stops(), s.tokenizer,
                      None if req.stream else request.is_disconnected)
        if req.stream:
            return EventStream(_stream(gen, rid, s.name, len(ids), req, chat=chat))
        text, toks, reason = await _collect(gen)
        usage = _usage(len(ids), toks)
        if chat:
            return ChatCompletion(id=rid, model=s.name, usage=usage, choices=[ChatChoice(
                message=Delta(role="assistant", content=text), finish_reason=reason,
                token_ids=toks)])
        return Completion(id=rid, model=s.name, usage=usage, choices=[CompletionChoice(
            text=text, finish_reason=reason, token_ids=toks)])

    @app.post("/v1/completions", response_model=Completion)
    async def completions(req: CompletionRequest, request: Request):
        s = served_as(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported: leave it out", "suffix")
        ids = await asyncio.to_thread(prompt_ids, s, req.prompt)   # off the event loop
        return await answer(s, req, request, ids, req.max_tokens, COMPLETION_MAX_TOKENS,
                            chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(req: ChatRequest, request: Request):
        s = served_as(req.model)
        ids = await asyncio.to_thread(chat_ids, s, req.messages)
        return await answer(s, req, request, ids, req.max_completion_tokens or req.max_tokens,
                            None, chat=True)

    return app


def _usage(n_prompt: int, toks: list[int]) -> Usage:
    return Usage(prompt_tokens=n_prompt, completion_tokens=len(toks),
                 total_tokens=n_prompt + len(toks))


async def _collect(gen):
    parts, toks, reason = [], [], None
    async with contextlib.aclosing(gen):
        async for delta, new, reason in gen:
            parts.append(delta)
            toks.extend(new)
    if reason is None:                               # the client went away
        raise APIError(499, "the client closed the request")
    if reason not in ("stop", "length"):
        raise _end_error(reason)
    return "".join(parts), toks, reason


def _chunk_template(chunk, key: str) -> tuple[str, str, str]:
    """A chunk's JSON cut around its (empty) text and (empty) token ids, so each token's chunk
    is two string joins instead of a model build and dump (the same JSON)."""
    s = chunk.model_dump_json()
    i = s.index(f'"{key}":""') + len(key) + 3
    j = s.index('"token_ids":[]') + len('"token_ids":[')
    return "data: " + s[:i], s[i + 2:j], s[j:] + "\n\n"


async def _stream(gen, rid: str, model: str, n_prompt: int, req, chat: bool):
    """The request's server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
    created, toks = int(time.time()), []
    if chat:
        yield _sse(ChatChunk(id=rid, created=created, model=model, choices=[
            ChatChunkChoice(delta=Delta(role="assistant", content=""))]))
        head, mid, tail = _chunk_template(ChatChunk(id=rid, created=created, model=model,
                                                    choices=[ChatChunkChoice(
                                                        delta=Delta(content=""))]), "content")
    else:
        head, mid, tail = _chunk_template(Completion(id=rid, created=created, model=model,
                                                     choices=[CompletionChoice(text="")]),
                                          "text")
    async with contextlib.aclosing(gen):
        async for delta, new, reason in gen:
            toks.extend(new)
            if reason is None:
                yield (f"{head}{json.dumps(delta, ensure_ascii=False)}{mid}"
                       f"{','.join(map(str, new))}{tail}")
                continue
            if reason not in ("stop", "length"):
                yield _sse(_end_error(reason).body())
                break
            usage = _usage(n_prompt, toks)
            if chat:
                chunk = ChatChunk(id=rid, created=created, model=model, usage=usage, choices=[
                    ChatChunkChoice(delta=Delta(content=delta), finish_reason=reason,
                                    token_ids=new)])
            else:
                chunk = Completion(id=rid, created=created, model=model, usage=usage, choices=[
                    CompletionChoice(text=delta, finish_reason=reason, token_ids=new)])
            yield _sse(chunk)
            if req.stream_options and req.stream_options.include_usage:
                cls = ChatChunk if chat else Completion
                yield _sse(cls(id=rid, created=created, model=model, choices=[], usage=usage))
    yield "data: [DONE]\n\n"
