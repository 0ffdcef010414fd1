"""A byte-level tokenizer for a random-weight shape (`weavelm serve --shape ... --tokenizer DIR`):
its first 256 ids are the 256 bytes (GPT-2's byte-level alphabet), the rest fillers, so any text
encodes and structured output (xgrammar) can spell JSON. Random weights make no sense of it;
it is for timing the text paths (structured output, logprobs' token texts) at a real size.

    python benchmarks/device/make_shape_tokenizer.py OUT_DIR [VOCAB=128256]
"""
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def main(out: str, vocab_size: int = 128256) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), vocab_size - 1)})
    vocab["<eos>"] = vocab_size - 1
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(out)
    sample = 'ok {"a": 1}'
    print(f"{out}: {len(fast)} tokens; {sample!r} -> {fast(sample).input_ids}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128256)
