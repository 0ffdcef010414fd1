#!/usr/bin/env bash
# FP8 weights on one GPU (issue 33), in one call: the GPU tests, the four Llama-3-8B GEMMs
# (bench_fp8_linear.py), decode at batch 1/16/64 with bf16 and FP8 weights side by side
# (bench_decode.py --engines weavelm,weavelm-fp8), decode at batch 64 / 2K context with the bf16
# and the FP8 KV cache, and a prefill-heavy `bench throughput`
# (200 requests of 2,048 prompt tokens, 16 output tokens) in bf16 and in FP8.
#   bash benchmarks/device/run_fp8.sh       (${OUT:-out}/fp8_*.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus 1 || exit 2
timeout -k 10 120 python3 -m pytest -q -s tests/gpu/test_fp8_gpu.py 2>&1 | tail -15 \
  | tee "$OUT/fp8_tests.txt"
timeout -k 10 90 python3 benchmarks/bench_fp8_linear.py 2>&1 | tee "$OUT/fp8_linear.txt"
timeout -k 10 200 python3 benchmarks/bench_decode.py --engines weavelm,weavelm-fp8 \
  --batches 1,16,64 --json "$OUT/fp8_decode.json" 2>&1 | tee "$OUT/fp8_decode.txt"
# FP8 KV cache: decode at batch 64 / 2K context with the bf16 cache and the FP8 one
for kv in auto fp8; do
  timeout -k 10 110 python3 benchmarks/bench_decode.py --engines weavelm --batches 64 \
    --prompt 2048 --new 64 --repeats 3 --kv-cache-dtype "$kv" --json "$OUT/kv_$kv.json" 2>&1 \
    | grep -v "it/s\]$" | tail -4 | tee "$OUT/kv_$kv.txt"
done
for q in bf16 fp8; do
  args=(); [ "$q" = fp8 ] && args+=(--quantization fp8)
  timeout -k 10 150 "${WEAVELM[@]}" bench throughput --shape llama3-8b --num-requests 200 \
    --input-len 2048 --output-len 16 --seed 0 "${args[@]}" --json "$OUT/fp8_prefill_$q.json" \
    2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/fp8_prefill_$q.txt" | tail -6
done
