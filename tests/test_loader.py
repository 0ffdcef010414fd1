"""Checkpoint sources: local safetensors (covered elsewhere), the Hugging Face cache by repo id
while offline, and pickle checkpoints only behind the flag."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tiny_models import make_tiny
from weavelm.errors import WeavelmError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQS = [[1, 4, 9, 16, 25, 36], [7, 8]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader") / "qwen2"
    make_tiny("qwen2", d)
    return d


def test_pickle_checkpoint_only_with_flag(tiny, tmp_path):
    from tiny_models import pickle_copy
    from weavelm import LLM
    d = pickle_copy(tiny, tmp_path / "pickled")
    with pytest.raises(WeavelmError, match="--allow-pickle"):
        LLM(str(d), device="cpu", progress=False)
    from weavelm.parallel.state import destroy_parallel
    destroy_parallel()
    ours = LLM(str(d), device="cpu", allow_pickle=True, progress=False).logits(SEQS)
    destroy_parallel()
    ref = LLM(str(tiny), device="cpu", progress=False).logits(SEQS)
    assert torch.equal(ours, ref)


def test_repo_id_from_hf_cache_offline(tiny, tmp_path):
    # Lay the checkpoint out as huggingface_hub's cache does: refs/main -> snapshots/<commit>.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--weavelm-test--tiny-qwen2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny, repo / "snapshots" / commit)
    code = ("from weavelm import LLM; import torch; "
            f"l = LLM('weavelm-test/tiny-qwen2', device='cpu', progress=False); "
            f"torch.save(l.logits({SEQS!r}), {str(tmp_path / 'out.pt')!r})")
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from weavelm import LLM
    ref = LLM(str(tiny), device="cpu", progress=False).logits(SEQS)
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)


def test_unexpected_and_missing_tensors_are_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from weavelm import LLM
    from weavelm.parallel.state import destroy_parallel
    state = {}
    for f in tiny.glob("*.safetensors"):
        state.update(load_file(f))
    for name, mutate in (("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
                         ("extra", lambda s: s.__setitem__("model.extra.weight",
                                                           torch.zeros(3)))):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(tiny / "config.json", d / "config.json")
        s = dict(state)
        mutate(s)
        save_file(s, str(d / "model.safetensors"))
        with pytest.raises(WeavelmError, match="missing|does not use"):
            LLM(str(d), device="cpu", progress=False)
        destroy_parallel()
