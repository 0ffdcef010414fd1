"""Tiny random checkpoints made with transformers, for comparing weavelm against it."""
from __future__ import annotations

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


# Mixture of experts: Mixtral (top-2 of 8, expert size 96: 24 per rank at TP 4) and Qwen3-MoE
# (top-4 of 16, expert size 40, no renormalisation; layer 1 a dense MLP via mlp_only_layers).
MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=96),
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=40,
                      norm_topk_prob=False, mlp_only_layers=[1], head_dim=24),
}
ROUTER_STD = 0.3   # router logits a few units apart: rounding cannot swap a token's experts
EXPERT_SCALE = 5   # experts' weights N(0, 0.1): their outputs weigh in the logits


def make_tiny(kind: str, directory, kv_heads: int = 2, shard: bool = False, seed: int = 0,
              layers: int = 2, heads: int = 4, **config):
    """Save a random `kind` model (llama, qwen2, qwen3, mistral, mixtral, qwen3_moe) to
    `directory`; return it. MoE routers get N(0, ROUTER_STD) weights: with transformers'
    N(0, 0.02) every router logit is near zero, and a rounding difference could pick another
    expert (a different, not a wrong, result). Expert weights are scaled by EXPERT_SCALE."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=103,
                  max_position_embeddings=256, eos_token_id=2, bos_token_id=1)
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_scaling=LLAMA3_ROPE)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=24)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=16)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, MOE["mixtral"]),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, MOE["qwen3_moe"]),
    }[kind]
    config_cls, model_cls, extra = cls
    model = model_cls(config_cls(**{**common, **extra, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if kind in MOE and name.endswith("gate.weight") and p.dim() == 2:
                p.normal_(0.0, ROUTER_STD)
            elif kind in MOE and "experts" in name:
                p.mul_(EXPERT_SCALE)
    if kind == "qwen2":   # random q/k/v biases, so the bias path is really exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_()
    model.save_pretrained(directory, safe_serialization=True,
                          max_shard_size="100KB" if shard else "5GB")
    return model


def reference_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0] for s in seqs])


def greedy_reference(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy tokens, one prompt at a time, the whole sequence recomputed for
    every new token."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(new):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(p):])
    return outs


def pickle_copy(src, dst):
    """Copy the checkpoint in `src` to `dst` as a pickle `pytorch_model.bin`; return dst."""
    import shutil

    from safetensors.torch import load_file
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def save_tiny_tokenizer(directory, vocab_size: int = 103):
    """A word-level tokenizer whose words are the token ids "0".."vocab_size-1" (so "1 2 3"
    encodes to [1, 2, 3]), saved beside a tiny checkpoint for CLI runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="2").save_pretrained(str(directory))
