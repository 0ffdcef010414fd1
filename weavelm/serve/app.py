"""The OpenAI-compatible HTTP app (FastAPI) over an `EngineLoop`.

    POST /v1/completions, POST /v1/chat/completions   (stream: true = server-sent events)
    GET  /v1/models, /v1/models/{id}, /version, /health, /metrics
    POST /tokenize, /detokenize

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
field (including malformed JSON) or a prompt over the context, 401 without the API key (when
the server has one), 404 for an unknown route or model, 413 for a body over `max_body`, 503
while the model loads (or if it failed to).
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from weavelm.serve.handling import Served, chat_ids, check_tokens, prompt_ids, results
from weavelm.serve.protocol import (APIError, ChatChoice, ChatCompletion, ChatRequest,
                                    Completion, CompletionChoice,
                                    CompletionRequest, Delta, DetokenizeRequest, ModelCard,
                                    ModelList, TokenizeRequest, error_body)
from weavelm.serve.responses import Job
from weavelm.serve.streaming import collect, stream

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


class ApiKey:
    """Every route but /health and /metrics needs `Authorization: Bearer <key>` (401 in
    OpenAI's shape otherwise). The key is compared in constant time and never logged."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        import hmac
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        what = "no API key was given" if not given else "the API key is not this server's"
        response = _error(401, f"{what}: send the server's key as 'Authorization: Bearer KEY' "
                               f"(the openai client's api_key)", code="invalid_api_key")
        return await response(scope, receive, send)


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


def create_app(loop, served_name: str, metrics, max_body: int = MAX_BODY,
               shutdown_timeout_s: float = 10.0, parse_special_tokens: bool = False,
               api_key: str | None = None, tool_parser: str | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio
        loop.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(loop.stop, shutdown_timeout_s)

    app = FastAPI(title="weavelm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=max_body)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)         # outermost: checked before the body
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
                                     parse_special_tokens, tool_parser)
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
        if param is None:           # a field refused by name (protocol._Sampling._unsupported)
            import re
            named = re.match(r"(?:unknown field '(\w+)'|(\w+)(?: is not supported|=\d| needs))",
                             msg)
            param = next((g for g in named.groups() if g), None) if named else None
            if param is not None:
                return _error(400, msg, param, "unsupported_field")
        return _error(400, f"{param + ': ' if param else ''}{msg}", param,
                      str(err.get("type")) if err.get("type") else None)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 404:
            return _error(404, f"no route {request.url.path}: the API is /v1/completions, "
                               f"/v1/chat/completions, /v1/models, /tokenize, /detokenize, "
                               f"/version, /health and /metrics", code="unknown_url")
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
        """The served model, if the request names it or none (404 otherwise, as OpenAI)."""
        s = served()
        if name is not None and name != s.name:
            raise APIError(404, f"model {name!r} is not served here: this server serves "
                                f"{s.name!r}", "model", "model_not_found")
        return s

    @app.get("/v1/models/{name:path}", response_model=ModelCard)
    async def model(name: str):
        s = served_as(name)
        return ModelCard(id=s.name, max_model_len=s.max_model_len)

    @app.get("/version")
    async def version():
        from weavelm import __version__
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        s = served_as(req.model)
        if req.messages is not None:
            ids = await asyncio.to_thread(chat_ids, s, req.messages)
        elif req.prompt is not None:
            ids = await asyncio.to_thread(prompt_ids, s, req.prompt)
        else:
            raise APIError(400, "send a prompt or messages to tokenize", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": s.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        s = served_as(req.model)
        check_tokens(s, req.tokens)
        if s.tokenizer is None:
            raise APIError(400, "this server has no tokenizer (random weights of a shape)",
                           "tokens")
        return {"prompt": s.tokenizer.decode(req.tokens)}

    async def answer(s: Served, req, request: Request, prompts: list[list[int]], texts,
                     max_tokens, default_max, chat: bool, tools=None):
        """Runs a request (one engine request per prompt and sample): its event stream, or its
        whole response."""
        job = Job.plan(s, req, prompts, texts, max_tokens, default_max, chat, tools)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gens = [results(loop, f"{rid}-{r.index}", r.ids, r.params, req.stops(), s.tokenizer,
                        None if req.stream else request.is_disconnected,
                        bool(req.include_stop_str_in_output))
                for r in job.requests]
        if req.stream:
            return EventStream(stream(gens, job, rid, s.name, req))
        done = await asyncio.gather(*map(collect, gens), return_exceptions=True)
        for d in done:
            if isinstance(d, BaseException):
                raise d
        ids = bool(req.return_token_ids)
        choices, generated = [], 0
        for r, (text, toks, reason, out) in zip(job.requests, done):
            toks, entries = job.generated(toks, out)
            generated += len(toks)
            if chat:
                content, calls, reason = job.tool_result(text, reason)
                choices.append(ChatChoice(
                    index=r.index, message=Delta(role="assistant", content=content,
                                                 tool_calls=calls),
                    finish_reason=reason, token_ids=toks if ids else None,
                    logprobs=job.chat_logprobs(entries, job.texts(r))
                    if entries is not None else None,
                    prompt_logprobs=job.vllm_prompt_logprobs(out)))
                continue
            head = job.echo_text(r) if job.echo else ""
            text = head + ("" if job.score_only else text)
            logprobs = None
            if entries is not None:
                prompt = job.prompt_entries(r, out) if job.echo else []
                logprobs = job.completion_logprobs(prompt + entries, job.texts(r))
            choices.append(CompletionChoice(
                index=r.index, text=text, finish_reason=reason, logprobs=logprobs,
                token_ids=toks if ids else None,
                prompt_token_ids=r.ids if ids and len(prompts) > 1 else None,
                prompt_logprobs=job.vllm_prompt_logprobs(out)))
        cls = ChatCompletion if chat else Completion
        return cls(id=rid, model=s.name, usage=job.usage(generated, [d[3] for d in done]),
                   choices=choices,
                   prompt_token_ids=prompts[0] if ids and len(prompts) == 1 else None)

    @app.post("/v1/completions", response_model=Completion)
    async def completions(req: CompletionRequest, request: Request):
        s = served_as(req.model)
        prompts = req.prompt_list()
        ids = await asyncio.to_thread(lambda: [prompt_ids(s, p) for p in prompts])
        texts = [p if isinstance(p, str) else None for p in prompts]
        return await answer(s, req, request, ids, texts, req.max_tokens, COMPLETION_MAX_TOKENS,
                            chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(req: ChatRequest, request: Request):
        s = served_as(req.model)
        tools = req.tools if req.tools and req.tool_choice != "none" else None
        ids = await asyncio.to_thread(chat_ids, s, req.messages, tools)
        return await answer(s, req, request, [ids], [None],
                            req.max_completion_tokens or req.max_tokens, None, chat=True,
                            tools=tools)

    return app
