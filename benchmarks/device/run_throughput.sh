#!/usr/bin/env bash
# Serving throughput of a seeded synthetic workload through the engine, random-weight
# Llama-3-8B shape at TP = N (the 70B shape for N >= 4): `weavelm bench throughput --tp N`
# (1000 requests, log-normal prompts median 1024 / max 8192, outputs median 128 / max 512).
# Extra args go to the CLI and override, e.g. `--mode weave`, `--input-len 4096 --output-len 32`,
# `--num-requests 200`.
#   bash benchmarks/device/run_throughput.sh N [weavelm bench throughput args]
# Results: ${OUT:-out}/throughput_tpN.{txt,json}
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
N=$1; shift
shape=llama3-8b
if [ "$N" -ge 4 ]; then shape=llama3-70b; fi
timeout -k 30 "${TIMEOUT:-540}" "${WEAVELM[@]}" bench throughput --shape "$shape" --tp "$N" \
  --json "$OUT/throughput_tp$N.json" "$@" 2>&1 | tee "$OUT/throughput_tp$N.txt"
rc=${PIPESTATUS[0]}
echo "bench throughput at TP $N: exit $rc"
exit "$rc"
