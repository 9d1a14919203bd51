"""Why the server shortens the GIL's switch interval while it loads a compiled decode bucket
(engine/cuda_graphs.py, LOAD_SWITCH_INTERVAL_S): the eager decode step of the server's own engine
(Engines.build, CPU defaults, compiling off) on this thread, alone and beside a thread busy in pure Python
(as dynamo's trace is), at the default 5 ms interval and at 0.1 ms. Every op of the step gives the GIL up
and waits to get it back for up to the interval.

    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=1000000 python -m load_tests.gil_switch_interval \
        --out load_tests/results/cpu_vs_llamacpp/compile_process/gil_switch_interval.json

Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from load_tests.cpu_bench import machine
from load_tests.engine_thread_step import ms_per_step
from server.config import Settings
from server.runtime import Engines

CASES = [("alone", 5e-3, False), ("busy thread, 5 ms", 5e-3, True), ("busy thread, 0.1 ms", 1e-4, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the cases, interleaved")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = datetime.now(timezone.utc)
    engine = Engines.build(Settings(enable_classify=False, compile_decode="off")).engine
    assert engine is not None
    ms_per_step(engine, 8)  # warm-up
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i * i

    results: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    loads = []
    for _ in range(args.rounds):
        for name, interval, contend in CASES:
            sys.setswitchinterval(interval)
            stop.clear()
            thread = threading.Thread(target=busy) if contend else None
            if thread is not None:
                thread.start()
            results[name] += [round(ms_per_step(engine, args.tokens), 2) for _ in range(3)]
            stop.set()
            if thread is not None:
                thread.join()
            loads.append(round(os.getloadavg()[0], 2))
            print(name, results[name], flush=True)
    out = {
        "command": "python -m load_tests.gil_switch_interval " + " ".join(sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "machine": {k: v for k, v in machine().items() if k != "lscpu"},
        "ms_per_eager_decode_step": results,
        "load_average_1m": loads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
