#!/usr/bin/env bash
# The fused kernel with the next iteration's loads issued before the current one's block
# reduction and stores: correctness (both p2p kernels), fused table, prefill under CUDA graphs.
#   bash benchmarks/device/run_4gpu_prefetch.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 80 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_fused_comm_multigpu.py \
  > "$OUT/test.txt" 2>&1; echo "fused comm test exit $?"; tail -1 "$OUT/test.txt"
timeout 70 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,1024,4096,16384 --ctas 8,16,32 --graph-max-tokens 128 --iters 30 \
  --json "$OUT/fused_comm.json" > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench exit $?"; grep -A22 "^### Fused" "$OUT/bench_fused_comm.txt"
timeout 60 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 4k,16k --modes baseline,fused,weave --graph > "$OUT/prefill_graph.txt" 2>&1
echo "prefill exit $?"; tail -3 "$OUT/prefill_graph.txt"
