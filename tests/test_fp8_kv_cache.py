"""FP8 KV cache on CPU (`kv_cache_dtype="fp8"`): greedy tokens and top log-probabilities of a
tiny Llama equal those of transformers (fp32) whose attention sees K (after the rotary
embedding) and V rounded to e4m3 the same way (scale 1.0), with prefill in chunks smaller than a
block, a cached prefix read back from the FP8 cache, and at TP 2; the cache takes half the
bytes per token."""
import pytest
import torch

from tiny_models import make_tiny
from weavelm.parallel.launch import spawn

NEW = 6
PROMPTS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42, 43], [1, 5, 7, 9, 11, 3, 4, 5,
                                                                      6, 7, 8, 9, 77, 78], [17]]


def rounded_reference(path, scales=None):
    """transformers' greedy tokens and top-5 log-probabilities with K and V rounded to e4m3
    (`scales`: per layer (k, v), each value divided by its scale, rounded, multiplied back)."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    e4m3 = torch.float8_e4m3fn
    scales = scales or [(1.0, 1.0)] * len(model.model.layers)
    current = [0]                                        # the layer whose attention runs

    def rnd(x, s):
        return (x / s).clamp(-448, 448).to(e4m3).to(x.dtype) * s
    rope = llama.apply_rotary_pos_emb

    def rounded_rope(q, k, cos, sin, *args, **kw):
        q, k = rope(q, k, cos, sin, *args, **kw)
        return q, rnd(k, scales[current[0]][0])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: current.__setitem__(0, i), with_kwargs=True)
        v_proj = layer.self_attn.v_proj
        v_proj.forward = (lambda f, s: lambda x: rnd(f(x), s))(v_proj.forward, scales[i][1])
    out = []
    llama.apply_rotary_pos_emb = rounded_rope
    try:
        with torch.no_grad():
            for p in PROMPTS:
                ids, top = list(p), []
                for _ in range(NEW):
                    logits = model(torch.tensor([ids])).logits[0, -1].double()
                    top.append(sorted(torch.log_softmax(logits, -1).topk(5).values.tolist()))
                    ids.append(int(logits.argmax()))
                out.append((ids[len(p):], top))
    finally:
        llama.apply_rotary_pos_emb = rope
    return out


def _generate(tp, path, kv, budget):
    from weavelm import LLM, SamplingParams
    llm = LLM(path, tp=tp, device="cpu", progress=False, block_size=4, kv_cache_dtype=kv,
              max_num_batched_tokens=budget)
    outs = []
    for p in PROMPTS:                          # one by one: the second finds the first's prefix
        o = llm.generate_from_ids([p], SamplingParams(max_new_tokens=NEW, ignore_eos=True,
                                                      logprobs=5))[0]
        outs.append((o.token_ids, [sorted(v for _, v in e.top) for e in o.logprobs],
                     o.num_cached_tokens))
    kv_cache = llm.runner.kv
    return outs, kv_cache.k[0].dtype, kv_cache.k[0].element_size()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv8") / "llama"
    make_tiny("llama", path, seed=9, kv_heads=2)
    return str(path), rounded_reference(str(path))


@pytest.mark.parametrize("tp,budget", [(1, 3), (1, 64), (2, 64)])
def test_fp8_cache_equals_rounded_reference(tiny, tp, budget):
    path, want = tiny
    got, dtype, size = spawn(_generate, tp, tp, path, "fp8", budget) if tp > 1 \
        else _generate(1, path, "fp8", budget)
    assert dtype == torch.float8_e4m3fn and size == 1
    assert got[1][2] == 12                      # a prefix read back from the FP8 cache
    for (tokens, top, _), (want_tokens, want_top) in zip(got, want):
        assert tokens == want_tokens
        assert torch.allclose(torch.tensor(top, dtype=torch.float64),
                              torch.tensor(want_top, dtype=torch.float64), atol=1e-4)


def test_fp8_cache_changes_the_numbers_and_halves_the_bytes(tiny):
    """The rounding is real (plain caches give other log-probabilities) and each token takes
    half the bytes."""
    path, want = tiny
    plain, dtype, size = _generate(1, path, "auto", 64)
    assert dtype == torch.float32 and size == 4
    diff = max(abs(a - b) for (_, top, _), (_, wt) in zip(plain, want)
               for row, wrow in zip(top, wt) for a, b in zip(row, wrow))
    assert diff > 1e-3
    from weavelm.models.kv_cache import FP8, PagedKVCache
    assert PagedKVCache.bytes_per_block(2, 16, 2, 16, FP8) * 2 == \
        PagedKVCache.bytes_per_block(2, 16, 2, 16, torch.bfloat16)


def test_bad_kv_cache_dtype_is_refused():
    from weavelm import EngineConfig
    from weavelm.errors import WeavelmError
    with pytest.raises(WeavelmError, match="kv_cache_dtype 'int8' is not supported: use 'auto'"):
        EngineConfig(kv_cache_dtype="int8")


def test_checkpoint_kv_scales_are_used(tmp_path):
    """A checkpoint with per-layer K and V scales (compressed-tensors `kv_cache_scheme`,
    weights in full precision): the FP8 cache divides by them, layer by layer (greedy tokens
    and log-probabilities of the rounded reference with those scales, at TP 1 and 2; scales
    small enough that K and V saturate somewhere, so ignoring them would show); a bad scale
    or another scheme is refused in one line."""
    import json

    from safetensors.torch import load_file, save_file

    from weavelm import LLM
    from weavelm.errors import WeavelmError
    path = tmp_path / "llama"
    make_tiny("llama", path, seed=9, kv_heads=2)
    scales = [(0.0123, 0.0071), (0.0246, 0.0142)]
    want = rounded_reference(str(path), scales)          # (before the checkpoint names them)
    unscaled = rounded_reference(str(path))
    state = load_file(path / "model.safetensors")
    for i, (k, v) in enumerate(scales):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v)
    save_file(state, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    scheme = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False,
              "symmetric": True}
    cfg["quantization_config"] = {"quant_method": "compressed-tensors",
                                  "kv_cache_scheme": scheme}
    (path / "config.json").write_text(json.dumps(cfg))
    assert [t for t, _ in want] != [t for t, _ in unscaled] or want != unscaled
    for tp in (1, 2):
        got = spawn(_generate, tp, tp, str(path), "fp8", 64)[0] if tp > 1 \
            else _generate(1, str(path), "fp8", 64)[0]
        for (tokens, top, _), (want_tokens, want_top) in zip(got, want):
            assert tokens == want_tokens
            assert torch.allclose(torch.tensor(top, dtype=torch.float64),
                                  torch.tensor(want_top, dtype=torch.float64), atol=1e-4)
    state["model.layers.1.self_attn.v_scale"] = torch.tensor(-1.0)
    save_file(state, path / "model.safetensors")
    with pytest.raises(WeavelmError, match="model.layers.1.self_attn.v_scale.*positive"):
        LLM(str(path), device="cpu", progress=False, kv_cache_dtype="fp8")
    cfg["quantization_config"]["kv_cache_scheme"] = dict(scheme, strategy="channel")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeavelmError, match="kv_cache_scheme .* is not a static per-tensor"):
        LLM(str(path), device="cpu", progress=False, kv_cache_dtype="fp8")
