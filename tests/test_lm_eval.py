"""lm-evaluation-harness against `weavelm serve`: a multiple-choice task read from a local JSON
file, `lm_eval --model local-completions --batch_size 4` (its loglikelihood request: token-id
prompts, echo, logprobs 1), and every choice's loglikelihood equal to transformers' on the same
weights (float64).

lm-eval is a large install that weavelm does not depend on: the test runs where an `lm_eval`
command is found ($WEAVELM_LM_EVAL, else on PATH), and is skipped elsewhere. To run it:

    python -m venv /tmp/lmenv && /tmp/lmenv/bin/pip install "lm-eval[api]" transformers
    WEAVELM_LM_EVAL=/tmp/lmenv/bin/lm_eval python -m pytest tests/test_lm_eval.py
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from serve_run import start_server, stop_server
from tiny_models import make_tiny, save_tiny_tokenizer

LM_EVAL = os.environ.get("WEAVELM_LM_EVAL") or shutil.which("lm_eval")
pytestmark = pytest.mark.skipif(LM_EVAL is None, reason="lm-eval is not installed (see the "
                                                        "module docstring)")

DOCS = [{"question": "5 17 33", "choices": ["8", "9 10", "61 2 44"], "answer": 1},
        {"question": "12 19", "choices": ["7 7", "44", "3 4 5"], "answer": 0},
        {"question": "90 91 92 93", "choices": ["94", "95 96"], "answer": 1},
        {"question": "3 3", "choices": ["4 5 6 7", "8", "9 9"], "answer": 2},
        {"question": "20 21 22", "choices": ["23", "24", "25", "26"], "answer": 3}]

TASK = """task: weavelm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def test_lm_eval_loglikelihoods_equal_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = tmp_path / "tiny"
    make_tiny("llama", model, seed=6)
    save_tiny_tokenizer(model)
    data = tmp_path / "mc.json"
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "weavelm_tiny_mc.yaml").write_text(TASK.format(data=data))
    with open(tmp_path / "server.log", "w+") as log:
        proc, url, _ = start_server(model, 1, log)
        try:
            run = subprocess.run(
                [LM_EVAL, "run", "--model", "local-completions", "--model_args",
                 f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                 f"tokenizer={model},num_concurrent=1,max_retries=1",
                 "--tasks", "weavelm_tiny_mc", "--include_path", str(tasks),
                 "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
                capture_output=True, text=True, timeout=600,
                env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
            assert run.returncode == 0, run.stderr[-3000:]
        finally:
            stop_server(proc)
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    tok = AutoTokenizer.from_pretrained(str(model))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float64).eval()
    checked = 0
    for s in samples:
        doc = s["doc"]
        context = tok(doc["question"], add_special_tokens=False).input_ids
        for choice, resp in zip(doc["choices"], s["resps"]):
            cont = tok(" " + choice, add_special_tokens=False).input_ids
            ids = context + cont
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
            want = sum(lp[len(context) - 1 + i, t].item() for i, t in enumerate(cont))
            got = float(resp[0][0])
            assert abs(got - want) < 1e-4, (doc, choice, got, want)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
