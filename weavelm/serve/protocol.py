"""The OpenAI HTTP API's requests and responses as pydantic models, and its error shape.

Only what weavelm can honour is accepted: one choice (`n=1`), no log-probabilities, no echo, no
penalties; anything else is refused with a 400 naming the field. Extensions (as vLLM's):
`top_k` (0 or -1 = off) and `ignore_eos` in requests; `token_ids` in every choice and chunk, so
a client of a tokenizer-less server (`weavelm serve --shape`) still sees what was generated.
"""
from __future__ import annotations

import time
from typing import Literal, Optional, Union

from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator,
)


class APIError(Exception):
    """An error the client caused (or a server state it must know), sent in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                      code, type)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields weavelm cannot honour, and the values of theirs that change nothing.
UNSUPPORTED = {"tools": ([], None), "functions": ([], None), "tool_choice": ("none", None),
               "logit_bias": ({}, None), "best_of": (1, None), "top_logprobs": (0, None),
               "response_format": ({"type": "text"}, None)}


class _Sampling(BaseModel):
    """Fields common to completions and chat completions (other unknown fields are ignored)."""
    model_config = ConfigDict(extra="allow")

    # Strict types: "2" is not a number, true is not 2, "yes" is not a boolean, Infinity is
    # not a temperature. null is the default, as OpenAI takes it.
    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[StrictInt] = 1
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[StrictBool] = False
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v not in (None, 1):
            raise ValueError(f"n={v} is not supported: weavelm returns one choice per request; "
                             f"send n=1 (or several requests)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v not in (None, 0):
            raise ValueError("penalties are not supported: leave them out or send 0")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported: leave the field out")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ValueError(f"{name} is not supported by weavelm: leave it out")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    echo: Optional[StrictBool] = False
    suffix: Optional[str] = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported: leave it out")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)


# -- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    """The envelope of a completion, chat completion or chunk; each sets `object` and the type
    of its choices (fields keep this order in the JSON when a subclass redeclares them)."""
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Optional[str] = None
    logprobs: None = None
    token_ids: list[int] = []


class Completion(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class Delta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int = 0
    message: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None
    token_ids: list[int] = []


class ChatCompletion(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[str] = None
    logprobs: None = None
    token_ids: list[int] = []


class ChatChunk(_Response):
    object: str = "chat.completion.chunk"
    created: int                                  # one time for all the stream's chunks
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "weavelm"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
