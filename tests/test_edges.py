"""Rough edges a new user hits (issue: hardening, items 10, 12, 14, 17): chat templates that raise
or never end, old pickle checkpoints, models and benchmarks too large for the machine, and the
cost of `from weavelm import LLM`. Each failure must end with exit code 2 and one line that names
the problem, with nothing executed or left running."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cli_run import assert_one_line_error, weavelm
from tiny_models import make_tiny, save_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, env=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- import cost

HEAVY = ("transformers", "torch._dynamo", "numba", "numba.cuda", "tokenizers", "gguf",
         "safetensors", "jinja2", "huggingface_hub", "accelerate", "sympy")


def test_import_llm_pulls_in_nothing_heavy():
    """`from weavelm import LLM` costs little beyond `import torch`: the modules that take
    seconds (transformers for the tokenizer, torch._dynamo, numba's CUDA target) load on use."""
    code = ("import sys, time; import torch; before = set(sys.modules); t = time.perf_counter();"
            "from weavelm import LLM, SamplingParams; dt = time.perf_counter() - t;"
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules and m not in before];"
            "print(repr(heavy)); print(f'{dt:.3f}')")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    heavy, seconds = r.stdout.split("\n")[:2]
    assert heavy == "[]", f"from weavelm import LLM imported {heavy}"
    print(f"from weavelm import LLM after import torch: {float(seconds):.3f} s")
    assert float(seconds) < 0.75          # 0.5 s asked, with slack for a busy 2-core machine


# ----------------------------------------------------------------------------- chat templates

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("edges") / "llama"
    make_tiny("llama", d, seed=3)
    save_tiny_tokenizer(d)
    return d


def _with_template(tiny, tmp_path, template):
    d = tmp_path / "templated"
    shutil.copytree(tiny, d)
    (d / "chat_template.jinja").write_text(template)
    return d


GOOD_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
TEMPLATES = {
    # name: (template, words the one-line error must contain)
    "raises": ("{{ raise_exception('no system role here') }}", ["chat template", "no system role"]),
    "syntax error": ("{% for m in messages %}{{ m['content'] }}", ["chat template",
                                                                   "TemplateSyntaxError"]),
    "undefined field": ("{{ messages[0].nope.deeper }}", ["chat template", "UndefinedError"]),
    "reaches for Python internals": ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                     ["chat template", "SecurityError"]),
    "recursive macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                        ["chat template", "Recursion"]),
    "nested loops that never end": (
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        ["chat template", "did not finish within 2 s"]),
    "writes 100 MB": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                      ["chat template", "characters"]),
    # one C call that holds the interpreter lock: only a process can be stopped
    "a number of a billion digits": ("{{ (10 ** (10 ** 9)) % 7 }}",
                                     ["chat template", "did not finish within 2 s"]),
    # 12 GB in one multiplication, before any size check could see it: refused for its memory
    # (or, on a loaded machine, for its time: building the first 1 GB can take 2 s)
    "a string of 12 GB": ("{{ ('a' * 10 ** 9) * 12 }}", ["chat template"]),
}


def test_a_plain_chat_template_renders(tiny, tmp_path):
    d = _with_template(tiny, tmp_path, GOOD_TEMPLATE)
    code, out, err = weavelm("generate", d, "-p", "1 2 3", "--chat", "--device", "cpu", "-n", "2")
    assert code == 0, err


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_bad_chat_template_is_one_line(tiny, tmp_path, case):
    template, words = TEMPLATES[case]
    d = _with_template(tiny, tmp_path, template)
    t = time.monotonic()
    result = weavelm("generate", d, "-p", "1 2 3", "--chat", "--device", "cpu", "-n", "2",
                  env={"WEAVELM_CHAT_TEMPLATE_TIMEOUT": "2"}, timeout=120)
    assert_one_line_error(*result, words)
    assert time.monotonic() - t < 60


# ----------------------------------------------------------------------------- pickle checkpoints

def _as_pickle(tiny, tmp_path, state_edit=None, **save_kwargs):
    """tiny's checkpoint as pytorch_model.bin (torch.save with `save_kwargs`), no safetensors."""
    from safetensors.torch import load_file
    d = tmp_path / "pickled"
    shutil.copytree(tiny, d)
    f = next(d.glob("*.safetensors"))
    state = load_file(f)
    f.unlink()
    torch.save(state_edit(state) if state_edit else state, d / "pytorch_model.bin", **save_kwargs)
    return d


@pytest.mark.parametrize("zipped", [True, False], ids=["zip format", "legacy format"])
def test_pickle_checkpoint_loads_with_allow_pickle(tiny, tmp_path, zipped):
    d = _as_pickle(tiny, tmp_path, _use_new_zipfile_serialization=zipped)
    args = ["generate", d, "-p", "1 2 3", "--no-chat", "--device", "cpu", "-n", "2"]
    assert_one_line_error(*weavelm(*args), ["pickle", "--allow-pickle"])
    code, out, err = weavelm(*args, "--allow-pickle")
    assert code == 0, err


