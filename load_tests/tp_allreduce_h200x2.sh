#!/bin/bash
# Tensor parallel's all-reduce on a two-GPU host (issue 17): the one-shot all-reduce over symmetric memory
# (--tensor-parallel-all-reduce auto) checked against NCCL's sums on both GPUs, timed against NCCL at decode
# sizes (eager and in a CUDA graph), then the 8B-class model at tp1 / tp2 (one-shot) / tp2-nccl: batch-1
# ms per step and tokens/s at 1, 16, 64, 256 concurrent, with tp2's logits and greedy tokens against tp1's.
# About 6 minutes (at most 9.5 by its time limits). From the repository root, PYTHONPATH set by the caller
# (the wheels and the repository):
#
#     bash load_tests/tp_allreduce_h200x2.sh OUT_DIR
#
# Everything goes under OUT_DIR: check/, allreduce/, tp/ (results.json, results.md), *.log, summary.txt.
# Stops after the check when the one-shot sums are wrong or it could not be set up; otherwise each later
# step runs even when an earlier one failed, and summary.txt lists every step's exit status.
set -x
OUT=${1:?usage: bash load_tests/tp_allreduce_h200x2.sh OUT_DIR}
source "$(dirname "$0")/h200x2_common.sh"
: >"$SUMMARY"  # this script's steps only

# 1. correctness first: a wrong all-reduce would make every later figure meaningless.
if ! step check 120 python -m load_tests.allreduce_bench --check --out "$OUT/check"; then
  echo "STOPPED: the one-shot all-reduce failed its check or could not be set up (see $OUT/check.log)" | tee -a "$SUMMARY"
  exit 1
fi

# 2. all-reduce latency, NCCL vs one-shot, at 1/16/64/256 rows of 4096 bf16, eager and in a graph of 64.
step allreduce 120 python -m load_tests.allreduce_bench --out "$OUT/allreduce"

# 3. the 8B-class model: one GPU, two GPUs with the one-shot all-reduce, two GPUs with NCCL's.
step tp_bench 330 python -m load_tests.tp_bench --tokenizer .bench/tok-smollm2 --out "$OUT/tp" --models 8b \
  --layouts tp1,tp2,tp2-nccl --no-reference
cat "$OUT/tp/results.md" 2>/dev/null
echo "== summary"; cat "$SUMMARY"
