#!/usr/bin/env bash
# Round 3b: NVLink pull vs push bandwidth per CTA count; GEMM carveout through the cuBLAS handle;
# GPU tests of the carveout and the weave; prefill under CUDA graphs (carveout auto and 0);
# per-kind profile of one 16K prefill.
#   bash benchmarks/device/run_4gpu_round3b.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
timeout 90 torchrun --nproc-per-node "$N" benchmarks/probe_p2p_bandwidth.py > "$OUT/probe_p2p.txt" 2>&1
echo "p2p probe exit $?"; grep "^|" "$OUT/probe_p2p.txt"
timeout 60 torchrun --nproc-per-node "$N" benchmarks/probe_copy_engine.py --gemm-only > /tmp/gemm.txt 2>&1
echo "gemm probe exit $?"; grep "|\|GEMM" /tmp/gemm.txt; cat /tmp/gemm.txt >> "$OUT/probe_p2p.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_sm_carveout.py \
  tests/gpu/test_weave_multigpu.py > "$OUT/tests.txt" 2>&1; echo "tests exit $?"; tail -3 "$OUT/tests.txt"
timeout 150 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --graph --json "$OUT/prefill_graph.json" > "$OUT/prefill_graph.txt" 2>&1
echo "prefill graph exit $?"; tail -8 "$OUT/prefill_graph.txt"
timeout 100 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
  --tokens 1k,2k,4k,8k,16k --modes weave --carveout 0 --graph > /tmp/nc.txt 2>&1
echo "prefill graph carveout 0 exit $?"; tail -6 /tmp/nc.txt; cat /tmp/nc.txt >> "$OUT/prefill_graph.txt"
timeout 120 torchrun --nproc-per-node "$N" benchmarks/profile_weave.py --tokens 16384 --layers 8 \
  --modes fused,weave,nocomm > "$OUT/profile.txt" 2>&1; echo "profile exit $?"
grep -v "^W1\|^\*\*\*" "$OUT/profile.txt" | grep -A7 "^###" | head -40
