#!/usr/bin/env bash
# Programmatic dependent launch (on by default on Hopper) on one GPU, in one call: its GPU test
# (greedy tokens and log-probabilities equal to plain launches, bf16 and FP8, CUDA graphs and
# eager) and the graph-vs-eager decode test under it, then decode at batch 1 and 64 with bf16
# and FP8 weights with it off and on (bench_decode.py), then the FP8 batch-1 decode graph by
# kernel with it on (profile_decode.py). (This run turned it on by default: RESULTS.md, PDL.)
#   bash benchmarks/device/run_pdl.sh       (${OUT:-out}/pdl_*.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus 1 || exit 2
WEAVELM_PDL=1 timeout -k 10 150 python3 -m pytest -q -x tests/gpu/test_decode_gpu.py \
  -k "programmatic or graph_decode_equals_eager or engine_steps" 2>&1 | tail -5 \
  | tee "$OUT/pdl_tests.txt"
for pdl in 0 1; do
  WEAVELM_PDL=$pdl timeout -k 10 120 python3 benchmarks/bench_decode.py \
    --engines weavelm,weavelm-fp8 --batches 1,64 --repeats 3 --json "$OUT/pdl_decode_$pdl.json" \
    2>&1 | grep -v "it/s\]$" | tail -12 | tee "$OUT/pdl_decode_$pdl.txt"
done
WEAVELM_PDL=1 timeout -k 10 80 python3 benchmarks/profile_decode.py 1 fp8 2>&1 \
  | grep -v Warn | tee "$OUT/pdl_profile.txt" | grep "##"
