"""Pipeline parallelism from the command line (CPU, a tiny 4-layer Llama with a word-level
tokenizer; `LLM.generate` at PP 1 in this process is the reference of every greedy text):

- `weavelm generate --tp 1 --pp 2` prints the same greedy tokens as `--pp 1` and the reference;
- `weavelm bench throughput`'s ranks at TP 1 x PP 2 serve every requested token and report pp;
- two "nodes" on this machine, two `torchrun --nnodes 2 --nproc-per-node 2 -m weavelm.cli serve
  --tp 2 --pp 2` launches meeting at a c10d rendezvous: the `openai` client gets the reference's
  text from global rank 0's server; then the launch without rank 0 is killed whole (a lost
  node) and the other one ends on its own (see `test_two_torchrun_nodes_serve_and_a_lost_node`
  for what is asserted about its output).

Every process a test starts is killed at its end, passed or failed."""
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cli_run import weavelm
from proc_tree import descendants
from tiny_models import make_tiny, save_tiny_tokenizer
from weavelm.parallel.launch import free_port

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "5 6 7 8 9 10 11"
NEW = 8
TIMEOUT = 20          # WEAVELM_COLLECTIVE_TIMEOUT of the torchrun launches (seconds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint (4 layers: 2 a stage) and LLM.generate's greedy text of PROMPT at PP 1."""
    path = tmp_path_factory.mktemp("pipeline_launch") / "tiny"
    make_tiny("llama", path, seed=3, layers=4)
    save_tiny_tokenizer(path)
    from weavelm import LLM, SamplingParams
    llm = LLM(str(path), tp=1, device="cpu", progress=False)
    want = llm.generate([PROMPT], SamplingParams(max_new_tokens=NEW))[0].text
    return str(path), want


def test_generate_pp2_prints_the_pp1_tokens(tiny):
    path, want = tiny
    outs = {}
    for pp in (1, 2):
        code, out, err = weavelm("generate", path, "-p", PROMPT, "--tp", "1", "--pp", pp,
                                 "--device", "cpu", "-n", NEW, "--no-chat", timeout=120)
        assert code == 0, err
        outs[pp] = out.strip()
    assert outs[2] == outs[1] == want.strip() and want.strip()


def test_pp_is_checked_in_one_line(tiny):
    from cli_run import assert_one_line_error
    assert_one_line_error(*weavelm("generate", tiny[0], "--pp", "0", "--device", "cpu"),
                          "--pp must be at least 1")
    assert_one_line_error(*weavelm("generate", tiny[0], "--pp", "5", "--device", "cpu"),
                          "pp=5", "4")
    assert_one_line_error(*weavelm("bench", "throughput", "--pp", "0", "--device", "cpu"),
                          "--pp must be at least 1")


def _bench(opts):
    from weavelm.bench import shapes
    from weavelm.bench.throughput import throughput_rank
    shapes.SHAPES["test-tiny"] = dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
    return throughput_rank(opts)


