#!/usr/bin/env bash
# Round 4, final 4-GPU call: every GPU test, then the prefill command as a user runs it
# (CUDA graphs by default; the splitter's causal bias puts the cut at about T/2 + T/8).
#   bash benchmarks/device/run_4gpu_round4d.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?"; tail -2 "$OUT/gpu_tests.txt"
timeout 150 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --json "$OUT/prefill.json" > "$OUT/prefill.txt" 2>&1
echo "prefill exit $?"; tail -9 "$OUT/prefill.txt"
