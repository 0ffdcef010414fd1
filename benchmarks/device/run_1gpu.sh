#!/usr/bin/env bash
# One H100: kernel-layer and model GPU tests, RMSNorm benchmark, decode benchmark.
#   bash benchmarks/device/run_1gpu.sh      (results under $OUT)
set -u
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > "$OUT/gpu.txt"
python3 -m cli.main env 2>&1 | tee "$OUT/env.txt"
timeout 300 python3 -m pytest tests/gpu -q -x -m "gpu and not multigpu" -p no:cacheprovider \
  > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests exit $?"; tail -25 "$OUT/gpu_tests.txt"
timeout 180 python3 benchmarks/bench_rmsnorm.py --tokens 16384 --hidden 8192 \
  > "$OUT/bench_rmsnorm.txt" 2>&1; echo "bench_rmsnorm exit $?"; tail -30 "$OUT/bench_rmsnorm.txt"
timeout 240 python3 benchmarks/bench_decode.py --shape llama3-8b --batch 1 --prompt 128 --new 128 \
  > "$OUT/bench_decode.txt" 2>&1; echo "bench_decode exit $?"; tail -12 "$OUT/bench_decode.txt"
