"""Seconds from starting the server to ``/ready`` on CPU, eager against compiled decode steps, the
compiled start once with an empty inductor cache (a first start) and once with the cache it filled
(every later start). The compressed-model cache is warmed first, so only the decode-step setup differs.

    HF_HUB_OFFLINE=1 python -m load_tests.cpu_startup --out load_tests/results/cpu_vs_llamacpp/startup.json

Not a test: minutes of compiling, never run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from load_tests.cpu_bench import machine
from load_tests.ready_time import time_to_ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = datetime.now(timezone.utc)
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_") and k != "TORCHINDUCTOR_CACHE_DIR"}
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="inductor-") as inductor:
        runs = [
            ("eager (compressed-model cache warm)", {"LLM_COMPILE_DECODE": "off"}),
            ("eager", {"LLM_COMPILE_DECODE": "off"}),
            ("compiled, empty inductor cache", {"LLM_COMPILE_DECODE": "on", "TORCHINDUCTOR_CACHE_DIR": inductor}),
            ("compiled, inductor cache warm", {"LLM_COMPILE_DECODE": "on", "TORCHINDUCTOR_CACHE_DIR": inductor}),
        ]
        for name, extra in runs:
            results[name] = round(time_to_ready([], {**base, **extra}, args.timeout)[0], 1)
            print(name, results[name], flush=True)
    m = machine()
    out = {
        "command": "python -m load_tests.cpu_startup " + " ".join(sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in m.items() if k != "lscpu"},
        "seconds_to_ready": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
