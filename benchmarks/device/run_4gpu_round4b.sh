#!/usr/bin/env bash
# Round 4, second call: the prefill command (CUDA graphs are now its default on GPUs),
# then the weave against its cut and CTA count at 4K-16K, and the same with the scatter kernel.
#   bash benchmarks/device/run_4gpu_round4b.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 150 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --json "$OUT/prefill.json" > "$OUT/prefill.txt" 2>&1
echo "prefill exit $?"; tail -9 "$OUT/prefill.txt"
timeout 120 torchrun --nproc-per-node "$N" benchmarks/sweep_weave.py --tokens 4096,8192,16384 \
  --shifts 0,0.125 --ctas 4,8 > "$OUT/sweep_weave.txt" 2>&1
echo "sweep exit $?"; grep -A20 "^### weave" "$OUT/sweep_weave.txt"
WEAVELM_P2P_SCATTER=1 timeout 90 torchrun --nproc-per-node "$N" benchmarks/sweep_weave.py \
  --tokens 8192,16384 --shifts 0,0.125 --ctas 8 > "$OUT/sweep_weave_scatter.txt" 2>&1
echo "sweep scatter exit $?"; grep -A12 "^### weave" "$OUT/sweep_weave_scatter.txt"
