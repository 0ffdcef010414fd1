"""weavelm logits equal transformers' logits for tiny random Llama, Qwen2, Qwen3 and Mistral
checkpoints at TP=1, 2 and 4, including TP larger than the KV-head count and sharded files."""
import pytest

from tiny_models import make_tiny, reference_logits
from weavelm.parallel.launch import spawn

# name -> (family, kv heads, sharded). kv=1 makes TP 2 and 4 replicate the KV head.
MODELS = {"llama": ("llama", 2, True), "qwen2": ("qwen2", 2, False),
          "qwen3": ("qwen3", 2, True), "mistral": ("mistral", 1, False)}
SEQS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42, 43, 44, 45, 46, 47, 99],
        [2, 3, 4], [17]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, (kind, kv, shard) in MODELS.items():
        model = make_tiny(kind, root / name, kv_heads=kv, shard=shard)
        out[name] = (str(root / name), reference_logits(model, SEQS))
    return out


def _logits_all(tp, paths):
    from weavelm import LLM
    from weavelm.parallel.state import destroy_parallel
    result = {}
    for name, path in paths.items():
        llm = LLM(path, tp=tp, device="cpu", progress=False)
        result[name] = llm.logits(SEQS)
        del llm
    destroy_parallel()
    return result


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers(tp, checkpoints):
    paths = {k: v[0] for k, v in checkpoints.items()}
    ours = spawn(_logits_all, tp, tp, paths) if tp > 1 else _logits_all(1, paths)
    for name, (_, ref) in checkpoints.items():
        err = (ours[name] - ref).abs().max().item()
        assert err < 2e-4, f"{name} at TP={tp}: max |diff| {err}"


def test_sharded_checkpoint_really_is_sharded(checkpoints):
    import pathlib
    assert len(list(pathlib.Path(checkpoints["llama"][0]).glob("*.safetensors"))) > 1
