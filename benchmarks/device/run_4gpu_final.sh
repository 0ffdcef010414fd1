#!/usr/bin/env bash
# Multi-GPU product checks: the weave test, `weavelm generate` on GPUs (auto / weave / baseline
# schedules), and both launcher examples. Needs a small model dir in .tinymodel (carried).
set -u
source benchmarks/device/setup.sh
N=${1:-$(nvidia-smi -L | wc -l)}
[ -n "${SKIP_TEST:-}" ] || timeout 200 python3 -m pytest -q -s -x -p no:cacheprovider tests/gpu/test_weave_multigpu.py \
  > "$OUT/weave_test.txt" 2>&1; echo "weave test exit $?"; grep "^{" "$OUT/weave_test.txt"; tail -2 "$OUT/weave_test.txt"
LONG=$(python3 -c "print('The quick brown fox jumps over the lazy dog. ' * 60)")
for mode in auto baseline weave; do
  timeout 120 python3 -m cli.main generate .tinymodel -p "$LONG" --no-chat --tp "$N" --device cuda \
    -n 12 --mode $mode > "/tmp/gen_$mode.txt" 2>&1; echo "generate --mode $mode exit $?: $(tail -c 200 /tmp/gen_$mode.txt)"
  cat "/tmp/gen_$mode.txt" >> "$OUT/generate.txt"
done
timeout 120 torchrun --nproc-per-node "$N" examples/generate_torchrun.py .tinymodel --max-new-tokens 8 \
  > /tmp/torchrun.txt 2>&1; echo "torchrun example exit $?"; grep "TP=" -A1 /tmp/torchrun.txt | head -4
timeout 120 accelerate launch --multi_gpu --num_processes "$N" examples/generate_accelerate.py .tinymodel \
  --max-new-tokens 8 > /tmp/accel.txt 2>&1; echo "accelerate example exit $?"; grep "TP=" -A1 /tmp/accel.txt | head -2
cat /tmp/torchrun.txt /tmp/accel.txt >> "$OUT/generate.txt"
