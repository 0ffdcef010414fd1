#!/usr/bin/env bash
# `weavelm bench serve` at 64 clients on one GPU, plain and with logprobs=5 on every request
# (issue 31: within 10% of the plain run), alternated on one server so drift shows:
# plain, logprobs, plain, logprobs. Server and workload as run_serve.sh (`serve --shape
# llama3-8b --max-num-seqs 64`, random weights, bf16, bench throughput's seeded workload).
#   bash benchmarks/device/run_serve_logprobs.sh [N=200]
# Results: ${OUT:-out}/lp_{plain,logprobs}{1,2}.{txt,json}, lp_server.log, lp_ratio.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus 1 || exit 2
N=${1:-200}
PORT=${PORT:-8766}
URL=http://127.0.0.1:$PORT

"${WEAVELM[@]}" serve --shape llama3-8b --port "$PORT" --max-model-len 8704 --max-num-seqs 64 \
  > "$OUT/lp_server.log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    timeout 60 tail --pid="$server" -f /dev/null || kill -KILL "$server"
  fi
}
trap stop_server EXIT
t0=$(date +%s)
until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$URL/health" 2> /dev/null; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server exited:"; tail -20 "$OUT/lp_server.log"; exit 1
  fi
  if (( $(date +%s) - t0 > 240 )); then
    echo "the server was not healthy within 240 s:"; tail -20 "$OUT/lp_server.log"; exit 1
  fi
  sleep 2
done
echo "server healthy after $(( $(date +%s) - t0 )) s"

rc=0
for round in 1 2; do
  for kind in plain logprobs; do
    extra=(); if [ "$kind" = logprobs ]; then extra=(--logprobs 5); fi
    timeout -k 10 130 "${WEAVELM[@]}" bench serve --url "$URL" --concurrency 64 \
      --num-requests "$N" --seed 0 --timeout 120 "${extra[@]}" \
      --json "$OUT/lp_$kind$round.json" > "$OUT/lp_$kind$round.txt" 2>&1
    r=$?; echo "bench serve, $kind, round $round: exit $r"; tail -1 "$OUT/lp_$kind$round.txt"
    if [ "$r" -ne 0 ]; then rc=$r; fi
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/lp_ratio.txt"
import json, sys
out = sys.argv[1]
rate = {k: [json.load(open(f"{out}/lp_{k}{r}.json"))["output_tok_s"] for r in (1, 2)]
        for k in ("plain", "logprobs")}
for k, v in rate.items():
    print(f"{k}: {v[0]:.0f}, {v[1]:.0f} output tok/s")
print(f"logprobs / plain = {sum(rate['logprobs']) / sum(rate['plain']):.3f} (acceptance >= 0.90)")
PY
exit "$rc"