class _Planted:
    """Unpickling this would create the marker file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("edit,words", [
    (lambda marker: (lambda s: {**s, "extra": _Planted(marker)}), ["more than tensors",
                                                                  "io.open"]),
    (lambda marker: (lambda s: list(s.values())), ["not a dict", "list"]),
    (lambda marker: (lambda s: {**s, "step": 3}), ["'step' is not a tensor"]),
], ids=["code in the pickle", "a list", "a number among the tensors"])
def test_bad_pickle_checkpoint_is_one_line(tiny, tmp_path, edit, words):
    marker = tmp_path / "ran.txt"
    d = _as_pickle(tiny, tmp_path, edit(str(marker)), _use_new_zipfile_serialization=False)
    assert_one_line_error(*weavelm("generate", d, "-p", "1 2 3", "--no-chat", "--device", "cpu",
                                   "-n", "2", "--allow-pickle"), words)
    assert not marker.exists()


# ----------------------------------------------------------------------------- memory estimate

@pytest.mark.parametrize("shape", ["llama3-8b", "qwen2.5-72b", "mixtral-8x7b", "qwen3-30b-a3b"])
def test_weight_estimate_is_the_built_model(shape):
    """The estimate's weights are the bytes of the model's parameters (built on `meta`)."""
    from weavelm.bench.shapes import shape_config
    from weavelm.engine.memory import PROCESS_BYTES, estimate
    from weavelm.models.config import ModelConfig
    from weavelm.models.registry import family_for
    from weavelm.parallel.state import init_parallel
    init_parallel(1, "cpu")
    cfg = ModelConfig.from_hf(shape_config(shape, 2))
    model = family_for(cfg.architecture).model_class(cfg, dtype=torch.bfloat16, device="meta",
                                                     max_positions=1024)
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    est = estimate(cfg, 1, 2, tokens=1)
    assert est.fixed - PROCESS_BYTES + est.per_layer * est.layers == pytest.approx(built,
                                                                                  rel=1e-4)


def test_readme_bench_on_a_small_machine_is_refused(monkeypatch):
    """The README's `bench prefill --shape llama3-70b --layers 8 --tp 4` on a 16 GiB CPU
    machine: one line with the estimate and what fits, before any rank starts."""
    from typer.testing import CliRunner

    import weavelm.cli.main as cli_main
    from weavelm.engine import memory
    from weavelm.parallel import launch
    monkeypatch.setattr(memory, "available_bytes",
                        lambda device: (16 << 30, "this machine has 16.0 GiB available"))
    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("ranks started"))
    r = CliRunner().invoke(cli_main.app, ["bench", "prefill", "--shape", "llama3-70b",
                                          "--layers", "8", "--tp", "4", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for words in ("llama3-70b", "GiB for 4 ranks", "16.0 GiB available", "--layers 5",
                  "--tokens 1024 fits"):
        assert words in lines[0], (words, lines[0])


def _mem_available_gib():
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) >> 20


@pytest.mark.skipif(_mem_available_gib() > 140, reason="this machine may fit llama3-70b")
def test_bench_too_big_for_this_machine_is_one_line():
    t = time.monotonic()
    assert_one_line_error(*weavelm("bench", "prefill", "--shape", "llama3-70b", "--layers", "80",
                          "--device", "cpu"), ["needs about", "GiB", "MemAvailable", "--layers"])
    assert time.monotonic() - t < 60                      # refused, not attempted


def _huge(tiny, tmp_path):
    """tiny's checkpoint with a config whose MLP would take ~100 GB in fp32."""
    d = tmp_path / "huge"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 1 << 26}))
    return d


@pytest.mark.skipif(_mem_available_gib() > 90, reason="this machine may fit the model")
def test_generate_with_a_model_too_big_is_one_line(tiny, tmp_path):
    assert_one_line_error(*weavelm("generate", _huge(tiny, tmp_path), "-p", "1 2 3", "--no-chat",
                          "--device", "cpu", "-n", "2"), ["huge", "needs about", "GiB"])


@pytest.mark.skipif(_mem_available_gib() > 90, reason="this machine may fit the model")
def test_llm_with_a_model_too_big_fails_before_loading(tiny, tmp_path, monkeypatch):
    from weavelm import LLM
    from weavelm.engine import model_loading
    from weavelm.errors import WeavelmError
    monkeypatch.setattr(model_loading, "load_weights",
                        lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(WeavelmError, match="needs about .* GiB") as e:
        LLM(str(_huge(tiny, tmp_path)), device="cpu", progress=False)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- test summary

@pytest.mark.parametrize("sim", [False, True], ids=["main run", "simulator run"])
def test_simulator_tests_are_collected_only_in_the_simulator(sim):
    """Outside the simulator the test_sim_* tests are not collected (not skipped placeholders,
    not deselected): the summary counts every test once."""
    env = {"NUMBA_ENABLE_CUDASIM": "1"} if sim else {}
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"} | env
    r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                        "tests/kernels/test_rope_activation_sim.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [line for line in r.stdout.splitlines() if "::" in line]
    assert any("::test_sim_" in n for n in names) == sim, names
    assert "deselected" not in r.stdout and "skipped" not in r.stdout, r.stdout


# ----------------------------------------------------------------------------- CPU installs

def test_a_cpu_run_never_loads_numba_or_the_cuda_toolkit(tiny):
    """README (why the CUDA toolkit wheels are not an extra): a CPU run uses the torch
    references; it imports neither numba nor llvmlite and maps none of the toolkit's libraries
    (NVRTC, NVVM, nvJitLink). torch itself imports cuda-bindings' Python modules if present."""
    code = ("import sys; from weavelm import LLM, SamplingParams;"
            f"llm = LLM({str(tiny)!r}, device='cpu', progress=False);"
            "out = llm.generate(['1 2 3'], SamplingParams(max_new_tokens=3));"
            "libs = {l.split()[-1].rsplit('/', 1)[-1] for l in open('/proc/self/maps')"
            " if '/' in l};"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite'))"
            " + sorted(l for l in libs if any(k in l.lower() for k in ('nvrtc', 'nvvm',"
            " 'nvjitlink', 'libcuda.'))))")
    r = _python(code, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
