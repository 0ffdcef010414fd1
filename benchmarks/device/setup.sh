# Source me from the repository root on a lent GPU machine (every run_*.sh does):
#   source benchmarks/device/setup.sh
# The environment (env.sh: multicast off, ${OUT:-out}/, PYTHONPATH, the `weavelm` CLI), the
# carried wheels, and a record of the machine in $OUT/gpu.txt and $OUT/env.txt.
source benchmarks/device/env.sh

if [ -d .wheels ] && [ -z "${WEAVELM_WHEELS_DONE:-}" ]; then
  python3 -m pip install --no-index --no-deps --quiet --root-user-action=ignore .wheels/*.whl > "$OUT/pip.txt" 2>&1 || cat "$OUT/pip.txt"
  export WEAVELM_WHEELS_DONE=1
fi

if [ ! -s "$OUT/gpu.txt" ]; then
  { nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    nvidia-smi topo -m; } > "$OUT/gpu.txt" 2>&1
  "${WEAVELM[@]}" env > "$OUT/env.txt" 2>&1
fi
