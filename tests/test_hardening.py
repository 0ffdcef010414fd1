"""Hardening, second round: one bad request never hurts another, and nothing listens where it
should not. Each test is one of the failures a probe of hostile inputs found:
a tiny top_p (it became 0.0 in float32 and emptied the nucleus) samples the top token and the
requests beside it finish with their reference tokens, at TP 1 and TP 3; a server restarts on
the port it just served on; two threads calling `generate` get correct tokens; a bad step-API
request fails in `add_request` with one line and the `LLM` keeps working; at TP 3 every socket
the server's process tree listens on is on loopback."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from serve_run import start_server, stop_server
from tiny_models import make_tiny

PROMPTS = [[5, 17, 33, 8], [44, 3, 71, 9, 28], [12, 19, 7, 7, 30, 2], [61, 90]]
NEW = 8


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """A tiny Llama that splits three ways (3 heads, 3 KV heads, MLP 96), and LLM.generate's
    greedy tokens for PROMPTS."""
    from weavelm import LLM, SamplingParams
    path = tmp_path_factory.mktemp("hardening") / "llama3way"
    make_tiny("llama", path, seed=8, heads=3, kv_heads=3, hidden_size=48, intermediate_size=96)
    llm = LLM(str(path), tp=1, device="cpu", progress=False)
    want = [o.token_ids for o in llm.generate_from_ids(
        PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))]
    return str(path), llm, want


def test_a_tiny_top_p_samples_the_top_token(tiny3):
    from weavelm import SamplingParams
    _, llm, want = tiny3
    outs = llm.generate_from_ids(PROMPTS, SamplingParams(max_new_tokens=NEW, temperature=1.0,
                                                        top_p=1e-300, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


def _listening(proc) -> list[str]:
    """host:port of every listening TCP socket of `proc` and its descendants."""
    found = []
    for p in [proc] + proc.children(recursive=True):
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [f"{c.laddr.ip}:{c.laddr.port}" for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


@pytest.mark.parametrize("tp", [1, 3])
def test_a_tiny_top_p_request_hurts_no_other(tiny3, tp, tmp_path):
    path, _, want = tiny3
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = start_server(path, tp, log)
        try:
            if tp > 1:
                listening = _listening(psutil.Process(proc.pid))
                assert listening and all(a.startswith(("127.", "::1")) for a in listening), \
                    listening

            def complete(prompt, **kw):
                body = dict(dict(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0,
                                 ignore_eos=True, return_token_ids=True), **kw)
                return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

            with ThreadPoolExecutor(5) as pool:
                tiny_p = pool.submit(complete, PROMPTS[0], temperature=1.0, top_p=1e-300)
                greedy = [pool.submit(complete, p) for p in PROMPTS]
                answers = [f.result() for f in greedy]
            assert tiny_p.result().status_code == 200, tiny_p.result().text
            assert tiny_p.result().json()["choices"][0]["token_ids"] == want[0]
            assert [a.json()["choices"][0]["token_ids"] for a in answers] == want
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        finally:
            stop_server(proc)
        if tp == 1:                     # the same port again at once (TIME_WAIT left behind)
            port = int(url.rsplit(":", 1)[1])
            t = time.monotonic()
            proc, url, _ = start_server(path, 1, log, port=port)
            try:
                assert complete(PROMPTS[1]).json()["choices"][0]["token_ids"] == want[1]
            finally:
                stop_server(proc)
            assert "cannot listen" not in open(tmp_path / "server.log").read()
            assert time.monotonic() - t < 120


def test_generate_from_two_threads_gives_correct_tokens(tiny3):
    from weavelm import SamplingParams
    _, llm, want = tiny3
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    results, errors = {}, []

    def run(i):
        try:
            for k in range(3):
                results[(i, k)] = [o.token_ids for o in llm.generate_from_ids(PROMPTS, params)]
        except Exception as e:                       # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 6 and all(r == want for r in results.values())


@pytest.mark.parametrize("ids", [[10 ** 9], [1, -4], [1, 2.5], "1 2 3", [[1, 2]]])
def test_a_bad_step_api_request_fails_alone(tiny3, ids):
    from weavelm import SamplingParams
    from weavelm.errors import WeavelmError
    _, llm, want = tiny3
    engine = llm.engine
    with pytest.raises(WeavelmError) as e:
        engine.add_request("r", ids, SamplingParams())
    assert "\n" not in str(e.value) and "token id" in str(e.value)
    assert "r" not in engine.seqs and not engine.has_unfinished_requests()
    assert llm.runner.blocks.num_free == llm.runner.blocks.capacity
    outs = llm.generate_from_ids(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


HOSTILE = {"a number of a billion digits": "{{ (10 ** (10 ** 9)) % 7 }}",
           "a string of 12 GB": "{{ ('a' * 10 ** 9) * 12 }}"}


def test_hostile_chat_templates_end_in_one_line_while_the_server_answers(tiny3, tmp_path):
    import shutil

    from tiny_models import save_tiny_tokenizer
    path = tmp_path / "hostile"
    shutil.copytree(tiny3[0], path)
    save_tiny_tokenizer(path)
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = start_server(path, 1, log)
        try:
            for name, template in HOSTILE.items():
                (path / "chat_template.jinja").write_text(template)
                # the server read its tokenizer at start: a fresh one per template
                stop_server(proc)
                proc, url, _ = start_server(path, 1, log)
                health, done = [], threading.Event()

                def poll():
                    while not done.is_set():
                        t = time.monotonic()
                        ok = httpx.get(f"{url}/health", timeout=5).status_code == 200
                        health.append((ok, time.monotonic() - t))
                        time.sleep(0.2)

                watcher = threading.Thread(target=poll)
                watcher.start()
                t = time.monotonic()
                r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json=dict(
                    model="tiny", max_tokens=2, messages=[{"role": "user", "content": "1 2"}]))
                elapsed = time.monotonic() - t
                done.set()
                watcher.join()
                assert r.status_code == 400, (name, r.text)
                message = r.json()["error"]["message"]
                assert "chat template" in message and "\n" not in message, (name, message)
                assert elapsed < 15, (name, elapsed)
                assert health and all(ok and s < 2 for ok, s in health), (name, health)
        finally:
            stop_server(proc)


def test_slow_header_connections_are_closed_while_others_are_served(tiny3, tmp_path):
    """A client that trickles its headers in (slowloris) loses its connections after
    --header-timeout; a client that sends a whole request in time is answered."""
    import socket
    from urllib.parse import urlparse
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = start_server(tiny3[0], 1, log, "--header-timeout", "2")
        try:
            host, port = urlparse(url).hostname, urlparse(url).port
            slow = [socket.create_connection((host, port), timeout=10) for _ in range(100)]
            for s in slow:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            start, closed = time.monotonic(), set()
            while len(closed) < len(slow) and time.monotonic() - start < 8:
                for i, s in enumerate(slow):        # one more header line each, never the end
                    if i not in closed:
                        try:
                            s.sendall(b"X-Slow: 1\r\n")
                        except OSError:
                            closed.add(i)
                assert httpx.get(f"{url}/health", timeout=5).status_code == 200
                time.sleep(0.25)
            elapsed = time.monotonic() - start
            assert len(closed) == len(slow) and 1.5 < elapsed < 8, (len(closed), elapsed)
            # a request whose headers come in two parts, well within the deadline, is answered
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(b"GET /health HTTP/1.1\r\n")
                time.sleep(0.5)
                s.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200")
        finally:
            for s in slow:
                s.close()
            stop_server(proc)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=10 ** 400), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=True), "top_k"), (dict(seed=True), "seed"), (dict(ignore_eos="yes"), "ignore_eos")])
def test_loose_sampling_values_are_refused(kwargs, needle):
    from weavelm import SamplingParams
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match=needle) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(tp="2"), "tp"), (dict(max_model_len="100"), "max_model_len"),
    (dict(max_num_seqs=True), "max_num_seqs"), (dict(dtype="int8"), "dtype"),
    (dict(num_kv_blocks=1), "num_kv_blocks"), (dict(gpu_memory_utilization=float("nan")),
                                               "gpu_memory_utilization")])
def test_loose_engine_options_are_refused_before_anything_loads(kwargs, needle):
    import torch

    from weavelm import EngineConfig
    from weavelm.errors import WeavelmError
    for kw in (kwargs, dict(dtype=torch.int8)):
        with pytest.raises(WeavelmError, match=needle if kw is kwargs else "dtype") as e:
            EngineConfig(**kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,needle", [
    (dict(max_position_embeddings=10 ** 12), "max_position_embeddings"),
    (dict(rms_norm_eps=-1), "rms_norm_eps"), (dict(head_dim=7), "head_dim")])
def test_a_hostile_config_is_one_line(tiny3, tmp_path, edit, needle):
    import json
    import shutil

    from cli_run import assert_one_line_error, weavelm
    d = tmp_path / "hostile"
    shutil.copytree(tiny3[0], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert_one_line_error(*weavelm("generate", d, "-p", "1 2", "--no-chat", "--device", "cpu",
                                   "-n", "2"), needle)


def test_a_stopped_rank_turns_health_red_and_is_named(tiny3, tmp_path):
    """`kill -STOP` of a follower rank under `serve --tp 3`: /health says 503 (no step for a
    while) as soon as a request waits, and the server ends with a line naming the rank."""
    import os
    import signal
    path, _, _ = tiny3
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = start_server(path, 3, log, env={"WEAVELM_COLLECTIVE_TIMEOUT": "20"})
        try:
            ranks = {c.name(): c for c in psutil.Process(proc.pid).children()}
            stopped = ranks["weavelm-rank2"]         # a follower (ranks name themselves)
            os.kill(stopped.pid, signal.SIGSTOP)
            waiting = threading.Thread(target=lambda: httpx.post(
                f"{url}/v1/completions", timeout=60,
                json=dict(model="tiny", prompt=PROMPTS[0], max_tokens=4)))
            waiting.start()
            deadline, status = time.monotonic() + 18, None
            while time.monotonic() < deadline:
                status = httpx.get(f"{url}/health", timeout=5).status_code
                if status == 503:
                    break
                time.sleep(0.5)
            assert status == 503
            assert proc.wait(90) != 0
            waiting.join(60)
        finally:
            stop_server(proc)
        log.seek(0)
        text = log.read()
    assert "rank 2 is stopped" in text, text[-2000:]


@pytest.mark.parametrize("cores,load,nprocs,threads", [
    (2, 0.1, 1, 2), (2, 2.3, 1, 1), (16, 3.6, 1, 12), (16, 4.0, 3, 4), (2, 0.0, 3, 1),
    (8, 20.0, 2, 1)])
def test_cpu_ranks_take_the_cores_that_are_free(monkeypatch, cores, load, nprocs, threads):
    """Threads per rank = (cores this process may use - cores kept busy by other work) shared
    among the ranks: on a busy 2-core machine two threads ran decode 3x slower than one."""
    import os

    import torch

    from weavelm.parallel import launch
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert launch.cpu_threads(nprocs) == threads
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        launch.set_cpu_threads(nprocs)
        assert torch.get_num_threads() == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "5")        # the user's word stands
        torch.set_num_threads(before)
        launch.set_cpu_threads(nprocs)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
