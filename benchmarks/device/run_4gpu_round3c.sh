#!/usr/bin/env bash
# Round 3c: the stores-only (scatter) p2p kernel: GPU tests (both kernels, attention, weave),
# fused-kernel table with the pull kernel beside it, prefill under CUDA graphs, 16K profile.
#   bash benchmarks/device/run_4gpu_round3c.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 200 python3 -m pytest -q -x -p no:cacheprovider -s tests/gpu/test_fused_comm_multigpu.py \
  tests/gpu/test_attention_gpu.py tests/gpu/test_weave_multigpu.py > "$OUT/tests.txt" 2>&1
echo "tests exit $?"; grep -E "passed|failed|Error|assert" "$OUT/tests.txt" | tail -6
timeout 200 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 --compare-kernels \
  --json "$OUT/fused_comm.json" > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; grep -A40 "^### Fused" "$OUT/bench_fused_comm.txt"
timeout 150 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --graph --json "$OUT/prefill_graph.json" > "$OUT/prefill_graph.txt" 2>&1
echo "prefill graph exit $?"; tail -8 "$OUT/prefill_graph.txt"
timeout 100 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens 16384 --layers 8 \
  --modes fused,weave,nocomm > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
grep -v "^W1\|^\*\*\*" "$OUT/profile.txt" | grep -A7 "^###" | head -40
