#!/usr/bin/env bash
# The fused residual-add + RMSNorm kernel against a device copy, torch eager and torch.compile,
# plus host launch overhead; one GPU (N must be 1).
#   bash benchmarks/device/run_rmsnorm.sh 1 [bench_rmsnorm.py args]   (${OUT:-out}/rmsnorm.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
N=$1; shift
if [ "$N" -ne 1 ]; then echo "bench_rmsnorm.py runs on one GPU: pass 1" >&2; exit 2; fi
timeout -k 30 "${TIMEOUT:-300}" python3 benchmarks/bench_rmsnorm.py --tokens 16384 --hidden 8192 \
  "$@" 2>&1 | tee "$OUT/rmsnorm.txt"
rc=${PIPESTATUS[0]}
echo "bench_rmsnorm: exit $rc"
exit "$rc"
