"""The OpenAI HTTP API's requests and responses as pydantic models, and its error shape.

Only what weavelm honours is accepted; any other field is refused with a 400 naming it (never
dropped). Extensions (vLLM's names): `top_k` (0 or -1 = off), `ignore_eos`, `prompt_logprobs`,
and `return_token_ids` (each choice then carries its `token_ids`, so a client of a
tokenizer-less server, `weavelm serve --shape`, sees what was generated).
"""
from __future__ import annotations

import time
from typing import ClassVar, Literal, Optional, Union

from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_serializer,
    model_validator,
)

from weavelm.engine.sampler import MAX_LOGPROBS
from weavelm.serve.constraints import (ResponseFormat, StructuredOutputs,
                                       request_constraint)
from weavelm.serve.tools import NamedToolChoice, Tool, ToolCall


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
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[StrictBool] = False


# Fields of OpenAI's or vLLM's API that weavelm does not honour yet: a request that sets one
# (to anything but its neutral value) is refused by name, never run without it.
UNSUPPORTED = {
    "tools": ([], None), "tool_choice": ("none", None), "functions": ([], None),
    "function_call": ("none", None),
    "guided_decoding_backend": (None, "xgrammar", "auto"), "guided_whitespace_pattern": (None,),
    "skip_special_tokens": (True, None), "spaces_between_special_tokens": (True, None),
    "truncate_prompt_tokens": (None,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "use_beam_search": (False, None), "length_penalty": (1, 1.0, None),
    "add_generation_prompt": (True, None), "continue_final_message": (False, None),
    "add_special_tokens": (None,), "documents": (None,), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "mm_processor_kwargs": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,),
    "priority": (0, None), "request_id": (None,), "logits_processors": (None,),
    "suffix": ("", None),
}
# Fields that change nothing in the output (OpenAI's bookkeeping): accepted and not used.
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier",
           "prompt_cache_key", "stream_options"}

MAX_N = 128                       # samples of one prompt (n)
MAX_PROMPTS = 256                 # prompts in one list, and choices (prompts x n) of a request


class _Sampling(BaseModel):
    """Fields common to completions and chat completions. An unknown field is refused by name
    (`UNSUPPORTED` lists what OpenAI and vLLM have that weavelm does not do yet)."""
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
    n: Optional[StrictInt] = Field(1, ge=1, le=MAX_N)
    best_of: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[StrictBool] = False
    # vLLM's: the prompt tokens' log-probabilities with this many alternatives each
    prompt_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: each choice also carries its `token_ids` (and the response `prompt_token_ids`)
    return_token_ids: Optional[StrictBool] = False
    # the controls of the distribution (engine/logit_controls.py)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100, allow_inf_nan=False)
    min_p: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)
    logit_bias: Optional[dict[str, float]] = None
    min_tokens: Optional[StrictInt] = Field(None, ge=0)
    stop_token_ids: Optional[list[StrictInt]] = Field(None, max_length=1024)
    include_stop_str_in_output: Optional[StrictBool] = False
    # structured output (engine/structured.py): OpenAI's response_format, vLLM's guided_* and
    # structured_outputs; at most one of them
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[dict, str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[StructuredOutputs] = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("logit_bias takes at most 1024 tokens")
        for key, value in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not (-100 <= value <= 100) or value != value:
                raise ValueError(f"logit_bias values are in [-100, 100], got {value}")
        return v

    def bias(self) -> dict[int, float] | None:
        return {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias \
            else None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(s == "" for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED:
                continue
            if name not in UNSUPPORTED:
                raise ValueError(f"unknown field {name!r}: weavelm does not know it; leave it "
                                 f"out (see the README's table of supported fields)")
            if not any(value == neutral and type(value) is type(neutral)
                       or value is neutral for neutral in UNSUPPORTED[name]):
                raise ValueError(f"{name} is not supported by weavelm yet: leave it out")
        if self.best_of not in (None, self.n or 1):
            raise ValueError(f"best_of={self.best_of} is not supported: weavelm returns every "
                             f"sequence it samples; send n instead")
        return self

    @model_validator(mode="after")
    def _one_constraint(self):
        self.constraint()                   # a bad schema or two constraints: a 400 here
        return self

    def constraint(self):
        """The structured-output Constraint the request asks for, or None."""
        return request_constraint(self)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    max_tokens: Optional[StrictInt] = Field(None, ge=0)   # 0: with echo, score the prompt only
    echo: Optional[StrictBool] = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and (not v or len(v) > MAX_PROMPTS and not isinstance(v[0], int)):
            raise ValueError(f"prompt must be a string, a token-id list, or a list of 1 to "
                             f"{MAX_PROMPTS} of those")
        return v

    @model_validator(mode="after")
    def _choices(self):
        if len(self.prompt_list()) * (self.n or 1) > MAX_PROMPTS:
            raise ValueError(f"prompt: {len(self.prompt_list())} prompts x n={self.n} choices "
                             f"is over {MAX_PROMPTS}: send fewer in one request")
        return self

    def prompt_list(self) -> list:
        """The request's prompts: one per choice group (a list of strings or of id lists)."""
        v = self.prompt
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]
        return list(v)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None         # an assistant's calls
    tool_call_id: Optional[str] = None                  # a tool's answer to one

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message "
                             f"with tool_calls may have none)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[StrictBool] = None

    @model_validator(mode="after")
    def _tool_choice(self):
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tools: two functions have the same name")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not in "
                             f"tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if names and self.constraint() is not None and choice not in (None, "none"):
            raise ValueError("tools and a structured-output field both constrain the output: "
                             "send one")
        return self

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


# -- responses ------------------------------------------------------------------------------------
class _Optional(BaseModel):
    """Keys in `_drop` appear only when set: weavelm's extensions (token ids, prompt
    log-probabilities) only for requests that ask, and a delta without a role has no role."""
    _drop: ClassVar[tuple] = ()

    @model_serializer(mode="wrap")
    def _without_unset(self, handler):
        data = handler(self)
        for key in self._drop:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0                  # prompt tokens found in the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class _Response(_Optional):
    """The envelope of a completion, chat completion or chunk; each sets `object` and the type
    of its choices (fields keep this order in the JSON when a subclass redeclares them)."""
    _drop: ClassVar[tuple] = ("prompt_token_ids",)
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list
    usage: Optional[Usage] = None
    prompt_token_ids: Optional[list[int]] = None      # return_token_ids, one prompt


class CompletionLogprobs(BaseModel):
    """The legacy completions format: per token its text, log-probability, the most likely
    alternatives (text: log-probability) and where its text starts in the choice's text."""
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class CompletionChoice(_Optional):
    _drop: ClassVar[tuple] = ("token_ids", "prompt_logprobs", "prompt_token_ids")
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[list[int]] = None
    prompt_token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[list] = None


class Completion(_Response):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class Delta(_Optional):
    _drop: ClassVar[tuple] = ("role", "content", "tool_calls")
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[dict]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(_Optional):
    _drop: ClassVar[tuple] = ("token_ids", "prompt_logprobs")
    index: int = 0
    message: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[list] = None


class ChatCompletion(_Response):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class ChatChunkChoice(_Optional):
    _drop: ClassVar[tuple] = ("token_ids",)
    index: int = 0
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[list[int]] = None


class ChatChunk(_Response):
    object: str = "chat.completion.chunk"
    created: int                                  # one time for all the stream's chunks
    choices: list[ChatChunkChoice]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Optional[Union[str, list[StrictInt]]] = None
    messages: Optional[list[ChatMessage]] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    tokens: list[StrictInt]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "weavelm"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
