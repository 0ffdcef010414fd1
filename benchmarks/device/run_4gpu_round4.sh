#!/usr/bin/env bash
# Round 4, first call: every GPU test with the one-fence barrier and the fused embedding
# reduction; the fused-kernel table (full token range and CTA sweep, with the barrier floor);
# the weave's per-reduction stall profile at 16K; the weave against its cut and CTA count.
#   bash benchmarks/device/run_4gpu_round4.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?"; tail -3 "$OUT/gpu_tests.txt"
timeout 120 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 --graph-max-tokens 128 \
  --iters 30 --json "$OUT/fused_comm.json" > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; grep -A30 "^### Fused" "$OUT/bench_fused_comm.txt"
timeout 70 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens 16384 \
  --layers 8 --modes weave,nocomm > "$OUT/profile.txt" 2>&1
echo "profile exit $?"; grep -v "Warning\|warn\|^W1\|\*\*\*\*" "$OUT/profile.txt" | head -60
timeout 120 torchrun --nproc-per-node "$N" benchmarks/sweep_weave.py --tokens 8192,16384 \
  --shifts 0,0.03,0.06,0.12 --ctas 8,16 > "$OUT/sweep_weave.txt" 2>&1
echo "sweep exit $?"; grep -A25 "^### weave" "$OUT/sweep_weave.txt"
