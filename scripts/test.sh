#!/usr/bin/env bash
# The README's test command: install what the tests need, lint, then run every tier (unit, integration, live)
# on CPU; arguments go to pytest (e.g. -m unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python3 -m ruff check .
python3 -m ruff format --check .
HF_HUB_OFFLINE=1 python3 -m pytest "$@"
