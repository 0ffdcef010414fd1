"""FP8 weights on CPU (the same code path as the GPU's, weights stored in float8_e4m3fn and
dequantized for the matmul): a tiny Llama loaded with quantization="fp8" at TP 1, 2 and 4 gives
the logits of a float64 transformers model whose linear layers apply the same scheme (each
weight row and each token's activations scaled by their absolute maximum / 448 and rounded to
e4m3; a row-parallel layer's rows and activations per rank slice, as each rank holds them), to
float32 rounding, while plain full-precision logits differ from both by the quantization error.
"""
import functools

import pytest
import torch

from tiny_models import make_tiny, reference_logits
from weavelm.parallel.launch import spawn

FP8 = torch.float8_e4m3fn
SEQS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42], [2, 3, 4], [17]]
ROW_PARALLEL = ("o_proj", "down_proj")


def fake_fp8(t: torch.Tensor) -> torch.Tensor:
    """The scheme in float64: per-row scale = |row|max / 448, rounded to e4m3, scaled back."""
    s = (t.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
    return (t / s).clamp(-448, 448).to(FP8).double() * s


def _fake_linear(mod, ranks, x):
    """The layer as `ranks` ranks compute it: a row-parallel layer's input and weight columns
    split in `ranks` slices, each slice quantized on its own, the partial products summed."""
    y = sum(fake_fp8(a) @ fake_fp8(w).t()
            for a, w in zip(x.chunk(ranks, -1), mod.weight.chunk(ranks, 1)))
    return y if mod.bias is None else y + mod.bias


def scheme_reference(path, tp):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            ranks = tp if name.endswith(ROW_PARALLEL) else 1
            mod.forward = functools.partial(_fake_linear, mod, ranks)
    return reference_logits(model, SEQS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "llama"
    model = make_tiny("llama", path, seed=3, kv_heads=2)
    return str(path), reference_logits(model.double(), SEQS)


def _logits(tp, path, quantization):
    from weavelm import LLM
    llm = LLM(path, tp=tp, device="cpu", progress=False, quantization=quantization)
    layer = llm.engine.runner.model.model.layers[0].mlp.down_proj
    return llm.logits(SEQS), layer.weight.dtype, layer.weight_scale is not None


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fp8_logits_equal_the_scheme_in_float64(tiny, tp):
    path, full = tiny
    logits, dtype, scaled = spawn(_logits, tp, tp, path, "fp8") if tp > 1 \
        else _logits(1, path, "fp8")
    assert dtype == FP8 and scaled
    want = scheme_reference(path, tp)
    err = (logits.double() - want).abs().max().item()
    quantization_error = (want - full).abs().max().item()
    assert err < 2e-6, f"TP {tp}: FP8 logits differ from the scheme's by {err}"
    assert quantization_error > 100 * err      # the test sees the rounding it checks


def test_quantize_rows_matches_float64():
    from weavelm.parallel.fp8 import dequantize_rows, quantize_rows
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    w[5] = 0                                            # an all-zero row: codes 0
    codes, scale = quantize_rows(w.bfloat16())
    assert codes.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    want = fake_fp8(w.bfloat16().double())
    assert torch.allclose(dequantize_rows(codes, scale).double(), want, rtol=1e-6, atol=0)
    assert (codes.float().abs().amax(1)[torch.arange(64) != 5] == 448).all()
    assert not codes[5].float().any()


def test_bad_quantization_is_refused():
    from weavelm import LLM
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match="quantization 'int4' is not supported: use 'fp8'"):
        LLM("unused", quantization="int4")


def test_fp8_moe_is_refused_in_one_line(tmp_path):
    from weavelm import LLM
    from weavelm.errors import WeavelmError
    make_tiny("mixtral", tmp_path / "moe")
    with pytest.raises(WeavelmError, match="not supported for mixture-of-experts layers yet"):
        LLM(str(tmp_path / "moe"), device="cpu", progress=False, quantization="fp8")
