#!/usr/bin/env bash
# `weavelm serve` on one GPU against `weavelm bench throughput` on the same workload (issue 15).
# Starts `weavelm serve --shape llama3-8b` (random weights, bf16, max_num_seqs 64), waits for
# /health, runs `weavelm bench serve` at 1, 16 and 64 concurrent clients on bench throughput's
# seeded synthetic workload (seed 0: log-normal prompts median 1024 / max 8192 as token ids,
# outputs median 128 / max 512, EOS ignored; N requests at 16 and 64 clients, a workload of N1
# drawn the same way at 1 client), stops the server (SIGTERM), then runs `weavelm bench throughput` on the same N requests
# with the same engine limit (--max-num-seqs 64: the engine never holds more than 64 sequences,
# as 64 clients never send more) and prints serve_ratio = serve_64 / throughput in output
# tokens/s (acceptance: >= 0.85).
#   bash benchmarks/device/run_serve.sh [N=200] [N1=20]
# Results: ${OUT:-out}/serve_c{1,16,64}.{txt,json}, serve_throughput.{txt,json}, serve_server.log,
# serve_ratio.txt. About 5-8 minutes on an H200.
#
# The GPU image has no package registry: setup.sh installs the wheels in .wheels/ (cp312,
# manylinux x86_64, --no-deps): fastapi annotated-doc opentelemetry-api starlette uvicorn h11
# httpx httpcore anyio sniffio idna certifi pydantic pydantic-core annotated-types
# typing-inspection typing-extensions prometheus-client, and httptools uvloop (uvicorn's C parser
# and event loop, which it uses when present: less host time per streamed token), besides gguf.
# Not click: uvicorn needs it, but the image has it under typer, and a newer click can break an
# older typer. (Checked: that set, plus click, imports and serves in an empty environment.)
set -uo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device/setup.sh
use_gpus 1 || exit 2
N=${1:-200}
N1=${2:-20}
PORT=${PORT:-8765}
URL=http://127.0.0.1:$PORT
ENGINE=(--max-num-seqs 64)

start_server "$URL" "$OUT/serve_server.log" 180 --shape llama3-8b --port "$PORT" \
  --max-model-len 8704 "${ENGINE[@]}" || exit 1

rc=0
for c in 1 16 64; do
  n=$N; if [ "$c" -eq 1 ]; then n=$N1; fi
  timeout -k 10 130 "${WEAVELM[@]}" bench serve --url "$URL" --concurrency "$c" \
    --num-requests "$n" --seed 0 --timeout 120 --json "$OUT/serve_c$c.json" 2>&1 \
    | tee "$OUT/serve_c$c.txt"
  r=${PIPESTATUS[0]}; echo "bench serve, concurrency $c: exit $r"
  if [ "$r" -ne 0 ]; then rc=$r; fi
done

stop_server
trap - EXIT
timeout -k 10 170 "${WEAVELM[@]}" bench throughput --shape llama3-8b --num-requests "$N" \
  --seed 0 "${ENGINE[@]}" --json "$OUT/serve_throughput.json" 2>&1 \
  | tee "$OUT/serve_throughput.txt"
r=${PIPESTATUS[0]}; echo "bench throughput: exit $r"
if [ "$r" -ne 0 ]; then rc=$r; fi

python3 - "$OUT" <<'EOF' | tee "$OUT/serve_ratio.txt"
import json, sys
out = sys.argv[1]
try:
    serve = json.load(open(f"{out}/serve_c64.json"))["output_tok_s"]
    engine = json.load(open(f"{out}/serve_throughput.json"))["rates"]["output_tok_s"]
except (OSError, KeyError, ValueError) as e:
    sys.exit(f"serve_ratio: missing results ({e})")
print(f"serve_64 {serve:.0f} output tok/s, throughput {engine:.0f} output tok/s: "
      f"serve_ratio = {serve / engine:.3f} (acceptance >= 0.85)")
EOF
exit "$rc"
