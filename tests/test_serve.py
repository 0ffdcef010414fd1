"""`weavelm serve` as its clients meet it: real servers on 127.0.0.1 (CPU, a tiny Llama with a
word-level tokenizer whose words are token ids), the official `openai` package as the client,
and `LLM.generate` on the same checkpoint as the reference for every greedy text.

One TP 1 server is shared by the module (it is stopped by SIGINT in the last test); a TP 2
server checks the followers and that SIGTERM ends every rank."""
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_run import start_server as _start, stop_server as _stop
from tiny_models import make_tiny, save_tiny_tokenizer

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 10                   # max_tokens of the compared requests
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}7{% endif %}")


def _prompts(n, seed):
    g = random.Random(seed)
    return [" ".join(str(g.randrange(3, 103)) for _ in range(g.randrange(3, 12)))
            for _ in range(n)]


PROMPTS = _prompts(4, 1)           # compared one by one, streaming and not, chat and not
MANY = _prompts(64, 2)             # the concurrent ones


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint and LLM.generate's texts for every prompt the tests send."""
    path = tmp_path_factory.mktemp("serve") / "tiny"
    make_tiny("llama", path, seed=3)
    save_tiny_tokenizer(path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    from weavelm import LLM, SamplingParams
    llm = LLM(str(path), tp=1, device="cpu", progress=False)
    params = SamplingParams(max_new_tokens=NEW)
    want = {
        "text": [o.text for o in llm.generate(PROMPTS, params)],
        "chat": [o.text for o in llm.generate(PROMPTS, params, chat=True)],
        "many": [o.text for o in llm.generate(MANY, params)],
    }
    return str(path), want


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc, url, loading = _start(tiny[0], 1, log)
    yield proc, url, loading
    _stop(proc)
    log.close()


def _client(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0, **kw)


def _metrics(url) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^(weavelm_[^ ]+) ([-+0-9.e]+)$", text, re.M)}


def _check_same_as_generate(url, want):
    client = _client(url)
    for i, prompt in enumerate(PROMPTS):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW,
                                      temperature=0, extra_body={"return_token_ids": True})
        assert r.choices[0].text == want["text"][i]
        assert r.usage.prompt_tokens >= len(prompt.split())    # the tokenizer may add BOS
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.completion_tokens == len(r.choices[0].token_ids)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks[:-1]) == want["text"][i]
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        # usage once, in a last chunk of its own, as OpenAI streams it
        assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=NEW,
                                           temperature=0)
        assert r.choices[0].message.content == want["chat"][i]
        assert r.choices[0].message.role == "assistant" and r.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                     max_tokens=NEW, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices) == want["chat"][i]


def test_openai_client_gets_generates_text_tp1(server, tiny):
    proc, url, loading = server
    for r in loading:                                # answers before the model was ready
        assert r.status_code == 503 and r.json()["error"]["message"]
    _check_same_as_generate(url, tiny[1])
    models = _client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def _stream_text(client, prompt, deadline):
    async def run():
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])
    return await asyncio.wait_for(run(), deadline)


def test_64_concurrent_streams_all_complete_and_free_the_cache(server, tiny):
    proc, url, _ = server
    want = tiny[1]["many"]

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=120,
                                    max_retries=0)
        try:
            return await asyncio.gather(*[_stream_text(client, p, 120) for p in MANY])
        finally:
            await client.close()
    got = asyncio.run(main())
    assert got == want                               # none lost, none mixed up
    m = _metrics(url)
    assert m["weavelm_requests_running"] == 0 and m["weavelm_requests_waiting"] == 0
    assert m["weavelm_kv_blocks_used"] == 0 and m["weavelm_kv_blocks_total"] > 0
    assert m["weavelm_requests_finished_total{reason=\"error\"}"] == 0


