"""Rough edges a new user hits (issue: hardening, items 10, 12, 14, 17): chat templates that raise
or never end, old pickle checkpoints, models and benchmarks too large for the machine, and the
cost of `from weavelm import LLM`. Each failure must end with exit code 2 and one line that names
the problem, with nothing executed or left running."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, env=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _cli(*args, timeout=300, env=None):
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _one_line_error(code, out, err, words):
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


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
