#!/bin/bash
# Compiled tensor-parallel decode steps on a two-GPU host (issue 17): the row-parallel all-reduce is an opaque
# custom op inside the compiled step (models/tensor_parallel.py), so TP=2 steps are now compiled as one GPU's.
#   1. 8B-class model (dummy:llama-8b): tp1 (compiled) vs tp2 (compiled, one-shot all-reduce) vs tp2-eager
#      (compile off, as before this change): correctness of tp2's whole-prompt logits, 16 teacher-forced
#      decode-step logits (8 rows together, then batch 1) and 64 greedy tokens against tp1's on the same random
#      weights; batch-1 ms per step; tokens/s at 1, 16, 64, 256 concurrent.
#   2. 1.7B (dummy:smollm2-1.7b): tp1 vs tp2, both compiled: the same correctness figures and batch-1 ms per
#      step (c=1 only, to stay inside the time budget).
# Cold inductor cache: about 7 minutes for the 8B part (each compiled layout compiles two graphs per rank,
# about a minute; tp2-eager compiles nothing) and 3 for the 1.7B part, at most 8 + 3.3 by their time limits
# (a layout that hangs stops after 4.5 minutes and the next one runs); a second run on the same cache is faster. From the repository root, PYTHONPATH set by the caller (the wheels
# and the repository), both parts or one (two calls stay inside a 10-minute limit each):
#
#     bash load_tests/tp_compiled_h200x2.sh OUT_DIR [8b|1.7b]
#
# Everything goes under OUT_DIR: host.txt, tp8b/ and tp17b/ (results.json, results.md), *.log, summary.txt
# (appended to, so two calls may share OUT_DIR). TOK (default .bench/tok-smollm2) is the SmolLM2 tokenizer
# directory.
set -x
OUT=${1:?usage: bash load_tests/tp_compiled_h200x2.sh OUT_DIR [8b|1.7b]}
PART=${2:-all}
TOK=${TOK:-.bench/tok-smollm2}
source "$(dirname "$0")/h200x2_common.sh"
# One inductor cache for every layout and run (the builder would set the same directory under --cache-dir).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lowlat-tp-cache/inductor}
unset LLM_COMPILE_DECODE # each layout says whether its steps compile

if [[ $PART == all || $PART == 8b ]]; then
  step tp8b 480 python -m load_tests.tp_bench --tokenizer "$TOK" --out "$OUT/tp8b" --models 8b \
    --layouts tp1,tp2,tp2-eager --no-reference --layout-timeout 270
  cat "$OUT/tp8b/results.md" 2>/dev/null
fi
if [[ $PART == all || $PART == 1.7b ]]; then
  step tp17b 200 python -m load_tests.tp_bench --tokenizer "$TOK" --out "$OUT/tp17b" --models 1.7b \
    --layouts tp1,tp2 --concurrency 1 --no-reference
  cat "$OUT/tp17b/results.md" 2>/dev/null
fi
echo "== summary"
cat "$SUMMARY"
