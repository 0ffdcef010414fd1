"""Mixture-of-experts families on CPU: tiny random Mixtral (top-2 of 8, renormalised) and
Qwen3-MoE (top-4 of 16, not renormalised, layer 1 dense by `mlp_only_layers`) checkpoints give
transformers' logits and greedy next tokens at TP 1, 2 and 4 (expert size 96 and 40: 24 and 10
per rank at TP 4), and generate transformers' greedy continuations at TP 1 and 2 (woven at 2);
the weave and the fused schedule equal the baseline at TP 2 and 4; a GGUF written from the tiny
Mixtral the way llama.cpp writes one (llama architecture, `expert_count`, stacked `ffn_*_exps`)
loads and matches. The routing and the grouped expert compute are checked against
transformers' routers and a float64 reference."""
import numpy as np
import pytest
import torch

from tiny_models import make_tiny, reference_logits, save_tiny_tokenizer
from weavelm.errors import WeavelmError
from weavelm.kernels.moe import group_by_expert, moe_experts, moe_experts_reference, route
from weavelm.parallel.launch import spawn

SEQS = [[1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 42, 43, 44, 45, 46, 47, 99],
        [2, 3, 4], [17]]
PROMPTS = [[1, 5, 9, 14, 20, 7, 7, 3, 44, 12, 90], [4, 8, 15, 16, 23, 42, 4, 8, 15],
           [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47]]
NEW = 5


# -- the maths: routing and the grouped compute ---------------------------------------------
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("renorm", [True, False])
def test_route_is_transformers_router(kind, renorm):
    import transformers as tf
    if kind == "mixtral" and not renorm:
        pytest.skip("Mixtral always renormalises")
    D, E, K = 32, 12, 3
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter as Router
        cfg = tf.MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=K)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter as Router
        cfg = tf.Qwen3MoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=K,
                                norm_topk_prob=renorm)
    router = Router(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(50, D)
        _, ref_w, ref_ids = router(x)
        w, ids = route(x @ router.weight.t(), K, renorm)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["loop", "native"])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (3, 8, 2), (37, 16, 4), (64, 4, 4)])
def test_grouped_compute_equals_float64_reference(impl, T, E, K):
    # "native" is torch._grouped_mm (torch's CPU implementation here; the GPU test runs the
    # sm90 kernel). Few tokens leave experts empty; K = E routes every token everywhere.
    g = torch.Generator().manual_seed(T * E + K)
    D, inter = 24, 20
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * inter, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, inter, generator=g) / inter ** 0.5
    weights, ids = route(torch.randn(T, E, generator=g), K, True)
    out = torch.full((T, D), float("nan"))
    got = moe_experts(x, w13, w2, weights, ids, out=out, impl=impl)
    assert got.data_ptr() == out.data_ptr()
    ref = moe_experts_reference(x.double(), w13.double(), w2.double(), weights.double(), ids)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (37, 16, 4), (64, 4, 4)])
def test_masked_grouped_mm_equals_the_loop(T, E, K):
    # the loop's form for CUDA-graph capture (no host read of the offsets), checked on CPU
    from weavelm.kernels.moe import grouped_mm_loop, grouped_mm_masked
    g = torch.Generator().manual_seed(T + E)
    _, ids = route(torch.randn(T, E, generator=g), K, True)
    _, offsets = group_by_expert(ids, E)
    a, b = torch.randn(T * K, 12, generator=g), torch.randn(E, 12, 5, generator=g)
    torch.testing.assert_close(grouped_mm_masked(a, b, offsets), grouped_mm_loop(a, b, offsets),
                               rtol=1e-6, atol=1e-6)


def test_group_by_expert_orders_rows_and_counts():
    ids = torch.tensor([[3, 0], [0, 2], [3, 1]])
    order, offsets = group_by_expert(ids, 5)
    assert ids.reshape(-1)[order].tolist() == [0, 0, 1, 2, 3, 3]
    assert order.tolist() == [1, 2, 5, 3, 0, 4]                  # stable within an expert
    assert offsets.tolist() == [2, 3, 4, 6, 6]


# -- whole models against transformers, every schedule ---------------------------------------
def _greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for kind in ("mixtral", "qwen3_moe"):
        model = make_tiny(kind, root / kind, seed=3)
        out[kind] = dict(path=str(root / kind), logits=reference_logits(model, SEQS),
                         tokens=[_greedy(model, p, NEW) for p in PROMPTS])
    out["gguf"] = dict(path=str(_write_mixtral_gguf(root / "mixtral", root / "mixtral.gguf")),
                       logits=out["mixtral"]["logits"])
    return out


