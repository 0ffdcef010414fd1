#!/usr/bin/env bash
# Fused reduce-scatter + residual + RMSNorm + all-gather (p2p) against NCCL + RMSNorm on N >= 2
# GPUs, with the CTA sweep and the <= 128-token CUDA-graph rows (the round-4 flags). Later
# flags override earlier ones, e.g. `--tokens 1024,16384` or `--compare-kernels`.
#   bash benchmarks/device/run_fused_comm.sh N [bench_fused_comm.py args]
# Results: ${OUT:-out}/fused_comm_tpN.{txt,json}; plot with
#   python3 benchmarks/plot_results.py fused out/fused_comm_tpN.json out/fused_comm_tpN.png
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus "${1:-}" || exit 2
N=$1; shift
if [ "$N" -lt 2 ]; then echo "the fused communicator needs at least 2 GPUs" >&2; exit 2; fi
timeout -k 30 "${TIMEOUT:-540}" python3 -m torch.distributed.run --nproc_per_node "$N" \
  benchmarks/bench_fused_comm.py --hidden 8192 --tokens 1,128,512,1024,2048,4096,8192,16384 \
  --ctas 2,4,8,16,32 --graph-max-tokens 128 --iters 30 --json "$OUT/fused_comm_tp$N.json" "$@" \
  2>&1 | tee "$OUT/fused_comm_tp$N.txt"
rc=${PIPESTATUS[0]}
echo "bench_fused_comm on $N GPUs: exit $rc"
exit "$rc"