def test_bench_throughput_ranks_at_pp2():
    """What `weavelm bench throughput --tp 1 --pp 2 --device cpu` runs on its 2 ranks."""
    from weavelm.bench.throughput import format_result, workload
    from weavelm.engine.config import EngineConfig
    from weavelm.parallel.launch import spawn
    config = EngineConfig(tp=1, pp=2, mode="baseline", backend="torch", device="cpu",
                          max_num_seqs=4, max_num_batched_tokens=64)
    opts = dict(shape="test-tiny", layers=None, config=config, num_requests=8, input_len=None,
                output_len=None, input_max=64, seed=3)
    r = spawn(_bench, 2, opts)
    assert r["result"]["requests"] == 8
    assert r["result"]["output_tokens"] == sum(o for _, o in workload(8, 256, 3, input_max=64))
    assert r["meta"]["pp"] == 2 and r["meta"]["tp"] == 1
    assert "TP=1 x PP=2" in format_result(r)


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_all(launch, pids) -> None:
    """SIGKILL a launch's process group and every process recorded under it (torchrun starts
    each rank in a session of its own)."""
    for pid in set(pids) | set(descendants(launch.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(launch.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    launch.wait()


def _torchrun(node: int, rdzv: int, http: int, path: str, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
           str(node), "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{rdzv}", "-m", "weavelm.cli", "serve", path, "--tp", "2", "--pp", "2",
           "--device", "cpu", "--port", str(http), "--served-model-name", "tiny"]
    env = dict(os.environ, PYTHONPATH=ROOT, WEAVELM_COLLECTIVE_TIMEOUT=str(TIMEOUT),
               GLOO_SOCKET_IFNAME="lo")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_healthy(url, launches, logs, seconds=150):
    deadline = time.time() + seconds
    while time.time() < deadline:
        for launch, log in zip(launches, logs):
            assert launch.poll() is None, f"a launch exited with {launch.returncode}:\n" \
                                          f"{open(log.name).read()[-3000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no healthy server within {seconds} s")


def test_two_torchrun_nodes_serve_and_a_lost_node(tiny, tmp_path):
    """Two torchrun launches of 2 ranks each (TP 2 x PP 2, a c10d rendezvous on 127.0.0.1):
    greedy completions (plain and streamed) from global rank 0's server equal LLM.generate's
    text at PP 1. Then the launch without rank 0 is SIGKILLed whole (its torchrun and ranks:
    a lost node). Asserted of the other launch: it exits on its own, with a non-zero status,
    within the collective timeout plus 25 s, and none of its processes is left; its output
    holds exactly one line starting with `error: ` (weavelm's one-line report, printed by the
    host's first rank), naming rank 0 and the failed collective, and no traceback with
    torchrun's `[rank0]:` prefix (an exception let out of the CLI), nor the engine loop's (a
    lost peer is left to that one line). Not asserted: torchrun's own report of the failed
    worker, which follows in the same output."""
    path, want = tiny
    rdzv, http = free_port(), free_port()
    logs = [open(tmp_path / f"node{n}.log", "w+") for n in (0, 1)]
    launches, recorded = [], {}
    try:
        launches.append(_torchrun(0, rdzv, http, path, logs[0]))
        deadline = time.time() + 60       # the first launch hosts the rendezvous store
        while not _listening(rdzv):
            assert launches[0].poll() is None and time.time() < deadline, \
                open(logs[0].name).read()
            time.sleep(0.1)
        launches.append(_torchrun(1, rdzv, http, path, logs[1]))
        url = f"http://127.0.0.1:{http}"
        _wait_healthy(url, launches, logs)
        recorded = {n: descendants(launch.pid) for n, launch in enumerate(launches)}

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60,
                               max_retries=0)
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW,
                                      temperature=0)
        assert r.choices[0].text == want
        chunks = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want

        # rank 0 logged "serving ... (TP 2 x PP 2)": its launch is the one that stays
        server = [n for n in (0, 1) if "(TP 2 x PP 2)" in open(logs[n].name).read()]
        assert len(server) == 1, [open(log.name).read()[-2000:] for log in logs]
        stay, lost = server[0], 1 - server[0]
        t0 = time.monotonic()
        _kill_all(launches[lost], recorded[lost])
        try:
            code = launches[stay].wait(TIMEOUT + 25)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launch with rank 0 still runs {TIMEOUT + 25} s after the other "
                        f"node was lost:\n{open(logs[stay].name).read()[-3000:]}")
        took = time.monotonic() - t0
        out = open(logs[stay].name).read()
        assert code != 0, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, out[-5000:]
        assert "rank 0" in errors[0] and "collective failed" in errors[0], errors[0]
        assert "[rank0]: Traceback" not in out, out[-5000:]
        assert "the engine loop stopped" not in out, out[-5000:]
        time.sleep(2)
        left = [pid for pid in recorded[stay] if _alive(pid)]
        assert not left, f"processes of the remaining launch still alive: {left}"
        print(f"the remaining launch ended {took:.1f} s after the other node was lost")
    finally:
        for n, launch in enumerate(launches):
            _kill_all(launch, recorded.get(n, []))
        for log in logs:
            log.close()