def _run(tp, paths, weave):
    from weavelm import LLM, SamplingParams
    from weavelm.weave.executor import Mode
    from weavelm.parallel.state import destroy_parallel
    result = {}
    for name, path in paths.items():
        llm = LLM(path, tp=tp, device="cpu", progress=False)
        r = result[name] = {"logits": llm.logits(SEQS, mode="baseline")}
        if weave and name != "gguf":
            T = sum(len(p) for p in PROMPTS)
            llm.mode = Mode.WEAVE
            mode, split = llm.prefill_schedule(T)
            assert mode is Mode.WEAVE and 0 < split < T, (mode, split)
            base = llm.logits(PROMPTS, mode="baseline")
            r["err"] = {m: (llm.logits(PROMPTS, mode=m, split=split if m == "weave" else None)
                            - base).abs().max().item() for m in ("fused", "weave")}
        if name != "gguf" and tp < 4:   # woven at TP 2; TP 4: greedy = argmax of logits
            # (each gloo decode step at TP 4 costs seconds on two cores)
            outs = llm.generate_from_ids(PROMPTS, SamplingParams(max_new_tokens=NEW,
                                                                 ignore_eos=True))
            r["tokens"] = [o.token_ids for o in outs]
        del llm
    destroy_parallel()
    return result


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_moe_matches_transformers_and_weave_equals_baseline(tp, checkpoints):
    paths = {name: c["path"] for name, c in checkpoints.items()}
    if tp == 4:
        paths.pop("gguf")                  # GGUF loading is the same code at every TP
    ours = spawn(_run, tp, tp, paths, True) if tp > 1 else _run(1, paths, False)
    for name in paths:
        ref, got = checkpoints[name], ours[name]
        err = (got["logits"] - ref["logits"]).abs().max().item()
        assert err < 2e-4, f"{name} at TP={tp}: max |logit diff| {err}"
        if name == "gguf":
            continue
        assert torch.equal(got["logits"].argmax(-1), ref["logits"].argmax(-1)), (name, tp)
        if tp < 4:
            assert got["tokens"] == ref["tokens"], (name, tp)
        if tp > 1:
            assert max(got["err"].values()) < 1e-5, (name, tp, got["err"])


