#!/usr/bin/env bash
# Round 3: copy-engine probe and GEMM SM carveout check; prefill per schedule under CUDA graphs
# with the weave's GEMMs leaving SMs to the fused kernel (carveout auto vs 0), and eager.
#   bash benchmarks/device/run_4gpu_round3.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 100 torchrun --nproc-per-node "$N" benchmarks/probe_copy_engine.py > "$OUT/probe.txt" 2>&1
echo "probe exit $?"; grep -v "^W1\|^\*\*\*" "$OUT/probe.txt" | grep "|\|GEMM\|False" | head -20
timeout 200 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --ctas 4,8,16 --graph --json "$OUT/prefill_graph.json" \
  > "$OUT/prefill_graph.txt" 2>&1
echo "prefill graph exit $?"; tail -9 "$OUT/prefill_graph.txt"
timeout 120 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 4k,8k,16k --modes weave --ctas 8,16 --carveout 0 --graph \
  > "$OUT/prefill_graph_nocarve.txt" 2>&1
echo "prefill graph no carveout exit $?"; tail -5 "$OUT/prefill_graph_nocarve.txt"
timeout 140 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,4k,16k --modes baseline,fused,weave --ctas 8,16 --json "$OUT/prefill_eager.json" \
  > "$OUT/prefill_eager.txt" 2>&1
echo "prefill eager exit $?"; tail -6 "$OUT/prefill_eager.txt"
