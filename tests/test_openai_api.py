"""The OpenAI API past plain text, as vLLM's users call it: logprobs (completions and chat),
echo with the prompt's logprobs, `max_tokens: 0`, vLLM's `prompt_logprobs`, `n` and prompt
lists, the API key, the extra routes, and every field weavelm does not do refused by name.

Real servers on 127.0.0.1 (CPU, a tiny Llama whose word-level tokenizer's words are token ids,
so "17" is token 17); the reference is transformers' log_softmax on the same weights (float64).
"""
import json
import math

import httpx
import pytest
import torch

from serve_run import start_server, stop_server
from tiny_models import make_tiny, save_tiny_tokenizer

KEY = "sk-test-9f8e7d6c"
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}7"
PROMPTS = ["5 17 33 8 9", "12 19 7 44", "61 2 90", "3 4 5 6 7 8 9 10"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("openai_api")
    path = root / "tiny"
    make_tiny("llama", path, seed=5, heads=4, kv_heads=2)
    save_tiny_tokenizer(path)
    (root / "template.jinja").write_text(TEMPLATE)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()
    return path, root / "template.jinja", hf


def _server(tiny, tp, log, *extra):
    path, template, _ = tiny
    return start_server(path, tp, log, "--chat-template", template, *extra)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc, url, _ = _server(tiny, 1, log, "--api-key", KEY, "--access-log")
    yield url, log
    stop_server(proc)
    log.close()


def _post(url, route, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{route}", json=body, headers=headers, timeout=120)


def _stream(url, route, body):
    """The JSON chunks of a streamed request (and whether it ended with [DONE])."""
    chunks, done = [], False
    with httpx.stream("POST", f"{url}{route}", json=dict(body, stream=True), timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    assert done
    return chunks


def _reference(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)


def _ids(text):
    return [int(w) for w in text.split()]


def _check_completion_logprobs(hf, prompt_ids, generated, lp, k, echo):
    """The completions format against the reference: per token its logprob and its k most
    likely alternatives (their text is their id here)."""
    ref = _reference(hf, prompt_ids + generated)
    tokens = (prompt_ids if echo else []) + generated
    first = 0 if echo else len(prompt_ids)          # the position of tokens[0]
    assert [int(t) for t in lp["tokens"]] == tokens
    for i, tok in enumerate(tokens):
        pos = first + i
        if pos == 0:
            assert lp["token_logprobs"][i] is None and lp["top_logprobs"][i] is None
            continue
        row = ref[pos - 1]
        assert abs(lp["token_logprobs"][i] - row[tok].item()) < 1e-4, (i, tok)
        top = lp["top_logprobs"][i]
        assert [int(t) for t in top] == row.topk(k).indices.tolist()
        assert all(abs(v - row[int(t)].item()) < 1e-4 for t, v in top.items())


@pytest.mark.parametrize("tp", [1, 2])
def test_completion_logprobs_equal_transformers(tiny, tmp_path, tp):
    """Greedy and seeded-sampled, streamed and not, with echo; TP 1 and TP 2."""
    hf = tiny[2]
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = _server(tiny, tp, log, "--api-key", KEY)
        try:
            for sampled in (False, True):
                body = dict(prompt=PROMPTS[0], max_tokens=5, logprobs=3, echo=True,
                            return_token_ids=True, ignore_eos=True,
                            temperature=1.0 if sampled else 0, seed=4 if sampled else None)
                r = _post(url, "/v1/completions", body)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                assert choice["text"].startswith(PROMPTS[0])
                _check_completion_logprobs(hf, _ids(PROMPTS[0]), choice["token_ids"],
                                           choice["logprobs"], 3, echo=True)
                chunks = _stream(url, "/v1/completions", body)
                tokens, lps, offsets = [], {"tokens": [], "token_logprobs": [],
                                            "top_logprobs": []}, []
                for c in chunks:
                    for ch in c["choices"]:
                        tokens += ch.get("token_ids") or []
                        for key in lps:
                            lps[key] += ch["logprobs"][key]
                        offsets += ch["logprobs"]["text_offset"]
                assert tokens == choice["token_ids"]
                _check_completion_logprobs(hf, _ids(PROMPTS[0]), tokens, lps, 3, echo=True)
                assert offsets == choice["logprobs"]["text_offset"]
        finally:
            stop_server(proc)


def test_chat_logprobs_equal_transformers(tiny, server):
    url, _ = server
    hf = tiny[2]
    body = dict(messages=[{"role": "user", "content": "12 19 7"}], max_tokens=4,
                temperature=0, logprobs=True, top_logprobs=2, return_token_ids=True,
                ignore_eos=True)
    r = _post(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt = [12, 19, 7, 7]                               # the template appends 7
    ref = _reference(hf, prompt + choice["token_ids"])
    content = choice["logprobs"]["content"]
    assert [int(e["token"]) for e in content] == choice["token_ids"]
    for i, e in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert abs(e["logprob"] - row[int(e["token"])].item()) < 1e-4
        assert [int(t["token"]) for t in e["top_logprobs"]] == row.topk(2).indices.tolist()
        assert e["bytes"] == list(e["token"].encode())
    streamed = [e for c in _stream(url, "/v1/chat/completions", body) for ch in c["choices"]
                if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert streamed == content


def test_scoring_a_batch_of_prompts_as_lm_eval_does(tiny, server):
    """lm-evaluation-harness's loglikelihood request: 4 token-id prompts, echo, logprobs 1,
    max_tokens 0 or 1; and vLLM's prompt_logprobs on the same request."""
    url, _ = server
    hf = tiny[2]
    prompts = [_ids(p) for p in PROMPTS]
    for max_tokens in (0, 1):
        r = _post(url, "/v1/completions", dict(prompt=prompts, max_tokens=max_tokens, echo=True,
                                               logprobs=1, temperature=0, prompt_logprobs=2,
                                               return_token_ids=True))
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        for ids, c in zip(prompts, choices):
            assert c["prompt_token_ids"] == ids
            assert len(c["token_ids"]) == max_tokens
            _check_completion_logprobs(hf, ids, c["token_ids"], c["logprobs"], 1, echo=True)
            ref = _reference(hf, ids)
            assert c["prompt_logprobs"][0] is None
            for i, entry in enumerate(c["prompt_logprobs"][1:], start=1):
                assert abs(entry[str(ids[i])]["logprob"] - ref[i - 1][ids[i]].item()) < 1e-4
                ranked = sorted((v["rank"], int(t)) for t, v in entry.items() if "rank" in v)
                assert [t for _, t in ranked] == ref[i - 1].topk(2).indices.tolist()
        assert r.json()["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_n_samples_differ_and_repeat_with_a_seed(server):
    url, _ = server
    body = dict(prompt=PROMPTS[1], max_tokens=8, n=3, seed=21, temperature=1.0,
                ignore_eos=True, return_token_ids=True)
    first = _post(url, "/v1/completions", body).json()
    again = _post(url, "/v1/completions", body).json()
    seqs = [c["token_ids"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert len(seqs) == 3 and len({tuple(s) for s in seqs}) == 3
    assert seqs == [c["token_ids"] for c in sorted(again["choices"], key=lambda c: c["index"])]
    assert first["usage"]["completion_tokens"] == 24
    chunks = _stream(url, "/v1/completions", body)
    streamed = {i: [] for i in range(3)}
    for c in chunks:
        for ch in c["choices"]:
            streamed[ch["index"]] += ch["token_ids"]
    assert [streamed[i] for i in range(3)] == seqs


def test_streamed_usage_and_deltas_as_openai_sends_them(server):
    url, _ = server
    body = dict(messages=[{"role": "user", "content": "5 6"}], max_tokens=3, temperature=0)
    plain = _stream(url, "/v1/chat/completions", body)
    assert all("usage" not in c for c in plain)
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] and "token_ids" not in c["choices"][0]
               for c in plain[1:])
    asked = _stream(url, "/v1/chat/completions",
                    dict(body, stream_options={"include_usage": True}))
    assert all(c["usage"] is None for c in asked[:-1])
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 3
    assert asked[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    whole = _post(url, "/v1/chat/completions", body).json()
    assert "token_ids" not in whole["choices"][0] and "prompt_token_ids" not in whole


def test_the_api_key_guards_every_route_but_health_and_metrics(server):
    url, log = server
    for key in (None, "wrong-key"):
        r = _post(url, "/v1/completions", dict(prompt="5 6", max_tokens=1), key=key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", timeout=10,
                         headers={"Authorization": f"Bearer {key}"} if key else {}
                         ).status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    assert _post(url, "/v1/completions", dict(prompt="5 6", max_tokens=1)).status_code == 200
    log.flush()
    with open(log.name) as f:
        assert KEY not in f.read()


def test_the_extra_routes(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/v1/models/tiny", headers=auth).json()["id"] == "tiny"
    missing = httpx.get(f"{url}/v1/models/gpt-9", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert _post(url, "/tokenize", {"prompt": "5 17 33"}).json()["tokens"] == [5, 17, 33]
    chat = _post(url, "/tokenize", {"messages": [{"role": "user", "content": "5"}]}).json()
    assert chat["tokens"] == [5, 7]
    assert _post(url, "/detokenize", {"tokens": [5, 17]}).json() == {"prompt": "5 17"}
    assert _post(url, "/detokenize", {"tokens": [5, 1000]}).status_code == 400
    from weavelm import __version__
    assert httpx.get(f"{url}/version", headers=auth).json() == {"version": __version__}
    r = _post(url, "/v1/completions", dict(prompt="5", model="gpt-9"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# vLLM's and OpenAI's fields that weavelm does not do yet: each is refused by name, never
# dropped (a guided_choice that returned free text was the failure; structured output is
# tests/test_structured_output.py's).
NOT_YET = {
    "guided_whitespace_pattern": " ", "guided_decoding_backend": "outlines",
    "functions": [{"name": "f"}], "function_call": "auto", "best_of": 3, "suffix": "end",
    "no_such_field": 1,
}


@pytest.mark.parametrize("field", list(NOT_YET))
def test_a_field_weavelm_does_not_do_is_refused_by_name(server, field):
    url, _ = server
    for route, body in (("/v1/completions", {"prompt": "5 6"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                "content": "5"}]})):
        r = _post(url, route, dict(body, max_tokens=1, **{field: NOT_YET[field]}))
        assert r.status_code == 400, (field, route, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"], err
        assert "\n" not in err["message"]


@pytest.mark.parametrize("body,needle", [
    (dict(prompt="5", logprobs=21), "logprobs"), (dict(prompt="5", logprobs=True), "logprobs"),
    (dict(prompt="5", max_tokens=0), "echo"), (dict(prompt="5", n=129), "n"),
    (dict(prompt=[[5]] * 257), "prompt"), (dict(prompt=[[5]] * 20, n=20), "prompt"),
    (dict(prompt="5", prompt_logprobs=-1), "prompt_logprobs")])
def test_bad_values_of_the_new_fields_are_one_line(server, body, needle):
    url, _ = server
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]


def test_sampling_controls_through_the_server(server):
    """logit_bias, stop_token_ids, min_tokens and include_stop_str_in_output change the answer
    as they say; penalties are taken (their formulas: tests/test_logit_controls.py)."""
    url, _ = server

    def ids(**kw):
        r = _post(url, "/v1/completions", dict(dict(prompt="5 17 33", max_tokens=5,
                                                    temperature=0, return_token_ids=True), **kw))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]
    assert ids(logit_bias={"42": 100}, ignore_eos=True)["token_ids"] == [42] * 5
    stopped = ids(logit_bias={"42": 100}, stop_token_ids=[42])
    assert stopped["token_ids"] == [42] and stopped["finish_reason"] == "stop"
    late = ids(logit_bias={"42": 100, "43": 50}, stop_token_ids=[42], min_tokens=2)
    assert late["token_ids"] == [43, 43, 42]
    plain = ids(logit_bias={"42": 100, "43": 50}, max_tokens=4, ignore_eos=True,
                stop=["43"])
    assert plain["text"] == "42 42 42 42"
    cut = ids(logit_bias={"44": 100}, max_tokens=4, ignore_eos=True, stop=["44 44"])
    kept = ids(logit_bias={"44": 100}, max_tokens=4, ignore_eos=True, stop=["44 44"],
               include_stop_str_in_output=True)
    assert cut["text"] == "" and kept["text"] == "44 44"
    penalized = ids(max_tokens=12, frequency_penalty=2, presence_penalty=1,
                    repetition_penalty=1.5, min_p=0.05, ignore_eos=True)
    assert len(set(penalized["token_ids"])) > 6


@pytest.mark.parametrize("body,needle", [
    (dict(presence_penalty=3), "presence_penalty"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={"5": 500}), "logit_bias"), (dict(logit_bias={"500": 1}), "vocabulary"),
    (dict(min_p=2), "min_p"), (dict(stop_token_ids=[5000]), "vocabulary"),
    (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_controls_are_400s(server, body, needle):
    url, _ = server
    r = _post(url, "/v1/completions", dict(prompt="5 6", max_tokens=2, **body))
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"], r.json()


def test_a_constraint_the_vocabulary_cannot_spell_is_one_line(server):
    """The tiny tokenizer's words are numbers: "apple" cannot be written in them."""
    url, _ = server
    r = _post(url, "/v1/completions", dict(prompt="5 6", max_tokens=3,
                                           guided_choice=["apple", "pear"]))
    assert r.status_code == 400 and "cannot be written" in r.json()["error"]["message"]
    ok = _post(url, "/v1/completions", dict(prompt="5 6", max_tokens=3, temperature=0,
                                            guided_regex="(1|2)3"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("1 3", "2 3", "13",
                                                                          "23"), ok.text


def test_chat_top_logprobs_needs_logprobs(server):
    url, _ = server
    r = _post(url, "/v1/chat/completions", dict(messages=[{"role": "user", "content": "5"}],
                                                top_logprobs=2))
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


def test_probabilities_sum_to_one(server):
    """The alternatives' logprobs are a distribution's: all 103 of them sum to about 1."""
    url, _ = server
    r = _post(url, "/v1/completions", dict(prompt="5 6", max_tokens=1, temperature=0,
                                           logprobs=20))
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 20 and 0.2 < sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6
