#!/usr/bin/env bash
# Mixture of experts on one GPU, random weights, bf16, in one run (benchmarks/bench_moe.py):
# the MoE blocks of mixtral-8x7b (4 layers) at 8192 tokens vs a dense GEMM of the same FLOPs,
# the 4-layer prefill vs transformers' forward on the same weights, and batch-1 decode's
# active-expert weight reads vs the copy rate; then the MoE GPU tests.
#   bash benchmarks/device/run_moe.sh 1 [bench_moe.py args, e.g. --shape mixtral-8x22b]
# Results: ${OUT:-out}/moe.{txt,json}, ${OUT:-out}/moe_tests.txt
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
shift
timeout -k 30 "${TIMEOUT:-420}" python3 benchmarks/bench_moe.py --shape mixtral-8x7b --layers 4 \
  --tokens 8192 --json "$OUT/moe.json" "$@" 2>&1 | tee "$OUT/moe.txt"
rc=${PIPESTATUS[0]}
timeout -k 30 "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider \
  tests/gpu/test_moe_gpu.py 2>&1 | tee "$OUT/moe_tests.txt"
trc=${PIPESTATUS[0]}
echo "bench_moe: exit $rc; MoE GPU tests: exit $trc"
[ "$rc" = 0 ] && exit "$trc" || exit "$rc"
