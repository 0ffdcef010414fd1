#!/usr/bin/env bash
# Round 4 on 2 GPUs: every GPU test (the fused-kernel acceptance sweep at N = 2 included) and
# the fused-kernel table with its CTA sweep.
#   bash benchmarks/device/run_2gpu_round4.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?"; tail -2 "$OUT/gpu_tests.txt"
timeout 120 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 --graph-max-tokens 128 \
  --iters 30 --json "$OUT/fused_comm.json" > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; grep -A30 "^### Fused" "$OUT/bench_fused_comm.txt"
