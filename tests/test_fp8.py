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


def _fake_experts(mod, ranks, hidden, top_k_index, top_k_weights):
    """transformers' MoE experts (3-D gate_up_proj / down_proj) under the scheme: each
    expert's gate/up rows whole, its down projection per rank slice of the intermediate size
    (its rows quantized over each slice, as each rank holds them); the router stays exact."""
    out = torch.zeros_like(hidden)
    for e in range(mod.gate_up_proj.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        gate, up = (fake_fp8(hidden[token]) @ fake_fp8(mod.gate_up_proj[e]).t()).chunk(2, -1)
        h = mod.act_fn(gate) * up
        y = sum(fake_fp8(a) @ fake_fp8(w).t()
                for a, w in zip(h.chunk(ranks, -1), mod.down_proj[e].chunk(ranks, 1)))
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out


def scheme_reference(path, tp):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            ranks = tp if name.endswith(ROW_PARALLEL) else 1
            mod.forward = functools.partial(_fake_linear, mod, ranks)
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):      # MoE experts
            mod.forward = functools.partial(_fake_experts, mod, tp)
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


def test_norm_rounding_its_output_gives_the_same_logits(tiny, monkeypatch):
    """With `fp8.NORM_ROUNDS` the residual add + RMSNorm before each FP8 block hands it the
    activations already rounded (`add_rms_norm_rounded`, one kernel on a GPU): the same codes,
    so the same logits bit for bit, and every norm but the final one takes that path."""
    from weavelm.parallel import fp8
    path, _ = tiny
    plain = _logits(1, path, "fp8")[0]
    calls = []
    real = fp8.add_rms_norm_rounded
    monkeypatch.setattr(fp8, "NORM_ROUNDS", True)
    monkeypatch.setattr(fp8, "add_rms_norm_rounded",
                        lambda *a: calls.append(1) or real(*a))
    rounded = _logits(1, path, "fp8")[0]
    assert torch.equal(rounded, plain)
    assert calls                                 # (2 norms a layer but the last, a forward)


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


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8moe") / "mixtral"
    model = make_tiny("mixtral", path, seed=5, kv_heads=2)
    model.set_experts_implementation("eager")         # (its grouped GEMM takes no float64)
    return str(path), reference_logits(model.double(), SEQS)


def _moe_logits(tp, path):
    from weavelm import LLM
    llm = LLM(path, tp=tp, device="cpu", progress=False, quantization="fp8")
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    return (llm.logits(SEQS), experts.w13.weight.dtype, experts.w2.weight.dtype,
            tuple(experts.w2.weight_scale.shape))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fp8_moe_logits_equal_the_scheme_in_float64(tiny_moe, tp):
    """Mixtral with FP8 experts (and attention): each expert's shard quantized per row at
    load, its rows' activations per token; the logits equal the scheme's in float64."""
    path, full = tiny_moe
    logits, w13, w2, w2_scale = spawn(_moe_logits, tp, tp, path) if tp > 1 \
        else _moe_logits(1, path)
    assert w13 == w2 == FP8 and w2_scale == (8, 64)          # [experts, hidden]
    want = scheme_reference(path, tp)
    err = (logits.double() - want).abs().max().item()
    assert err < 2e-6, f"TP {tp}: FP8 MoE logits differ from the scheme's by {err}"
    assert (want - full).abs().max().item() > 100 * err


def test_fp8_moe_checkpoint_is_refused_in_one_line():
    from weavelm.errors import WeavelmError
    from weavelm.parallel.experts import ExpertRowParallel
    from weavelm.parallel.fp8 import fp8_layers
    with fp8_layers("fp8-channel"), pytest.raises(
            WeavelmError, match="FP8 checkpoints of mixture-of-experts models do not load yet"):
        ExpertRowParallel(4, 32, 16, device="cpu")


# -- checkpoints that are already FP8 --------------------------------------------------------
# sizes that fall on 128-wide scale blocks at TP 1 and 2: q/k/v 256 rows, MLP 512
BIG = dict(heads=8, kv_heads=8, hidden_size=256, intermediate_size=512)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPRESSED = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "ignore": ["lm_head"], "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                  "input_activations": {"type": "float", "num_bits": 8, "strategy": "token",
                                        "dynamic": True}}}}
HF_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [128, 128]}


def _fp8_codes(w, scale):
    return (w / scale).clamp(-448, 448).to(FP8)


