#!/usr/bin/env bash
# Round 4, third call: where the weave's time goes under CUDA graphs (per-reduction stalls), at
# 4K and 16K tokens, cut at T/2 and at T/2 + T/8.
#   bash benchmarks/device/run_4gpu_round4c.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
for T in 4096 16384; do
  timeout 80 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens $T --layers 8 \
    --graph --modes weave,nocomm > "$OUT/profile_graph_$T.txt" 2>&1
  echo "profile $T exit $?"; grep -v "Warning\|warn\|^W1\|\*\*\*\*" "$OUT/profile_graph_$T.txt" | grep -B2 -A16 "^### weave"
  grep -A3 "^### nocomm" "$OUT/profile_graph_$T.txt"
  timeout 60 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens $T --layers 8 \
    --graph --modes weave --shift 0.125 > "$OUT/profile_graph_${T}_shift.txt" 2>&1
  echo "profile $T shift exit $?"; grep -A16 "^### weave" "$OUT/profile_graph_${T}_shift.txt"
done
