#!/usr/bin/env bash
# Round 4, check: 16K tokens cut at 8320 (wave model), 10112 (with the causal bias) and 10240,
# more repeats, then the prefill command again at 8K and 16K.
#   bash benchmarks/device/run_4gpu_round4e.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 120 torchrun --nproc-per-node "$N" benchmarks/sweep_weave.py --tokens 16384 \
  --shifts 0.0078,0.1172,0.125 --ctas 8 --repeats 9 > "$OUT/sweep_weave.txt" 2>&1
echo "sweep exit $?"; grep -A8 "^### weave" "$OUT/sweep_weave.txt"
timeout 100 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 8k,16k --json "$OUT/prefill.json" > "$OUT/prefill.txt" 2>&1
echo "prefill exit $?"; tail -5 "$OUT/prefill.txt"
