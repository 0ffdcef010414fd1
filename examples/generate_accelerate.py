"""Tensor-parallel generation under `accelerate launch`: every process is one TP rank.

    accelerate launch --config_file examples/accelerate_tp3.yaml examples/generate_accelerate.py
    accelerate launch --multi_gpu --num_processes 3 examples/generate_accelerate.py  # GPUs or CPU

On a machine without GPUs the second command starts 3 CPU ranks that join over gloo: accelerate
hands `--multi_gpu` processes to torchrun, and this script asks for the CPU when no GPU is
visible. (`accelerate launch --cpu --num_processes 3` starts only ONE process: accelerate's
multi-CPU launch needs MPI and a hostfile; the script then says it runs at TP 1.)

`accelerate launch` sets RANK / WORLD_SIZE / LOCAL_RANK like torchrun; weavelm joins that
process group and takes GPU LOCAL_RANK. Accelerate's `PartialState` is used only to print on the
main process.
"""
import argparse
import os
import sys

import torch
from accelerate import PartialState

from weavelm import LLM, SamplingParams, WeavelmError


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    one_process = "WORLD_SIZE" not in os.environ
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and one_process:
        print("note: `accelerate launch --cpu` starts one process, so this runs at TP 1; for N "
              "CPU ranks use `accelerate launch --multi_gpu --num_processes N` on a machine "
              "without GPUs", file=sys.stderr)
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)               # initialises the process group (gloo on CPU)
    device = "cpu" if cpu else "cuda"
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
