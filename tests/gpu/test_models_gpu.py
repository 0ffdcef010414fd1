"""On one GPU in bf16: weavelm logits match transformers' for the tiny random models, within the
error transformers itself makes in bf16."""
import pytest
import torch

from tiny_models import make_tiny, reference_logits

pytestmark = pytest.mark.gpu
SEQS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42, 43, 44, 45, 46, 47, 99],
        [2, 3, 4], [17]]


def _on_gpu_logits(model):
    m = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        return torch.cat([m(torch.tensor([s], device="cuda")).logits[0] for s in SEQS]).float().cpu()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_bf16_logits_match_transformers_on_gpu(kind, tmp_path):
    from weavelm import LLM
    model = make_tiny(kind, tmp_path / kind, kv_heads=1 if kind == "mistral" else 2)
    ref = reference_logits(model, SEQS)                              # fp32, CPU
    hf_bf16 = _on_gpu_logits(model)
    llm = LLM(str(tmp_path / kind), tp=1, device="cuda", dtype="bfloat16", progress=False)
    ours = llm.logits(SEQS).float().cpu()
    err_ours = (ours - ref).abs().max().item()
    err_hf = (hf_bf16 - ref).abs().max().item()
    assert torch.isfinite(ours).all()
    # bf16 has 8 mantissa bits: allow what transformers' own bf16 run shows, with margin.
    assert err_ours <= 3 * err_hf + 1e-2, (err_ours, err_hf)
