"""Tool calling as OpenAI's API has it: the request's `tools` and `tool_choice`, the messages'
`tool_calls` and `role: "tool"` answers, and the calls in a response.

How a call is made: `tool_choice` "required" or a named function constrains the output
(structured output) to the calls' JSON, so it always parses; "auto" lets the model write what
it likes and a parser (`--tool-call-parser`, vLLM's names) finds the calls in its text: `hermes`
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, Qwen's and Hermes' templates) or
`llama3_json` (a JSON object `{"name": ..., "parameters": {...}}`, Llama 3.1's); "none" (or no
tools) leaves the tools out of the prompt. The tools reach the model through its chat template
(`tools=`), as transformers renders them.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Literal, Optional

from pydantic import BaseModel, Field

from weavelm.engine.structured import Constraint

PARSERS = ("hermes", "llama3_json")


class FunctionCall(BaseModel):
    name: str
    arguments: str                              # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


def template_messages(messages) -> list[dict]:
    """The messages as chat templates take them (transformers' convention): text content,
    tool calls with their arguments as objects, a tool answer with its call's id."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text() if m.content is not None else None}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_tools(tools) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in tools]


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_constraint(tools, choice, parallel: bool | None = None) -> Constraint | None:
    """The constraint that makes the output the calls' JSON: for a named function, its
    arguments; for "required", a list of one or more {"name", "parameters"} objects (one at
    most when `parallel` is False)."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return Constraint("json", json.dumps(_parameters(tool)))
    if choice == "required":
        one = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "parameters": _parameters(t)},
                "required": ["name", "parameters"]} for t in tools]
        calls = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
        if parallel is False:
            calls["maxItems"] = 1
        return Constraint("json", json.dumps(calls))
    return None


def _call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                   ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


def constrained_calls(text: str, choice) -> list[dict]:
    """The calls of an output written under `tool_constraint`."""
    if isinstance(choice, NamedToolChoice):
        json.loads(text)                    # ValueError if max_tokens cut it short
        return [_call(choice.function.name, text)]
    return [_call(c["name"], c.get("parameters", {})) for c in json.loads(text)]


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_calls(parser: str, text: str, names) -> tuple[str | None, list[dict]]:
    """(content, calls) of a freely written output: the text outside the calls (None if
    empty) and the calls to functions among `names` that parse; text that does not parse
    as a call stays content."""
    calls = []
    if parser == "hermes":
        for body in _HERMES.findall(text):
            try:
                obj = json.loads(body)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("name") in names:
                calls.append(_call(obj["name"], obj.get("arguments", {})))
        content = text[:text.find("<tool_call>")] if calls else text
    else:                                                   # llama3_json
        body = text.strip().removeprefix("<|python_tag|>").strip()
        for part in body.split(";") if body.startswith("{") else ():
            try:
                obj = json.loads(part)
            except ValueError:
                calls = []
                break
            if not (isinstance(obj, dict) and obj.get("name") in names):
                calls = []
                break
            calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
        content = "" if calls else text
    content = content.strip()
    return (content or None) if calls else text, calls
