#!/usr/bin/env bash
# The H100 rows of the compression table (random-weight dummy models: only speed, bytes and agreement
# with the uncompressed model mean anything). Usage: bash load_tests/compression_h100.sh OUT_DIR SMOLLM2_TOKENIZER_DIR MINILM_TOKENIZER_DIR
# (tokenizer dirs: tokenizer.json + tokenizer_config.json [+ chat_template.jinja / vocab.txt]).
set -u
OUT=$1 TOK=$2 CLS_TOK=$3
T="--device cuda --tokenizer $TOK --cls-tokenizer $CLS_TOK --eval-tokens 1024 --calib-tokens 2048 --decode-tokens 48 --repeats 2"
python3 -m load_tests.compression_table $T --gen-model dummy:smollm2-135m --only generate \
  --settings '[{"quantize":"none"},{"quantize":"fp8"},{"quantize":"fp8","prune_mlp":0.05},{"quantize":"none","prune_mlp":0.05}]' \
  --out "$OUT/h100_135m.json"
python3 -m load_tests.compression_table $T --gen-model dummy:smollm2-1.7b --only generate \
  --settings '[{"quantize":"none"},{"quantize":"fp8"},{"quantize":"fp8","prune_mlp":0.05},{"quantize":"fp8","prune_mlp":0.1}]' \
  --out "$OUT/h100_1p7b.json"
python3 -m load_tests.compression_table --device cuda --cls-tokenizer "$CLS_TOK" --repeats 3 --cls-model dummy:minilm-l6 \
  --only classify --out "$OUT/h100_cls.json"
