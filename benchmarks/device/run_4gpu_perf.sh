#!/usr/bin/env bash
# Multi-GPU round: correctness of both, fused-kernel sweep, prefill per schedule with a CTA sweep for the
# weave, the per-kernel timeline, and the splitter's tuning.
#   bash benchmarks/device/run_4gpu_perf.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 150 python3 tests/gpu/test_fused_comm_multigpu.py > "$OUT/fused_comm_test.txt" 2>&1
echo "fused comm test exit $?"; tail -2 "$OUT/fused_comm_test.txt"
timeout 200 python3 -m pytest -q -s -x -p no:cacheprovider tests/gpu/test_weave_multigpu.py \
  > "$OUT/weave_test.txt" 2>&1; echo "weave test exit $?"; tail -6 "$OUT/weave_test.txt"
timeout 200 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 --json "$OUT/fused_comm.json" \
  > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; tail -24 "$OUT/bench_fused_comm.txt"
# Two rows per CTA iteration at hidden 8192 x 4 ranks (the plan picks 1: 8 bytes would spill).
WEAVELM_FUSED_ROWS=2 timeout 120 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py \
  --hidden 8192 --tokens 1024,4096,16384 --ctas 8,16,32 > /tmp/rows2.txt 2>&1
echo "rows=2 exit $?"; (echo; echo "## WEAVELM_FUSED_ROWS=2"; cat /tmp/rows2.txt) >> "$OUT/bench_fused_comm.txt"
tail -12 /tmp/rows2.txt
timeout 260 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --ctas 8,16,32 --json "$OUT/prefill.json" > "$OUT/bench_prefill.txt" 2>&1
echo "bench prefill exit $?"; tail -9 "$OUT/bench_prefill.txt"
# The same weave schedule with NCCL doing each half's reduction (torch backend): does overlap
# itself pay, independent of our kernel?
timeout 150 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 4k,16k --modes baseline,fused,weave --backend torch > /tmp/nccl_weave.txt 2>&1
echo "nccl weave exit $?"; cat /tmp/nccl_weave.txt >> "$OUT/bench_prefill.txt"; tail -4 /tmp/nccl_weave.txt
timeout 150 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens 8192 --layers 8 \
  --out "$OUT" > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
grep -v "^W1\|^\*\*\*" "$OUT/profile.txt" | grep -A9 "^###" | head -60
timeout 150 python3 -m cli.main tune --shape llama3-70b --layers 2 --tp "$N" --tokens 1k,4k,16k \
  > /tmp/tune.txt 2>&1; echo "tune exit $?"; cat /tmp/tune.txt >> "$OUT/profile.txt"; tail -5 /tmp/tune.txt
