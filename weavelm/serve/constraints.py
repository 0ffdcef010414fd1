"""Structured output as requests ask for it: OpenAI's `response_format` (json_object,
json_schema), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` and its
newer `structured_outputs`, each turned into one engine `Constraint` (engine/structured.py)."""
from __future__ import annotations

import json
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from weavelm.engine.structured import Constraint


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one of these."""
    model_config = ConfigDict(extra="forbid")
    json_: Optional[Union[dict, str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


def request_constraint(req):
    """The structured-output Constraint a completions or chat request asks for (OpenAI's
    `response_format`, vLLM's `guided_*` or `structured_outputs`: one of them), or None."""
    found = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", Constraint("json")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ValueError("response_format json_schema needs json_schema.schema")
        found.append(("response_format", Constraint("json", json.dumps(
            rf.json_schema.schema_))))
    so = req.structured_outputs
    pairs = [("guided_json", "json", req.guided_json),
             ("guided_regex", "regex", req.guided_regex),
             ("guided_choice", "choice", req.guided_choice),
             ("guided_grammar", "grammar", req.guided_grammar)]
    if so is not None:
        pairs += [("structured_outputs", "json", so.json_),
                  ("structured_outputs", "regex", so.regex),
                  ("structured_outputs", "choice", so.choice),
                  ("structured_outputs", "grammar", so.grammar)]
        if so.json_object:
            found.append(("structured_outputs", Constraint("json")))
    for name, kind, value in pairs:
        if value is None:
            continue
        if kind == "json" and isinstance(value, dict):
            value = json.dumps(value)
        if kind == "choice":
            value = tuple(value)
        try:
            found.append((name, Constraint(kind, value)))
        except Exception as e:              # WeavelmError: one line naming the problem
            raise ValueError(f"{name}: {e}") from None
    if len(found) > 1:
        raise ValueError(f"{found[0][0]} and {found[1][0]} both constrain the output: "
                         f"send one")
    return found[0][1] if found else None
