#!/usr/bin/env bash
# Round 3, final code: every GPU test, the fused-kernel table (pull kernel, scatter beside it),
# prefill per schedule under CUDA graphs and eager.
#   bash benchmarks/device/run_4gpu_final3.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 260 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests exit $?"; tail -3 "$OUT/gpu_tests.txt"
timeout 150 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 --compare-kernels \
  --json "$OUT/fused_comm.json" > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; grep -A40 "^### Fused" "$OUT/bench_fused_comm.txt"
timeout 120 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --graph --json "$OUT/prefill_graph.json" > "$OUT/prefill_graph.txt" 2>&1
echo "prefill graph exit $?"; tail -8 "$OUT/prefill_graph.txt"
timeout 120 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --modes baseline,fused,weave,nocomm --json "$OUT/prefill_eager.json" \
  > "$OUT/prefill_eager.txt" 2>&1
echo "prefill eager exit $?"; tail -8 "$OUT/prefill_eager.txt"
