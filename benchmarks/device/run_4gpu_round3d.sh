#!/usr/bin/env bash
# Round 3d: the scatter kernel with peers in rotating order (vs pull), prefill under CUDA graphs
# with weave CTAs 8/16 and carveout auto/0, the weave's GPU test, 16K profile.
#   bash benchmarks/device/run_4gpu_round3d.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 200 torchrun --nproc-per-node "$N" benchmarks/bench_fused_comm.py --hidden 8192 \
  --tokens 1,128,512,1024,2048,4096,8192,16384 --ctas 2,4,8,16,32 --compare-kernels \
  --json "$OUT/fused_comm.json" > "$OUT/bench_fused_comm.txt" 2>&1
echo "bench_fused_comm exit $?"; grep -A40 "^### Fused" "$OUT/bench_fused_comm.txt"
timeout 150 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --ctas 8,16 --graph --json "$OUT/prefill_graph.json" > "$OUT/prefill_graph.txt" 2>&1
echo "prefill graph exit $?"; tail -8 "$OUT/prefill_graph.txt"
timeout 100 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 4k,8k,16k --modes weave --ctas 8 --carveout 0 --graph > /tmp/nc.txt 2>&1
echo "carveout 0 exit $?"; tail -4 /tmp/nc.txt; cat /tmp/nc.txt >> "$OUT/prefill_graph.txt"
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_weave_multigpu.py \
  tests/gpu/test_attention_gpu.py > "$OUT/tests.txt" 2>&1; echo "tests exit $?"; tail -2 "$OUT/tests.txt"
timeout 100 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens 16384 --layers 8 \
  --modes weave > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
grep -v "^W1\|^\*\*\*" "$OUT/profile.txt" | grep -A12 "^###" | head -20
