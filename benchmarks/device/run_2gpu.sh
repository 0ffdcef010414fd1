#!/usr/bin/env bash
# Two GPUs: fused communicator and weave correctness, fused-kernel benchmark at TP=2.
set -u
source benchmarks/device/setup.sh
timeout 150 python3 tests/gpu/test_fused_comm_multigpu.py > "$OUT/fused_comm_test.txt" 2>&1
echo "fused comm test exit $?"; tail -2 "$OUT/fused_comm_test.txt"
timeout 150 python3 -m pytest -q -s -x -p no:cacheprovider tests/gpu/test_weave_multigpu.py \
  > "$OUT/weave_test.txt" 2>&1; echo "weave test exit $?"; grep "^{" "$OUT/weave_test.txt"; tail -1 "$OUT/weave_test.txt"
timeout 120 torchrun --nproc-per-node 2 benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,1024,4096,16384 --ctas 8,16,32 --json "$OUT/fused_comm_tp2.json" \
  > "$OUT/bench_fused_comm.txt" 2>&1; echo "bench exit $?"; tail -16 "$OUT/bench_fused_comm.txt"
