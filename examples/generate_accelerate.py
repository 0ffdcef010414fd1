"""Tensor-parallel generation under `accelerate launch`: every process is one TP rank.

    accelerate launch --config_file examples/accelerate_tp3.yaml examples/generate_accelerate.py
    accelerate launch --cpu --num_processes 3 examples/generate_accelerate.py      # CPU, gloo

`accelerate launch` sets RANK / WORLD_SIZE / LOCAL_RANK like torchrun; weavelm joins that
process group and takes GPU LOCAL_RANK. Accelerate's `PartialState` is used only to print on the
main process.
"""
import argparse
import sys

from accelerate import PartialState

from weavelm import LLM, SamplingParams, WeavelmError


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    state = PartialState()                      # initialises the process group
    device = "cuda" if state.device.type == "cuda" else "cpu"
    llm = LLM(args.model, tp=state.num_processes, device=device)
    prompt = "Give me one sentence about tensor parallelism."
    out = llm.generate([prompt], SamplingParams(max_new_tokens=args.max_new_tokens), chat=True)
    if state.is_main_process:
        print(f"[TP={state.num_processes}, {device}] {prompt}\n  -> {out[0].text.strip()}")


if __name__ == "__main__":
    try:
        main()
    except WeavelmError as e:                   # bad input: one line, no traceback
        sys.exit(f"error: {e}")
