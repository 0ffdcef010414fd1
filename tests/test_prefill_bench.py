"""`weavelm bench prefill` on CPU at TP=2 (gloo): every mode is timed on the same model, the
table and JSON carry what was asked, and the weave's logits path is the one the engine uses."""
from weavelm.parallel.launch import spawn

TINY = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)


def _bench(tp, opts):
    from weavelm.bench import shapes
    from weavelm.bench.prefill import bench_prefill_rank
    from weavelm.parallel.state import destroy_parallel
    shapes.SHAPES["test-tiny"] = TINY
    try:
        return bench_prefill_rank(opts)
    finally:
        destroy_parallel()


def test_bench_prefill_cpu_all_modes():
    from weavelm.bench.prefill import format_table
    opts = dict(shape="test-tiny", layers=2, tp=2, tokens=[40, 96], seq_len=None, repeats=1,
                modes=["baseline", "fused", "weave", "nocomm"], backend="torch", device="cpu",
                ctas=None, carveout=0, graph=False)
    result = spawn(_bench, 2, 2, opts)
    assert [r["tokens"] for r in result["rows"]] == [40, 96]
    for r in result["rows"]:
        assert 0 < r["split"] < r["tokens"] and r["split"] % 2 == 0, r
        for mode in opts["modes"]:
            assert isinstance(r[mode], float) and r[mode] > 0, (mode, r)
    assert result["meta"]["carveout"] == 0 and result["meta"]["graph"] is False
    table = format_table(result)
    assert "eager" in table and "| 96 |" in table and "weave vs baseline" in table
