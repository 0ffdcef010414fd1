"""`weavelm bench throughput` on CPU with a tiny random model: every request is served with the
number of tokens it asked for, the report carries rates, latencies, KV use and the roofline
bound, and the workload generator is seeded and honours its caps."""
from weavelm.bench.throughput import workload
from weavelm.parallel.launch import spawn

TINY = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)


def _bench(tp, opts):
    from weavelm.bench import shapes
    from weavelm.bench.throughput import throughput_rank
    shapes.SHAPES["test-tiny"] = TINY
    return throughput_rank(opts)


def _opts(tp, mode):
    from weavelm.engine.config import EngineConfig
    config = EngineConfig(tp=tp, mode=mode, backend="torch", device="cpu", max_num_seqs=4,
                          max_num_batched_tokens=64)
    return dict(shape="test-tiny", layers=None, config=config, num_requests=12,
                input_len=None, output_len=None, input_max=96, seed=3)


def test_workload_is_seeded_and_capped():
    a, b = workload(50, 256, 1, input_max=96), workload(50, 256, 1, input_max=96)
    assert a == b and workload(50, 256, 2, input_max=96) != a
    assert all(1 <= len(p) <= 96 and 1 <= o <= 512 for p, o in a)
    assert {len(p) for p, _ in workload(5, 256, 1, input_len=7, output_len=3)} == {7}


def test_compare_hf_times_transformers_on_the_same_requests():
    from weavelm.bench.throughput import format_result
    opts = dict(_opts(1, "baseline"), compare="hf", num_requests=5)
    r = _bench(1, opts)
    assert r["compare"]["transformers_s"] > 0 and r["compare"]["speedup"] > 0
    assert "transformers (static batches of 16" in format_result(r)


def test_bench_throughput_cpu_tp1_and_tp2_weave():
    from weavelm.bench.throughput import format_result
    for tp, mode in ((1, "baseline"), (2, "weave")):
        r = spawn(_bench, tp, tp, _opts(tp, mode)) if tp > 1 else _bench(1, _opts(1, mode))
        want = sum(o for _, o in workload(12, 256, 3, input_max=96))
        assert r["result"]["requests"] == 12 and r["result"]["output_tokens"] == want
        assert 0 < r["rates"]["fraction_of_bound"] and r["bound"]["total_s"] > 0
        assert r["result"]["peak_kv_blocks"] <= r["result"]["kv_blocks"]
        table = format_result(r)
        assert "TTFT" in table and "bound / measured" in table and f"TP={tp}" in table


