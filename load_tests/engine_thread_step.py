"""Decode-step time of the server's own engine (Engines.build, the CPU defaults) on the main thread against
a second thread, as the server runs its engine (EngineLoop's thread): the same steps, the same graphs.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind HF_HUB_OFFLINE=1 python -m load_tests.engine_thread_step \\
        --out load_tests/results/cpu_vs_llamacpp/background_compile/engine_thread_step.json

Decode steps are compiled first (background compiling, waited for) unless ``--eager``. Not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from engine.llm_engine import LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from load_tests.cpu_bench import machine
from server.config import Settings
from server.runtime import Engines

KEYS = itertools.count()


def ms_per_step(engine: LLMEngine, tokens: int, batch: int = 1) -> float:
    """``batch`` greedy requests of ``tokens`` tokens at once through engine.step(): milliseconds per decode
    step (their prefill steps run first, not timed)."""
    for i in range(batch):
        prompt = [100 + i, *range(101, 120)]
        engine.add(AddRequest(next(KEYS), prompt, SamplingParams(max_tokens=tokens), "bench"))
    while any(s.num_computed < len(s.prompt_ids) for s in engine.requests.values()):
        engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    return 1000 * (time.perf_counter() - start) / steps


def profile(engine: LLMEngine, tokens: int, batch: int, rows: int = 30) -> str:
    """torch.profiler's table (self CPU time) over ``batch`` requests' decode steps on this thread."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ms_per_step(engine, tokens, batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eager", action="store_true", help="eager decode steps (--compile-decode off)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together in each measured step")
    ap.add_argument("--profile", type=Path, help="then write torch.profiler's table of such steps here")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    started = datetime.now(timezone.utc)
    built = Engines.build(Settings(enable_classify=False, compile_decode="off" if args.eager else "auto"))
    engine = built.engine
    assert engine is not None
    engine.start_compiling()
    if engine.runner.decode._compiler is not None:
        engine.runner.decode._compiler.join()
    results: dict[str, list[float]] = {"main thread": [], "second thread": []}
    for _ in range(args.rounds):  # interleaved: a loaded machine slows both alike
        results["main thread"].append(round(ms_per_step(engine, args.tokens, args.batch), 2))
        worker = threading.Thread(
            target=lambda: results["second thread"].append(round(ms_per_step(engine, args.tokens, args.batch), 2))
        )
        worker.start()
        worker.join()
        print(results, flush=True)
    out = {
        "command": "python -m load_tests.engine_thread_step " + " ".join(sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in machine().items() if k != "lscpu"},
        "decode_compile": built.served.policy.compile_decode,
        "compile_progress": engine.runner.decode.compile_progress() if not args.eager else None,
        "batch": args.batch,
        "ms_per_step": results,
        "median_ms_per_step": {k: statistics.median(v) for k, v in results.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    if args.profile is not None:
        args.profile.write_text(profile(engine, args.tokens, args.batch))


if __name__ == "__main__":
    main()
