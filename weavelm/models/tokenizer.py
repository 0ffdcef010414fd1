"""Tokenizers for weavelm: from a GGUF file or a local Hugging Face model directory.

Thin helpers over transformers' fast tokenizers, so the engine deals in token ids only:
`load_tokenizer` -> `encode` / `apply_chat` -> ids, and `stop_token_ids` for the sampler.
"""

from __future__ import annotations

import os
import pathlib

from weavelm.errors import WeavelmError

# End-of-turn markers of common chat formats (ChatML, Llama 3, Phi-3, Gemma). A chat model stops
# at the end of its turn, which is often not the tokenizer's `eos_token`.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def load_tokenizer(source: str | os.PathLike):
    """A transformers fast tokenizer from a `.gguf` file or a local HF model directory."""
    from transformers import AutoTokenizer

    path = pathlib.Path(source)
    if not path.exists():
        raise WeavelmError(f"tokenizer source not found: {path}")
    try:
        if path.is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        # transformers' messages span lines; the CLI prints one, so flatten (and bound) it.
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise WeavelmError(f"cannot load a tokenizer from {path}: {reason}") from e
    if path.is_file() and not tokenizer.chat_template:
        # transformers 5.24 keeps `tokenizer.chat_template` from GGUF metadata; older ones didn't.
        from weavelm.models.gguf import _reader

        fields = _reader(path).fields
        if "tokenizer.chat_template" in fields:
            tokenizer.chat_template = fields["tokenizer.chat_template"].contents()
    return tokenizer


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a raw prompt, with the special tokens the tokenizer adds by default (BOS...)."""
    return list(tokenizer(prompt).input_ids)


def apply_chat(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as one user turn in the model's chat format, ready for the reply."""
    if not tokenizer.chat_template:
        raise WeavelmError("this tokenizer has no chat template: pass a raw prompt instead of chat")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    # The template already writes BOS and friends; adding special tokens again would double them.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def stop_token_ids(tokenizer, config: dict | None = None) -> frozenset[int]:
    """Ids that end generation: the tokenizer's EOS, the config's `eos_token_id` (int or list),
    and any end-of-turn marker that the chat template writes."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = (config or {}).get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN if t in template and t in vocab)
    return frozenset(ids)
