#!/usr/bin/env bash
# The H100 rows of the compression table (random-weight dummy models: only speed, bytes and agreement
# with the uncompressed model mean anything), after the quantized kernels' own benchmark.
# Usage: bash load_tests/compression_h100.sh OUT_DIR SMOLLM2_TOKENIZER_DIR MINILM_TOKENIZER_DIR [PART...]
# (tokenizer dirs: tokenizer.json + tokenizer_config.json [+ chat_template.jinja / vocab.txt];
# PART: kernel, 135m, 1p7b, cls; all four when none is named).
set -u
OUT=$1 TOK=$2 CLS_TOK=$3
shift 3
PARTS=${*:-kernel 135m 1p7b cls}
T="--device cuda --tokenizer $TOK --cls-tokenizer $CLS_TOK --eval-tokens 1024 --calib-tokens 2048 --decode-tokens 48 --repeats 3 --wide-streams 64 256"
for part in $PARTS; do
  case $part in
    kernel) python3 -m load_tests.quant_kernel_bench --out "$OUT/quant_kernels_h100.json" ;;
    135m) python3 -m load_tests.compression_table $T --gen-model dummy:smollm2-135m --only generate --out "$OUT/h100_135m.json" ;;
    1p7b) python3 -m load_tests.compression_table $T --gen-model dummy:smollm2-1.7b --only generate --out "$OUT/h100_1p7b.json" ;;
    cls) python3 -m load_tests.compression_table $T --repeats 7 --cls-model dummy:minilm-l6 --only classify --out "$OUT/h100_cls.json" ;;
  esac
done
