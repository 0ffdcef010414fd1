#!/usr/bin/env bash
# Prefill latency per schedule (baseline, fused, weave, nocomm), Llama-3-70B shape, 8 layers,
# random weights, TP = N: `weavelm bench prefill --shape llama3-70b --layers 8 --tp N`
# (tokens 1k-16k, CUDA graphs: the CLI's defaults on GPUs). Extra args go to the CLI and
# override, e.g. `--eager`, `--tokens 4k,16k`, `--modes baseline,weave`, `--ctas 8,16`.
#   bash benchmarks/device/run_prefill.sh N [weavelm bench prefill args]
# Results: ${OUT:-out}/prefill_tpN[_eager].{txt,json}; plot with
#   python3 benchmarks/plot_results.py prefill out/prefill_tpN.json out/prefill_tpN.png
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
N=$1; shift
name=prefill_tp$N
for a in "$@"; do [ "$a" = --eager ] && name=${name}_eager; done
timeout -k 30 "${TIMEOUT:-540}" "${WEAVELM[@]}" bench prefill --shape llama3-70b --layers 8 \
  --tp "$N" --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.txt"
rc=${PIPESTATUS[0]}
echo "bench prefill at TP $N: exit $rc"
exit "$rc"
