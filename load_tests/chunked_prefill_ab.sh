#!/usr/bin/env bash
# A/B of the scheduler on CPU: streamed /generate at 16 concurrent clients, short customer-service prompts
# mixed with long ones (~700 tokens), against the server of two checkouts (before/after chunked prefill),
# the second also with the old 4096-token prefill budget. Same machine, same prompts, one after the other.
# Usage (from the repository root): bash load_tests/chunked_prefill_ab.sh OLD_CHECKOUT OUT_DIR
set -euo pipefail
old=$(cd "$1" && pwd) new=$(pwd) out=$2 port=${PORT:-8766}
mkdir -p "$out"
python - "$out/prompts.jsonl" <<'PY'
import json, sys
from load_tests.loadgen import BUILTIN_PROMPTS
text = open("data/eval.txt", encoding="utf-8").read()
long = [f"Summarize this message for a support agent in one sentence:\n\n{text[i * 3000:(i + 1) * 3000]}" for i in range(4)]
with open(sys.argv[1], "w") as f:
    for p in [*BUILTIN_PROMPTS[:12], *long]:
        f.write(json.dumps(p) + "\n")
PY
run() {  # label checkout extra-server-args...
  local label=$1 dir=$2; shift 2
  (cd "$dir" && HF_HUB_OFFLINE=1 exec python -m server --device cpu --port "$port" --log-level warning "$@") &
  local server=$!
  until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 1; done
  python -m load_tests.loadgen --url "http://127.0.0.1:$port" --scenario generate-stream --concurrency 16 \
    --requests 48 --max-tokens 32 --timeout 300 --seed 0 --no-progress --prompts-file "$out/prompts.jsonl" \
    --label "$label" --out "$out/$label"
  kill $server; wait $server || true
}
{ date -u; nproc; uptime; } > "$out/host_before.txt"
run before "$old"
run after "$new"
run after-4096 "$new" --max-batched-tokens 4096
uptime > "$out/host_after.txt"
