#!/usr/bin/env bash
# Reproduces load_tests/results/cpu: starts the server on the embedded models (CPU, default settings)
# on a loopback port, runs three short closed-loop sweeps against it, then stops it.
# Run from the repository root: bash load_tests/results/cpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=load_tests/results/cpu
port=${PORT:-8765}
url=http://127.0.0.1:$port
HF_HUB_OFFLINE=1 python -m server --device cpu --port "$port" --log-level warning &
server=$!
trap 'kill $server; wait $server || true' EXIT
until curl -sf "$url/ready" >/dev/null; do sleep 1; done
# The machine is shared: record its load around the runs.
{ date -u; nproc; uptime; } > "$out/host_before.txt"

common=(--url "$url" --concurrency 1,4,16 --duration 30 --timeout 120 --seed 0 --no-progress)
python -m load_tests.loadgen "${common[@]}" --scenario generate --requests 32 --max-tokens 32 --warmup 2 \
    --label generate --out "$out/generate"
python -m load_tests.loadgen "${common[@]}" --scenario generate-stream --requests 32 --max-tokens 32 \
    --label generate-stream --out "$out/generate_stream"
python -m load_tests.loadgen "${common[@]}" --scenario classify --requests 200 --batch-size 1 \
    --warmup 4 --label classify --out "$out/classify"
# Server-side view of all three sweeps (cumulative): engine step time by phase, batch sizes, queue wait.
curl -sf "$url/metrics" > "$out/server_metrics.txt"
uptime > "$out/host_after.txt"
