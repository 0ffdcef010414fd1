#!/usr/bin/env bash
# Multi-GPU correctness: fused communicator and the weave (p2p; multicast off).
#   bash benchmarks/device/run_4gpu_tests.sh      (results under $OUT)
set -u
source benchmarks/device/setup.sh
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
python3 -m cli.main env 2>&1 | tee "$OUT/env.txt"
timeout 280 python3 tests/gpu/test_fused_comm_multigpu.py > "$OUT/fused_comm_test.txt" 2>&1
echo "fused comm test exit $?"; tail -40 "$OUT/fused_comm_test.txt"
timeout 240 python3 -m pytest -q -s -x -p no:cacheprovider tests/gpu/test_weave_multigpu.py \
  > "$OUT/weave_test.txt" 2>&1; echo "weave test exit $?"; tail -15 "$OUT/weave_test.txt"