def test_clients_that_disconnect_are_aborted(server, tiny):
    proc, url, _ = server
    before = _metrics(url)['weavelm_requests_finished_total{reason="abort"}']
    body = {"model": "tiny", "prompt": "5 6 7", "max_tokens": 240, "ignore_eos": True,
            "stream": True}

    async def leave_early(client):
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    return                           # closes the connection mid-stream

    async def main():
        async with httpx.AsyncClient(timeout=60) as raw:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=60,
                                        max_retries=0)
            try:
                jobs = [leave_early(raw) for _ in range(4)]
                jobs += [_stream_text(client, p, 60) for p in PROMPTS[:2]]
                return await asyncio.gather(*jobs)
            finally:
                await client.close()
    out = asyncio.run(main())
    assert out[4:] == tiny[1]["text"][:2]            # the others were served
    deadline = time.time() + 20
    while time.time() < deadline:
        m = _metrics(url)
        if m['weavelm_requests_finished_total{reason="abort"}'] == before + 4 \
                and m["weavelm_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m['weavelm_requests_finished_total{reason="abort"}'] == before + 4
    assert m["weavelm_requests_running"] == 0 and m["weavelm_kv_blocks_used"] == 0


BAD = [  # (what, route, body or raw text, status, text the message must hold)
    ("malformed JSON", "completions", '{"prompt": "1 2",', 400, "not valid JSON"),
    ("prompt of a wrong type", "completions", {"prompt": 5}, 400, "prompt"),
    ("max_tokens of a wrong type", "completions", {"prompt": "1 2", "max_tokens": "many"}, 400,
     "max_tokens"),
    ("negative max_tokens", "completions", {"prompt": "1 2", "max_tokens": -3}, 400,
     "max_tokens"),
    ("temperature < 0", "completions", {"prompt": "1 2", "temperature": -0.5}, 400,
     "temperature"),
    ("top_p > 1", "completions", {"prompt": "1 2", "top_p": 1.5}, 400, "top_p"),
    ("n = 200", "completions", {"prompt": "1 2", "n": 200}, 400, "n"),
    ("unknown model", "completions", {"prompt": "1 2", "model": "gpt-9"}, 404, "gpt-9"),
    ("prompt over the context", "completions", {"prompt": "5 " * 300}, 400, "context"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "empty"),
    ("token id outside the vocabulary", "completions", {"prompt": [5, 1000]}, 400,
     "vocabulary"),
    ("max_tokens past the context", "completions", {"prompt": "1 2", "max_tokens": 1000},
     400, "max_tokens"),
    ("empty messages", "chat/completions", {"messages": []}, 400, "messages"),
    ("message of a wrong role", "chat/completions",
     {"messages": [{"role": "robot", "content": "1"}]}, 400, "role"),
    ("a field weavelm cannot honour", "completions",
     {"prompt": "1 2", "tools": [{"type": "function"}]}, 400, "tools"),
    ("a JSON array, not an object", "completions", [1, 2], 400, "JSON object"),
    ("a lone surrogate in the prompt", "completions", '{"prompt": "1 \\ud800 2"}', 400,
     "UTF-8"),
    ("a lone surrogate in a message", "chat/completions",
     '{"messages": [{"role": "user", "content": "1 \\ud800"}]}', 400, "UTF-8"),
    ("huge body", "completions", {"prompt": "1 " * (5 << 20)}, 413, "limit"),
    ("a prompt longer than the context could hold", "completions",
     {"prompt": "1 " * (3 << 20)}, 400, "characters"),
    ("max_tokens true", "completions", {"prompt": "1 2", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens as a string", "completions", {"prompt": "1 2", "max_tokens": "2"}, 400,
     "max_tokens"),
    ("a prompt of booleans", "completions", {"prompt": [True, False]}, 400, "prompt"),
    ("ignore_eos as a string", "completions", {"prompt": "1 2", "ignore_eos": "yes"}, 400,
     "ignore_eos"),
    ("an infinite temperature", "completions", '{"prompt": "1 2", "temperature": Infinity}', 400,
     "temperature"),
    ("unknown route", "nothing/here", {"prompt": "1 2"}, 404, "/v1/completions"),
]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    proc, url, _ = server
    with httpx.Client(timeout=60) as http:
        for what, route, body, status, needle in BAD:
            kw = {"content": body, "headers": {"Content-Type": "application/json"}} \
                if isinstance(body, str) else {"json": body}
            r = http.post(f"{url}/v1/{route}", **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, what
            assert needle.lower() in err["message"].lower(), (what, err)
            assert "\n" not in err["message"], what
            ok = http.post(f"{url}/v1/completions", json={"prompt": "1 2", "max_tokens": 2,
                                                          "ignore_eos": True,
                                                          "return_token_ids": True})
            assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2, what
    for nulls in ({"n": None}, {"stream": None}, {"ignore_eos": None}):   # as OpenAI takes them
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"prompt": "1 2", "max_tokens": 2, **nulls})
        assert r.status_code == 200, (nulls, r.text)
    with pytest.raises(openai.BadRequestError):      # the client sees them as such too
        _client(url).completions.create(model="tiny", prompt="1 2", suffix="end")
    with pytest.raises(openai.NotFoundError):
        _client(url).completions.create(model="gpt-9", prompt="1 2")


def test_stop_strings_end_the_text(server, tiny):
    proc, url, _ = server
    full = tiny[1]["text"][0]
    words = full.split()
    stop = " ".join(words[2:4])                      # the text ends before it
    client = _client(url)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW,
                                  temperature=0, stop=[stop])
    want = full[:full.index(stop)]
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=NEW,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want


