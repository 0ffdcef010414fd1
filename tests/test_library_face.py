"""weavelm as a library (Megatron-core's way): a model of one's own, built from the parallel
layers and `WovenDecoderLayer` (examples/custom_tp_model.py: no registered family), loaded from
a Hugging Face-style checkpoint, gives the logits of a single-process float64 reference at TP 1,
2 and 4 in baseline, fused and weave modes (the weave's cut inside a sequence), and nocomm does
not (it drops the reductions on purpose); a registered family's `model(input_ids)` equals
transformers' logits at TP 2; the example runs under torchrun; `WovenDecoderLayer` imports
without the engine's scheduler or server."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import make_tiny
from weavelm.parallel.launch import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "custom_tp_model.py")
SEQS = [[5, 17, 33, 8, 61, 2, 90, 14, 3], [44, 3, 71, 9, 28, 50, 6, 11, 95, 35, 1], [12, 19, 7]]


def _example():
    spec = importlib.util.spec_from_file_location("custom_tp_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _custom_rank(tp, directory):
    """On each rank: the example's model, loaded from the checkpoint in `directory`; max
    |logits - float64 reference| per mode, nocomm included."""
    from weavelm import load_weights
    from weavelm.parallel import init_parallel, make_communicator
    ex = _example()
    state = init_parallel(tp, "cpu")
    model = ex.TinyGeluLM(ex.CONFIG)
    load_weights(model, directory)
    want = ex.reference_logits(ex.random_checkpoint(ex.CONFIG), ex.CONFIG, SEQS)
    comm = make_communicator(None, state)
    split = len(SEQS[0]) + len(SEQS[1]) // 2               # inside the second sequence
    return {mode: (model(SEQS, mode=mode, split=split if mode == "weave" else None, comm=comm)
                   .double() - want).abs().max().item()
            for mode in ("baseline", "fused", "weave", "nocomm")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("custom")
    ex = _example()
    ex.save_checkpoint(ex.random_checkpoint(ex.CONFIG), str(d))
    return str(d)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_model_of_ones_own_equals_the_float64_reference(checkpoint, tp):
    errors = spawn(_custom_rank, tp, tp, checkpoint) if tp > 1 else _custom_rank(1, checkpoint)
    for mode in ("baseline", "fused", "weave"):
        assert errors[mode] < 1e-4, (mode, errors)
    if tp > 1:
        assert errors["nocomm"] > 1e-2, errors         # the comparison sees missing reductions


def _family_rank(tp, path):
    from weavelm import load_weights
    from weavelm.models.config import ModelConfig
    from weavelm.models.loader import resolve_model
    from weavelm.models.registry import family_for
    from weavelm.parallel import init_parallel
    init_parallel(tp, "cpu")
    source = resolve_model(path)
    config = ModelConfig.from_hf(source.config)
    model = family_for(config.architecture).model_class(config)
    load_weights(model, source)
    ids = torch.tensor([SEQS[0], SEQS[1][:9]])
    return model(ids), model(ids, mode="weave")


def test_a_registered_family_forward_equals_transformers_at_tp2(tmp_path):
    hf = make_tiny("llama", tmp_path / "llama", seed=6)
    plain, woven = spawn(_family_rank, 2, 2, str(tmp_path / "llama"))
    with torch.no_grad():
        want = hf(torch.tensor([SEQS[0], SEQS[1][:9]])).logits
    assert plain.shape == want.shape == woven.shape
    assert torch.allclose(plain, want, atol=1e-4), (plain - want).abs().max()
    assert torch.allclose(woven, want, atol=1e-4), (woven - want).abs().max()


def test_the_example_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for attempt in range(2):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                            "2", EXAMPLE, "--device", "cpu"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        # On a loaded CPU, gloo's teardown at exit sometimes aborts a rank after the work is
        # done ("terminate called without an active exception"; the tree before this check
        # did it too, 2 runs in 8 beside two busy processes): one more run, then it fails.
        if p.returncode == 0 or "terminate called without an active exception" not in p.stderr:
            break
    assert p.returncode == 0, p.stderr[-3000:]
    assert "TP=2 (cpu): logits equal the single-process float64 reference in every mode" \
        in p.stdout, p.stdout


def test_the_library_face_imports_without_the_engine():
    code = ("import sys; from weavelm import WovenDecoderLayer, WovenDecoder, load_weights; "
            "import weavelm.parallel; "
            "bad = [m for m in sys.modules if m.startswith(('weavelm.engine', 'weavelm.serve'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
