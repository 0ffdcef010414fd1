"""Named real-model shapes, as Hugging Face config dicts, for benchmarks with random weights."""
from __future__ import annotations

from weavelm.errors import check

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                      max_position_embeddings=131072, eos_token_id=128001, bos_token_id=128000),
    "llama3-70b": dict(architectures=["LlamaForCausalLM"], hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                       rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                       max_position_embeddings=131072, eos_token_id=128001,
                       bos_token_id=128000),
    "qwen2.5-72b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=8192,
                        intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=32768,
                        eos_token_id=151645, bos_token_id=151643),
    # Mixture of experts (random router weights: routing about uniform, T * top_k / E tokens
    # per expert; trained routers are less even).
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, max_position_embeddings=32768,
                         num_local_experts=8, num_experts_per_tok=2, eos_token_id=2,
                         bos_token_id=1),
    "mixtral-8x22b": dict(architectures=["MixtralForCausalLM"], hidden_size=6144,
                          intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
                          num_key_value_heads=8, vocab_size=32768, rms_norm_eps=1e-5,
                          rope_theta=1000000.0, max_position_embeddings=65536,
                          num_local_experts=8, num_experts_per_tok=2, eos_token_id=2,
                          bos_token_id=1),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, max_position_embeddings=40960, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], eos_token_id=151645, bos_token_id=151643),
}


def shape_config(name: str, layers: int | None = None) -> dict:
    """The config dict of a named shape, optionally with fewer layers."""
    check(name in SHAPES, f"unknown model shape {name!r}: choose one of {', '.join(SHAPES)}")
    cfg = dict(SHAPES[name])
    if layers is not None:
        check(layers >= 1, f"--layers must be at least 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    return cfg
