#!/usr/bin/env bash
# The GPU test suite on N GPUs: the single-GPU tests for N = 1 (`-m "gpu and not multigpu"`),
# all of tests/gpu for N > 1 (the fused communicator and the weave at N ranks included).
#   bash benchmarks/device/run_tests.sh N [pytest args]     (results under ${OUT:-out}/)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
N=$1; shift
if [ "$N" -eq 1 ]; then select=(-m "gpu and not multigpu"); else select=(); fi
timeout -k 30 "${TIMEOUT:-540}" python3 -m pytest tests/gpu -q -p no:cacheprovider \
  ${select[@]+"${select[@]}"} "$@" 2>&1 | tee "$OUT/gpu_tests_${N}gpu.txt"
rc=${PIPESTATUS[0]}
echo "gpu tests on $N GPU(s): exit $rc"
exit "$rc"
