"""Host time of deadline-aware admission per admitted sequence (engine/deadlines.py ``admissible``), against an
earlier revision's module (default a45cda9~1, which estimated one running sequence at a time), at several
numbers of running sequences, in one process; both must give the same answer:

    python -m load_tests.admission_bench --out load_tests/results/deadline_admission/results.json

The scheduler asks once per sequence it admits, so a wave of new requests beside many running ones costs the
engine thread this much per admission. Not a test: timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

from engine.deadlines import StepRates, admissible
from engine.sequence import SamplingParams, Sequence
from load_tests.cpu_bench import machine

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, path: str) -> types.ModuleType:
    """``path`` of this repository as it was at ``rev``, loaded as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True)
    module = types.ModuleType(f"before_{path.replace('/', '_').removesuffix('.py')}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.stdout, f"{rev}:{path}", "exec"), module.__dict__)  # our own code, from git
    return module


def running(n: int, now: float) -> list[Sequence]:
    """``n`` decoding sequences of 130-token prompts with 128 new tokens, at various points, all with deadlines."""
    out = []
    for i in range(n):
        s = Sequence(list(range(130)), SamplingParams(max_tokens=128))
        s.deadline, s.output_ids = now + 120.0, [1] * (i % 100)
        s.num_computed = s.num_tokens - 1
        out.append(s)
    return out


def per_call_ms(fn: object, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)  # type: ignore[operator]
    return round((time.perf_counter() - start) / calls * 1e3, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--running", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default="a45cda9~1", help="the revision of engine/deadlines.py to compare with")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    before = module_at(args.before, "engine/deadlines.py")
    rates, old_rates = StepRates(), before.StepRates()
    for i in range(50):
        for r in (rates, old_rates):
            r.observe_prefill(4096, 0.005)
            r.observe_decode(20000 + 500 * i, 0.003)
    now = time.perf_counter()
    newcomer = Sequence(list(range(130)), SamplingParams(max_tokens=128))
    rows = []
    for n in args.running:
        seqs = running(n, now)
        call, old_call = (newcomer, seqs, rates, now, 4096, 130), (newcomer, seqs, old_rates, now, 4096, 130)
        assert admissible(*call) == before.admissible(*old_call)
        after_ms, before_ms = [], []
        for _ in range(args.rounds):  # interleaved: a shared machine slows both alike
            after_ms.append(per_call_ms(admissible, call, args.calls))
            before_ms.append(per_call_ms(before.admissible, old_call, args.calls))
        rows.append(
            {"running": n, "after_ms": sorted(after_ms)[len(after_ms) // 2],
             "before_ms": sorted(before_ms)[len(before_ms) // 2], "rounds": {"after": after_ms, "before": before_ms}}
        )  # fmt: skip
        print(rows[-1], flush=True)
    m = machine()
    result = {
        "command": "python -m load_tests.admission_bench " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {k: v for k, v in m.items() if k != "lscpu"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
