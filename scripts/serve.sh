#!/usr/bin/env bash
# The README's serve command: install, then start the server on the embedded default models.
# Extra arguments go to the server (see `python -m server --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
HF_HUB_OFFLINE=1 exec python3 -m server "$@"
