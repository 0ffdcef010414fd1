#!/usr/bin/env bash
# Decode throughput, weavelm (TP = 1, CUDA-graph decode) vs transformers eager and static cache,
# and the weight-read roofline; random-weight Llama-3-8B shape; one GPU (N must be 1).
#   bash benchmarks/device/run_decode.sh 1 [bench_decode.py args]   (${OUT:-out}/decode.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
N=$1; shift
if [ "$N" -ne 1 ]; then echo "bench_decode.py runs on one GPU: pass 1" >&2; exit 2; fi
timeout -k 30 "${TIMEOUT:-300}" python3 benchmarks/bench_decode.py --shape llama3-8b \
  --batches 1,16,64 --prompt 128 --new 128 --json "$OUT/decode.json" "$@" 2>&1 | tee "$OUT/decode.txt"
rc=${PIPESTATUS[0]}
echo "bench_decode: exit $rc"
exit "$rc"