def test_seeded_sampling_repeats_itself(server):
    proc, url, _ = server
    client = _client(url)

    def sample(seed):
        r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=NEW,
                                      temperature=1.5, top_p=0.95, seed=seed, extra_body={
                                          "top_k": 50, "ignore_eos": True,
                                          "return_token_ids": True})
        return r.choices[0].token_ids
    first = sample(11)
    assert len(first) == NEW and all(0 <= t < 103 for t in first)
    assert sample(11) == first
    assert any(sample(s) != first for s in (12, 13, 14))


def test_bench_serve_loads_the_server(server, tmp_path):
    proc, url, _ = server
    out = tmp_path / "load.json"
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", "bench", "serve", "--url", url,
                        "--vocab", "103", "--num-requests", "12", "--input-len", "6",
                        "--output-len", "5", "--concurrency", "4", "--request-rate", "50",
                        "--timeout", "120", "--json", str(out)], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["ok"] == 12 and r["failed"] == 0 and r["output_tokens"] == 12 * 5
    assert r["ttft"][0] > 0 and r["tpot"][0] > 0 and r["e2e"][1] >= r["e2e"][0]
    assert "TTFT p50 / p99" in p.stdout
    assert r["prefix_hit_rate"] == 0


def test_bench_serve_shared_prefixes_hit_the_cache(server, tmp_path):
    """12 requests over 2 prefixes of 32 tokens (two blocks) plus 6 of their own: every
    request but the first on each prefix finds its two blocks cached, arriving while that
    first one still computes them or after."""
    proc, url, _ = server
    out = tmp_path / "load.json"
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", "bench", "serve", "--url", url,
                        "--vocab", "103", "--num-requests", "12", "--input-len", "6",
                        "--output-len", "3", "--prefix-len", "32", "--num-prefixes", "2",
                        "--seed", "7", "--concurrency", "4", "--timeout", "120", "--json",
                        str(out)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["ok"] == 12 and r["prefix_hit_rate"] == pytest.approx(10 * 32 / (12 * 38))
    assert "prefix hit rate" in p.stdout


def _descendants(pid) -> set[int]:
    out = set()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return out
    for k in kids:
        out |= {k} | _descendants(k)
    return out


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal_mid_stream(proc, url, tokens, finishes, sig=signal.SIGTERM):
    """A signal while a stream runs: it completes if it can within the shutdown timeout, else it
    is cancelled; the server and all its processes exit within the bound."""
    kids = _descendants(proc.pid)
    got = {"lines": []}

    def stream():
        try:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": "9 8 7", "max_tokens": tokens,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got["lines"].append(line)
        except httpx.TransportError as e:            # the cancelled response is cut short
            got["error"] = e
    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while len(got["lines"]) < 3 and time.time() < deadline:
        time.sleep(0.05)                             # the request is decoding
    start = time.time()
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    t.join(30)
    chunks = [json.loads(line[6:]) for line in got["lines"] if line != "data: [DONE]"]
    tokens_seen = sum(len(c["choices"][0]["token_ids"]) for c in chunks if c.get("choices"))
    if finishes:
        assert got["lines"][-1] == "data: [DONE]" and tokens_seen == tokens
        assert '"finish_reason":"length"' in got["lines"][-2]
    else:            # ended before the bound: a "cancelled" error event, then [DONE]
        assert tokens_seen < tokens and got["lines"][-1] == "data: [DONE]", got["lines"][-3:]
        assert json.loads(got["lines"][-2][6:])["error"]["code"] == "cancelled"
        assert "error" not in got
        assert time.time() - start < 30
    deadline = time.time() + 10
    while any(_alive(k) for k in kids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if _alive(k)], "a rank outlived the server"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_tp2_gets_generates_text_and_sigterm_ends_every_rank(tiny, tmp_path):
    """TP 2 (a follower rank), then SIGTERM with a 1 s bound: the long stream is cancelled."""
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = _start(tiny[0], 2, log, shutdown_timeout=1)
        try:
            assert len(_descendants(proc.pid)) >= 2          # both ranks are children
            _check_same_as_generate(url, tiny[1])
            _signal_mid_stream(proc, url, 240, finishes=False)
        finally:
            _stop(proc)


def test_sigint_tp1_lets_the_running_request_finish(server):
    proc, url, _ = server
    _signal_mid_stream(proc, url, 200, finishes=True, sig=signal.SIGINT)
