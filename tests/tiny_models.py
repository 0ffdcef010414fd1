"""Tiny random checkpoints made with transformers, for comparing weavelm against it."""
from __future__ import annotations

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def make_tiny(kind: str, directory, kv_heads: int = 2, shard: bool = False, seed: int = 0,
              layers: int = 2, heads: int = 4):
    """Save a random `kind` model (llama, qwen2, qwen3, mistral) to `directory`; return it."""
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
    }[kind]
    config_cls, model_cls, extra = cls
    model = model_cls(config_cls(**common, **extra)).eval()
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
