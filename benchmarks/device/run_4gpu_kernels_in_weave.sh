#!/usr/bin/env bash
# Same host, same run: the weave (CUDA graphs) with the pull kernel and with the scatter kernel.
#   bash benchmarks/device/run_4gpu_kernels_in_weave.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
for s in 0 1 0 1; do
  WEAVELM_P2P_SCATTER=$s timeout 100 python3 -m cli.main bench prefill --shape llama3-70b \
    --layers 8 --tp "$N" --tokens 4k,8k,16k --modes baseline,weave --graph > /tmp/w$s.txt 2>&1
  echo "WEAVELM_P2P_SCATTER=$s exit $?"; tail -4 /tmp/w$s.txt
  (echo "## WEAVELM_P2P_SCATTER=$s"; cat /tmp/w$s.txt) >> "$OUT/kernels_in_weave.txt"
done