def write_fp8_checkpoint(src, dst, layout, mutate=None):
    """src's checkpoint as an FP8 one: `channel` / `tensor` (compressed-tensors, weight_scale
    per row / one per tensor) or `block` (Hugging Face FP8, weight_scale_inv per 128 x 128
    block), each linear weight rounded in float64. Returns {name: dequantized weight}."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    out, dequantized = {}, {}
    for name, t in state.items():
        if not name.endswith(tuple(f"{m}.weight" for m in LINEAR)):
            out[name] = t
            continue
        w = t.double()
        if layout == "block":
            R, C = w.shape
            blocks = w.reshape(R // 128, 128, C // 128, 128).abs().amax((1, 3)) / 448
            blocks = blocks.float().double()               # the scales as the file holds them
            full = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
            codes = _fp8_codes(w, full)
            out[name], out[name + "_scale_inv"] = codes, blocks.float()
            dequantized[name] = codes.double() * full
        else:
            scale = w.abs().amax(1, keepdim=True) / 448
            if layout == "tensor":
                scale = scale.max().reshape(1)
            scale = scale.float().double()
            codes = _fp8_codes(w, scale)
            out[name], out[name.replace(".weight", ".weight_scale")] = codes, scale.float()
            dequantized[name] = codes.double() * scale
    if mutate:
        mutate(out)
    save_file(out, dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = HF_FP8 if layout == "block" else COMPRESSED
    (dst / "config.json").write_text(json.dumps(cfg))
    return dequantized


def checkpoint_reference(path, dequantized, tp, requantize):
    """transformers in float64 (the original's architecture) on the FP8 checkpoint's
    dequantized weights; activations rounded per
    token (a row-parallel layer's per rank slice); with `requantize` (block scales), each rank's
    weight rounded again per row as the loader does."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()

    def run(mod, w, ranks, x):
        parts = zip(x.chunk(ranks, -1), w.chunk(ranks, 1))
        return sum(fake_fp8(a) @ (fake_fp8(b) if requantize else b).t() for a, b in parts)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            ranks = tp if name.endswith(ROW_PARALLEL) else 1
            mod.forward = functools.partial(run, mod, dequantized[name + ".weight"], ranks)
    return reference_logits(model, SEQS)


def AutoModel(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8ckpt")
    make_tiny("llama", root / "bf", seed=4, **BIG)
    return root


@pytest.mark.parametrize("layout,tp", [("channel", 1), ("channel", 2), ("tensor", 2), ("block", 1),
                                       ("block", 2)])
def test_fp8_checkpoints_load_and_match(big, layout, tp):
    path = big / f"{layout}{tp}"
    dequantized = write_fp8_checkpoint(big / "bf", path, layout)
    logits, dtype, scaled = spawn(_logits, tp, tp, str(path), None) if tp > 1 \
        else _logits(1, str(path), None)
    assert dtype == FP8 and scaled
    want = checkpoint_reference(str(big / "bf"), dequantized, tp, requantize=layout == "block")
    err = (logits.double() - want).abs().max().item()
    full = reference_logits(AutoModel(big / "bf"), SEQS)
    quantization_error = (want - full).abs().max().item()
    # float32 against float64 can round an activation to the FP8 value on the other side of
    # a midpoint now and then (one step of 1/8): the logits then move by far less than the
    # quantization moves them
    assert err < 2e-6 or err < quantization_error / 50, f"{layout} at TP {tp}: {err}"


@pytest.mark.parametrize("layout,mutate,match", [
    ("channel", lambda s: s.pop("model.layers.0.self_attn.k_proj.weight_scale"),
     "missing 1 tensors .e.g. model.layers.0.self_attn.qkv_proj.weight_scale"),
    ("channel", lambda s: s.__setitem__("model.layers.1.mlp.up_proj.weight_scale",
                                        torch.ones(512, 2)),
     r"model.layers.1.mlp.up_proj.weight_scale does not fit .* expected \(512, 1\)"),
    ("channel", lambda s: s.__setitem__("model.layers.0.mlp.down_proj.weight",
                                        s["model.layers.0.mlp.down_proj.weight"].bfloat16()),
     "down_proj.weight does not fit .* must be float8_e4m3fn, got torch.bfloat16"),
    ("block", lambda s: s.__setitem__("model.layers.0.self_attn.o_proj.weight_scale_inv",
                                      torch.ones(2, 3)),
     r"o_proj.weight_scale_inv does not fit .* expected \(2, 2\)"),
])
def test_malformed_fp8_checkpoints_are_refused_naming_the_tensor(big, tmp_path, layout, mutate,
                                                                 match):
    from weavelm import LLM
    from weavelm.errors import WeavelmError
    write_fp8_checkpoint(big / "bf", tmp_path / "bad", layout, mutate)
    with pytest.raises(WeavelmError, match=match):
        LLM(str(tmp_path / "bad"), device="cpu", progress=False)


def test_other_quantized_checkpoints_are_refused(big, tmp_path):
    import json
    import shutil

    from weavelm import LLM
    from weavelm.errors import WeavelmError
    shutil.copytree(big / "bf", tmp_path / "awq")
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "awq" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeavelmError, match="quantized with 'awq', which weavelm does not load"):
        LLM(str(tmp_path / "awq"), device="cpu", progress=False)
    write_fp8_checkpoint(big / "bf", tmp_path / "blocks", "block")
    with pytest.raises(WeavelmError, match="do not fall on 128-wide scale blocks"):
        spawn(_logits, 4, 4, str(tmp_path / "blocks"), None)
