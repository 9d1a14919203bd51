#!/usr/bin/env bash
# The real server on a GPU with its default settings (random-weight 1.7B generator and MiniLM-shaped
# encoder, no weights needed): waits for /ready, saves /info (the compression reports: int8-wo + 1%
# pruning for generation on CUDA at the default 16 sequences), one whole and one streamed /generate,
# one /classify, the server log (encoder CUDA graphs captured at startup).
# Usage: bash load_tests/gpu_server_smoke.sh OUT_DIR SMOLLM2_TOKENIZER_DIR MINILM_TOKENIZER_DIR
set -u
OUT=$1 TOK=$2 CLS_TOK=$3 PORT=${PORT:-8123}
CLS_DIR=$(python3 -c "from pathlib import Path; from load_tests.gpu_bench import dummy_encoder_dir; print(dummy_encoder_dir(Path('$CLS_TOK')))")
LLM_GEN_MODEL=dummy:smollm2-1.7b LLM_TOKENIZER=$TOK LLM_CLS_MODEL=$CLS_DIR LLM_PORT=$PORT LLM_LOG_LEVEL=info \
  LLM_CACHE_DIR=$(mktemp -d) python3 -m server >"$OUT/server.log" 2>&1 &
PID=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  kill -0 $PID 2>/dev/null || { echo "server exited"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
curl -s "http://127.0.0.1:$PORT/info" >"$OUT/info.json"
curl -s "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "Where is my order?", "max_tokens": 32}' >"$OUT/generate.json"
curl -sN "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "Where is my order?", "max_tokens": 8, "stream": true}' >"$OUT/generate_stream.txt"
curl -s "http://127.0.0.1:$PORT/classify" -H 'content-type: application/json' \
  -d '{"inputs": ["my card was charged twice", "where is my parcel?"], "labels": ["billing", "shipping"]}' >"$OUT/classify.json"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^llm_(generated_tokens_total|time_to_first_token_seconds_count)" >"$OUT/metrics.txt"
kill $PID; wait $PID
python3 -c "import json; print(json.dumps(json.load(open('$OUT/info.json')), indent=1)[:3000])"
head -c 600 "$OUT/generate.json"; echo; cat "$OUT/classify.json"; echo; grep -i "graphs\|compression\|warn\|error" "$OUT/server.log" | cut -c1-300; head -c 400 "$OUT/generate_stream.txt"; echo; cat "$OUT/metrics.txt" | head
