#!/usr/bin/env bash
# Multi-GPU benchmarks: fused kernel vs NCCL (+ CTA sweep), then prefill per schedule.
#   bash benchmarks/device/run_4gpu_bench.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 240 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; tail -45 "$OUT/bench_fused_comm.txt"
timeout 300 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --json "$OUT/prefill.json" > "$OUT/bench_prefill.txt" 2>&1
echo "bench prefill exit $?"; tail -12 "$OUT/bench_prefill.txt"
timeout 120 python3 benchmarks/device/diag_precision.py > "$OUT/diag_precision.txt" 2>&1; echo "diag exit $?"; tail -3 "$OUT/diag_precision.txt"
