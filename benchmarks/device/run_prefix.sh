#!/usr/bin/env bash
# Prefix caching on one GPU (issue 32), four `weavelm bench throughput --shape llama3-8b` runs
# in one call: a shared-prefix workload (N requests over 10 system prompts of 2,048 tokens,
# each followed by a unique 128-token question; outputs log-normal, median 128) with caching
# on and off, and the usual workload (no shared prefix) with caching on and off.
#   bash benchmarks/device/run_prefix.sh [N=300]
# Results: ${OUT:-out}/prefix_{shared,plain}_{on,off}.{txt,json}, prefix_ratio.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus 1 || exit 2
N=${1:-300}
SHARED=(--prefix-len 2048 --num-prefixes 10 --input-len 128)
rc=0
for work in shared plain; do
  for caching in on off; do
    args=(); [ "$work" = shared ] && args+=("${SHARED[@]}")
    [ "$caching" = off ] && args+=(--no-enable-prefix-caching)
    timeout -k 10 170 "${WEAVELM[@]}" bench throughput --shape llama3-8b --num-requests "$N" \
      --seed 0 "${args[@]}" --json "$OUT/prefix_${work}_$caching.json" 2>&1 \
      | tr '\r' '\n' | grep -v "it/s\]$" > "$OUT/prefix_${work}_$caching.txt"
    r=${PIPESTATUS[0]}; echo "$work, caching $caching: exit $r"
    grep -A3 "^| requests/s" "$OUT/prefix_${work}_$caching.txt" | tail -1; grep "hit rate" "$OUT/prefix_${work}_$caching.txt"
    if [ "$r" -ne 0 ]; then rc=$r; fi
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/prefix_ratio.txt"
import json, sys
out = sys.argv[1]
s = {}
for w in ("shared", "plain"):
    for c in ("on", "off"):
        try:
            s[w, c] = json.load(open(f"{out}/prefix_{w}_{c}.json"))["result"]["elapsed_s"]
        except (OSError, KeyError, ValueError) as e:
            print(f"{w} {c}: no result ({e})")
for (w, c), v in sorted(s.items()):
    print(f"{w} workload, caching {c}: {v:.2f} s")
if ("shared", "on") in s and ("shared", "off") in s:
    print(f"shared prefix: off / on = {s['shared', 'off'] / s['shared', 'on']:.2f}x "
          f"(acceptance >= 2.5)")
if ("plain", "on") in s and ("plain", "off") in s:
    print(f"no shared prefix: on / off time = {s['plain', 'on'] / s['plain', 'off']:.3f} "
          f"(acceptance <= 1.02)")
PY
exit "$rc"