def test_plot_draws_throughput_and_latency_distributions(tmp_path):
    import pytest
    pytest.importorskip("matplotlib")
    from weavelm.bench.throughput import plot
    r = _bench(1, dict(_opts(1, "baseline"), num_requests=4))
    assert len(r["result"]["ttft_s"]) == 4 and r["result"]["ttft_s"] == sorted(r["result"]["ttft_s"])
    path = tmp_path / "t.png"
    plot(r, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_shared_prefix_workload_hits_the_prefix_cache():
    """12 requests over 2 shared prefixes of 48 tokens: after each prefix's first request, its
    3 full blocks come from the cache (a hit rate near 10/12 of the prefix blocks); caching off
    finds nothing, and the same tokens are served either way."""
    import dataclasses

    from weavelm.bench.throughput import format_result
    requests = workload(12, 256, 3, input_len=5, output_len=4, prefix_len=48, num_prefixes=2)
    assert all(p[:48] == requests[k % 2][0][:48] for k, (p, _) in enumerate(requests))
    assert requests[0][0][:48] != requests[1][0][:48]
    opts = dict(_opts(1, "baseline"), input_len=5, output_len=4, prefix_len=48, num_prefixes=2)
    on = _bench(1, opts)
    off = _bench(1, dict(opts, config=dataclasses.replace(opts["config"],
                                                          enable_prefix_caching=False)))
    assert on["result"]["prefix_hit_rate"] > 0.5 and off["result"]["prefix_hit_rate"] == 0
    assert on["result"]["output_tokens"] == off["result"]["output_tokens"] == 48
    assert "prefix caching on: hit rate" in format_result(on)


def test_sharegpt_like_lengths_follow_the_published_means_and_vllm_pruning():
    """`--dataset-shape sharegpt`: seeded; every pair within vLLM's benchmark pruning (4..1024
    prompt tokens, at least 4 out, at most 2,048 together); the means near ShareGPT's (161 in,
    338 out before pruning, which trims the long tails) and far from the synthetic default's;
    served end to end through the engine with its report naming the shape."""
    from weavelm.bench.throughput import format_result
    a = workload(3000, 256, 5, dataset_shape="sharegpt")
    assert a == workload(3000, 256, 5, dataset_shape="sharegpt")
    ins, outs = [len(p) for p, _ in a], [o for _, o in a]
    assert all(4 <= i <= 1024 and o >= 4 and i + o <= 2048 for i, o in zip(ins, outs))
    mean_in, mean_out = sum(ins) / len(a), sum(outs) / len(a)
    assert 130 < mean_in < 165 and 280 < mean_out < 340, (mean_in, mean_out)
    opts = dict(_opts(1, "baseline"), num_requests=4, dataset_shape="sharegpt")
    r = _bench(1, opts)
    want = workload(4, 256, 3, dataset_shape="sharegpt")
    assert r["result"]["output_tokens"] == sum(o for _, o in want)
    assert "ShareGPT-like lengths" in format_result(r)


def test_sharegpt_shape_refuses_fixed_lengths_in_one_line():
    from cli_run import assert_one_line_error, weavelm
    assert_one_line_error(*weavelm("bench", "throughput", "--dataset-shape", "sharegpt",
                                   "--input-len", "8", "--device", "cpu"),
                          "--dataset-shape sharegpt", "--input-len")
    assert_one_line_error(*weavelm("bench", "throughput", "--dataset-shape", "alpaca",
                                   "--device", "cpu"), "--dataset-shape", "alpaca")


def test_decode_bound_is_the_slower_of_weight_reads_and_gemm_flops():
    """The bound's decode part: weights and KV read once a step at the copy rate, or, where
    that is faster, the decode tokens' FLOPs at the GEMM rate (a batch of 1,024 sequences of
    an 8B model is compute-bound)."""
    from types import SimpleNamespace

    from weavelm.bench.throughput import roofline_seconds
    cfg = SimpleNamespace(num_heads=4, head_dim=8, num_kv_heads=2, hidden_size=32,
                          intermediate_size=64, num_layers=2, vocab_size=100)
    layer = 32 * (32 + 2 * 16) + 32 * 32 + 3 * 32 * 64            # params of a layer
    requests = [([1] * 10, 4)] * 8                                # 8 prompts of 10, 4 outputs
    keys = 8 * (4 * 10 + 4 * 3 / 2)
    flops_s = (2 * 2 * layer * 32 + 2 * 100 * 32 * 32 + 4 * 2 * 32 * keys) / 1e6
    # copy fast: the FLOPs decide; copy slow: 4 steps of weights + the keys' KV
    fast = roofline_seconds(cfg, 1, requests, 8, flops=1e6, copy=1e12, weight_bytes=1000,
                            kv_bytes_per_token=10)
    assert abs(fast["decode_s"] - flops_s) < 1e-9 and fast["decode_flops_s"] == fast["decode_s"]
    slow = roofline_seconds(cfg, 1, requests, 8, flops=1e12, copy=100, weight_bytes=1000,
                            kv_bytes_per_token=10)
    assert slow["decode_steps"] == 4
    assert abs(slow["decode_s"] - (4 * 1000 + keys * 10) / 100) < 1e-9
    # two ranks share the FLOPs; each reads its own (halved) weights, given per rank
    assert abs(roofline_seconds(cfg, 2, requests, 8, flops=1e6, copy=1e12, weight_bytes=500,
                                kv_bytes_per_token=5)["decode_s"] - flops_s / 2) < 1e-9
