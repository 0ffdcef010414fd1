#!/usr/bin/env bash
# `weavelm bench serve` at 64 clients on one GPU (issue 31): plain requests, every request with
# logprobs=5 (acceptance: within 10% of plain) and every request with a JSON schema through
# guided_json (within 25%), alternated on one server so drift shows: plain, logprobs, json,
# twice. Server and workload as run_serve.sh (`serve --shape llama3-8b --max-num-seqs 64`,
# random weights, bf16, bench throughput's seeded workload) with a byte-level tokenizer of the
# shape's vocabulary (make_shape_tokenizer.py), so xgrammar can spell JSON; the schema (an
# array of at least 600 integers) cannot close within an output, so every request generates
# its full length under the mask, as the plain ones do.
#   bash benchmarks/device/run_serve_features.sh [N=200]
# Results: ${OUT:-out}/feat_{plain,logprobs,json}{1,2}.{txt,json}, feat_server.log,
# feat_ratio.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus 1 || exit 2
N=${1:-200}
PORT=${PORT:-8766}
URL=http://127.0.0.1:$PORT
TOK=${TOK:-.shape_tok}
[ -d "$TOK" ] || python3 benchmarks/device/make_shape_tokenizer.py "$TOK" > /dev/null

start_server "$URL" "$OUT/feat_server.log" 240 --shape llama3-8b --tokenizer "$TOK" \
  --port "$PORT" --max-model-len 8704 --max-num-seqs 64 || exit 1

declare -A BODY=(
  [plain]='{}'
  [logprobs]='{"logprobs": 5}'
  [json]='{"guided_json": {"type": "array", "items": {"type": "integer"}, "minItems": 600}}'
)
rc=0
for round in 1 2; do
  for kind in plain logprobs json; do
    timeout -k 10 150 "${WEAVELM[@]}" bench serve --url "$URL" --concurrency 64 \
      --num-requests "$N" --seed 0 --timeout 140 --extra-body "${BODY[$kind]}" \
      --json "$OUT/feat_$kind$round.json" > "$OUT/feat_$kind$round.txt" 2>&1
    r=$?; echo "bench serve, $kind, round $round: exit $r"; tail -1 "$OUT/feat_$kind$round.txt"
    if [ "$r" -ne 0 ]; then rc=$r; fi
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/feat_ratio.txt"
import json, sys
out = sys.argv[1]
rate = {}
for k in ("plain", "logprobs", "json"):
    try:
        rate[k] = [json.load(open(f"{out}/feat_{k}{r}.json"))["output_tok_s"] for r in (1, 2)]
    except (OSError, KeyError, ValueError) as e:
        print(f"{k}: no result ({e})")
for k, v in rate.items():
    print(f"{k}: {v[0]:.0f}, {v[1]:.0f} output tok/s")
for k, bound in (("logprobs", 0.90), ("json", 0.75)):
    if k in rate and "plain" in rate:
        print(f"{k} / plain = {sum(rate[k]) / sum(rate['plain']):.3f} (acceptance >= {bound})")
PY
exit "$rc"
