#!/usr/bin/env bash
# Same host: the weave with 16 CTAs for the reductions that hide behind an attention block (and
# a 16-SM carveout for attention-block GEMMs) against 8 everywhere; then the weave GPU test.
#   bash benchmarks/device/run_4gpu_ctas_short.sh [N]    (results under $OUT)
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
for cs in 16 8 16; do
  timeout 80 python3 -m cli.main bench prefill --shape llama3-70b --layers 8 --tp "$N" \
    --tokens 4k,8k,16k --modes baseline,weave --graph --ctas-short "$cs" > /tmp/cs.txt 2>&1
  echo "--ctas-short $cs exit $?"; tail -4 /tmp/cs.txt
  (echo "## --ctas-short $cs"; cat /tmp/cs.txt) >> "$OUT/ctas_short.txt"
done
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_weave_multigpu.py > /tmp/t.txt 2>&1
echo "weave test exit $?"; tail -1 /tmp/t.txt; cat /tmp/t.txt >> "$OUT/ctas_short.txt"