# -- GGUF, as llama.cpp writes a Mixtral ------------------------------------------------------
def _write_mixtral_gguf(src, path):
    import json

    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((src / "config.json").read_text())
    state = {k: v.numpy() for k, v in load_file(src / "model.safetensors").items()}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w, n):   # llama.cpp's q/k row order: each head's two halves interleaved
        return w.reshape(n, 2, w.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p, moe = f"model.layers.{i}.", f"model.layers.{i}.block_sparse_moe."
        names = {"attn_norm": p + "input_layernorm", "ffn_norm": p + "post_attention_layernorm",
                 "attn_v": p + "self_attn.v_proj", "attn_output": p + "self_attn.o_proj",
                 "ffn_gate_inp": moe + "gate"}
        for g, hf in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", state[hf + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(state[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(state[p + "self_attn.k_proj.weight"], kv))
        for g, hf in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
            w.add_tensor(f"blk.{i}.{g}.weight", np.stack(
                [state[f"{moe}experts.{e}.{hf}.weight"] for e in range(cfg["num_local_experts"])]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_config_is_mixtral(checkpoints):
    from weavelm.models.gguf import gguf_config
    cfg = gguf_config(checkpoints["gguf"]["path"])
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)


# -- configs and checkpoints that cannot run are refused in one line --------------------------
def _config(kind, **changes):
    from tiny_models import MOE
    base = dict(architectures=["MixtralForCausalLM" if kind == "mixtral" else
                               "Qwen3MoeForCausalLM"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=103)
    base.update(MOE[kind], **changes)
    return base


def test_qwen3_moe_sparse_step_and_dense_layers():
    from weavelm.models.config import ModelConfig
    cfg = ModelConfig.from_hf(_config("qwen3_moe", decoder_sparse_step=2, mlp_only_layers=[3]))
    assert cfg.moe_layers == [1]
    assert ModelConfig.from_hf(_config("mixtral")).moe_layers == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_missing_norm_eps_and_rope_theta_mean_transformers_defaults(kind):
    """A config.json without rms_norm_eps / rope_theta means the values transformers' own
    config class fills in (Mixtral's differ from Llama's)."""
    import transformers
    from weavelm.models.config import ModelConfig
    base = {k: v for k, v in _config(kind).items()
            if k not in ("rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling")}
    cls = transformers.MixtralConfig if kind == "mixtral" else transformers.Qwen3MoeConfig
    want = cls()
    theta = (getattr(want, "rope_parameters", None) or {}).get("rope_theta") \
        or getattr(want, "rope_theta", None)
    cfg = ModelConfig.from_hf(base)
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (want.rms_norm_eps, theta)


@pytest.mark.parametrize("kind,changes,words", [
    ("qwen3_moe", dict(decoder_sparse_step=0), "decoder_sparse_step"),
    ("qwen3_moe", dict(mlp_only_layers="all"), "mlp_only_layers"),
    ("qwen3_moe", dict(num_experts=None, num_local_experts=None), "num_experts"),
    ("mixtral", dict(num_experts_per_tok=9), "exceeds"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts"),
])
def test_bad_moe_config_is_refused(kind, changes, words):
    from weavelm.models.config import ModelConfig
    with pytest.raises(WeavelmError, match=words) as err:
        ModelConfig.from_hf(_config(kind, **changes))
    assert "\n" not in str(err.value)


def test_tp_must_split_the_experts():
    from weavelm.models.config import ModelConfig
    cfg = ModelConfig.from_hf(_config("qwen3_moe"))                 # experts of 40: not TP 8
    with pytest.raises(WeavelmError, match="experts 40"):
        cfg.check_tp(8)


def test_missing_expert_tensor_is_refused(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from weavelm import LLM
    d = tmp_path / "bad"
    shutil.copytree(checkpoints["mixtral"]["path"], d)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(WeavelmError, match="missing 1 tensors .*experts.w13"):
        LLM(str(d), tp=1, device="cpu", progress=False)


def test_cli_generate_runs_tiny_mixtral_at_tp2(checkpoints, tmp_path):
    # The tokenizer's words are the token ids: stdout is transformers' greedy continuation.
    import os
    import shutil
    import subprocess
    import sys
    d = tmp_path / "mixtral"
    shutil.copytree(checkpoints["mixtral"]["path"], d)
    save_tiny_tokenizer(d)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "weavelm.cli.main", "generate", str(d), "-p", "1 5 9 14",
                        "--no-chat", "--device", "cpu", "-n", "4", "--tp", "2"], cwd=root,
                       env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    model = make_tiny("mixtral", tmp_path / "again", seed=3)       # the same weights
    assert p.stdout.split() == [str(t) for t in _greedy(model, [1, 5, 9, 14], 4)], p.stdout


# -- the splitter's cost model and the prefill benchmark know MoE layers ----------------------
def test_named_moe_shapes_and_their_grouped_gemms():
    from weavelm.bench.shapes import shape_config
    from weavelm.weave.wave_model import gemm_waves
    from weavelm.models.config import ModelConfig
    from weavelm.models.registry import GemmShape, family_for
    for name, E, K in (("mixtral-8x7b", 8, 2), ("mixtral-8x22b", 8, 2), ("qwen3-30b-a3b", 128, 8)):
        cfg = ModelConfig.from_hf(shape_config(name, 4))
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_layers) == (E, K, [0, 1, 2, 3])
        cfg.check_tp(8)
        gemms = {g.name: g for g in family_for(cfg.architecture).layer_gemms(cfg, 2)}
        up = gemms["experts_gate_up"]
        assert (up.n, up.k, up.experts, up.top_k) == (cfg.moe_intermediate_size,
                                                      cfg.hidden_size, E, K)
        # uniform routing: 8192 tokens put 8192 K / E rows on each expert's GEMM
        one = GemmShape(up.n, up.k)
        tiles = -(-8192 * K // E // 128) * -(-up.n // 256)
        assert gemm_waves(8192, up) == -(-E * tiles // 132)
        assert gemm_waves(8192 * K // E, one) == -(-tiles // 132)


def test_bench_prefill_runs_a_random_moe_shape():
    from weavelm.bench import shapes
    from weavelm.bench.prefill import bench_prefill_rank, format_table
    shapes.SHAPES["test-tiny-moe"] = dict(
        architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096)
    try:
        result = bench_prefill_rank(dict(shape="test-tiny-moe", layers=2, tp=1, tokens=[40],
                                         seq_len=None, repeats=1, modes=["baseline"],
                                         backend="torch", device="cpu", verbose=False))
    finally:
        shapes.SHAPES.pop("test-tiny-moe")
    assert result["rows"][0]["baseline"] > 0
    assert "2 of 4 experts" in format_table(result) and "uniform" in result["meta"]["moe"]


def test_bench_moe_script_logic_on_cpu():
    # benchmarks/bench_moe.py with a tiny shape on CPU: transformers' in-memory experts load
    # through weavelm's loaders (equal logits), and every figure of the GPU run is produced.
    import os
    import sys

    from weavelm.bench import shapes
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import bench_moe
    for arch, extra in (("MixtralForCausalLM", dict(num_local_experts=4, intermediate_size=96)),
                        ("Qwen3MoeForCausalLM", dict(num_experts=4, intermediate_size=128,
                                                     moe_intermediate_size=40, head_dim=16))):
        shapes.SHAPES["test-moe-bench"] = dict(
            architectures=[arch], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2,
            max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, **extra)
        try:
            r = bench_moe.main(["--shape", "test-moe-bench", "--layers", "2", "--tokens", "48",
                                "--device", "cpu", "--dtype", "float32", "--repeats", "1"])
        finally:
            shapes.SHAPES.pop("test-moe-bench")
        assert r["max_logit_diff"] < 2e-4, (arch, r["max_logit_diff"])
        assert r["moe_layers"] == 2 and sum(r["routed_per_expert"].values()) > 0
        for key in ("moe_tflops", "dense_tflops", "prefill_speedup", "decode_vs_copy"):
            assert r[key] > 0, (arch, key)
