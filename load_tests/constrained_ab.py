"""A constrained decode step with this revision's sampler against an earlier revision's, in one process.

Builds the engine the server builds and, in rounds that alternate which side goes first, runs B greedy rows
constrained by the JSON schema of load_tests/constrained_bench.py on distinct prompts (``--varied``'s: rows'
grammar states differ, as users' do) and on copies of one prompt, with the model runner's ``sample`` set to
this revision's and to ``--before``'s (engine/sampler.py and engine/constraints.py loaded from git), plus one
free run per round for scale. Same engine, model, GPU and moment for both sides: across processes or device
calls the host's speed moved by more than the change being measured.

    python -m load_tests.constrained_ab --device cuda --model MODEL --before REV --out DIR

Writes ``results.json`` under ``--out``. Not a test: never collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import types
from pathlib import Path

from engine import model_runner, sampler
from engine.sequence import SamplingParams
from load_tests.constrained_bench import build, model_arguments, run_once, varied_prompts
from load_tests.constrained_mask_bench import previous_sampler
from load_tests.cpu_bench import machine


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--before", required=True, help="git revision of the sampler to compare against")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    before = previous_sampler(args.before)
    if before is None:
        raise SystemExit("no git history here to load the earlier sampler from")
    _, engine, prompt, grammar = build(args, args.batch)
    prompts = {"distinct": varied_prompts(engine), "one": [prompt]}
    clock = types.SimpleNamespace(seconds=0.0)  # run_once's extra-time clock: nothing is wrapped here
    room = 2 * args.steps + 64
    constrained, free = SamplingParams(max_tokens=room, grammar=grammar), SamplingParams(max_tokens=room)
    sides = {"now": sampler.sample, args.before: before}
    for sample in sides.values():  # warm-up: each side's first steps
        model_runner.sample = sample
        run_once(engine, prompts["distinct"], 4, 4, constrained, clock)
    runs: dict[str, list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for side in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            model_runner.sample = sides[side]
            for name, rows in prompts.items():
                runs.setdefault(f"{side} {name}", []).append(
                    run_once(engine, rows, args.batch, args.steps, constrained, clock)
                )
        model_runner.sample = sides["now"]
        runs.setdefault("free one", []).append(run_once(engine, prompts["one"], args.batch, args.steps, free, clock))
        print(json.dumps({k: [round(x["step_ms"], 3) for x in v] for k, v in runs.items()}), flush=True)
    summary = {
        key: {
            "step_ms_median_of_rounds": round(statistics.median(x["step_ms"] for x in v), 3),
            "mean_step_ms_median_of_rounds": round(statistics.median(x["mean_step_ms"] for x in v), 3),
            "tokens_per_s_median_of_rounds": round(statistics.median(x["tokens_per_s"] for x in v), 1),
            "put_off_pct_median_of_rounds": round(statistics.median(x["put_off_pct"] for x in v), 2),
            "step_ms_per_round": [round(x["step_ms"], 3) for x in v],
        }
        for key, v in runs.items()
    }
    doc = {
        "benchmark": "constrained_ab",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m load_tests.constrained_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "step_ms_per_round"} for k, v in summary.items()}))


if __name__ == "__main__":
    main()
