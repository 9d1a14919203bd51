"""Where a constrained decode step's host time goes, sampler level: this revision against an earlier one.

Builds the engine the server builds, fills a batch with B copies of one chat prompt constrained by the
JSON schema of load_tests/constrained_bench.py, and runs real decode steps. At each step it takes the step's
logits and precomputed argmax, and on deep copies of every row's matcher times, in alternating order:

- ``previous``: ``sampler.sample`` as it was at ``--before`` (engine/sampler.py and engine/constraints.py
  loaded from git; default 36cf91a: every constrained row's mask computed, on a CPU a greedy row whose argmax
  its mask allows left unmasked, on CUDA every row masked);
- ``now``: ``sampler.sample`` as the decode step calls it (a greedy row whose argmax its grammar allows
  settles without its mask being computed), plus feeding each matcher its token (which the engine defers
  to the next step's forward: on a GPU, into the time the host waits for it);
- ``masks``: llguidance computing every row's mask alone, through the engine's executor (and, with
  ``--threads``, executors of that many threads), and ``settle``: checking each row's argmax the way ``now``
  does, without a mask;
- ``advance``: feeding every matcher its token.

Both sampler paths must pick the same tokens (checked at every step). The step itself then runs as usual.
Rows are greedy (all alike: the best case for settling) or, with ``--temperature``, sampled with a seed each
(they drift apart; none can settle: every row's mask is computed, as before).

    python -m load_tests.constrained_mask_bench --batch 1 64 256 --out load_tests/results/constrained/lazy-cpu
    python -m load_tests.constrained_mask_bench --device cuda --batch 1 64 256 --model dummy:smollm2-135m \\
        --tokenizer .bench/tok-smollm2 --out load_tests/results/constrained_h200/lazy
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import llguidance
import torch

from engine import constraints, model_runner, sampler
from engine.protocol import AddRequest
from engine.sequence import SamplingParams, Sequence
from load_tests.admission_bench import module_at
from load_tests.constrained_bench import SCHEMA, build, model_arguments
from load_tests.cpu_bench import machine


def copies(seqs: list[Sequence]) -> list[Sequence]:
    """Shallow copies of the rows whose matchers are deep copies, so a timed path leaves the real ones alone."""
    out = []
    for s in seqs:
        c = copy.copy(s)
        if s.generator is not None:  # a sampled row draws from its own copy of the random stream
            c.generator = torch.Generator().set_state(s.generator.get_state())
        if s.constraint is not None:
            c.constraint = constraints.Constraint(s.constraint.matcher.deep_copy(), s.constraint.eos_ids)
            c.constraint.lagging = s.constraint.lagging
        out.append(c)
    return out


def previous_sampler(rev: str) -> Any:
    """engine/sampler.py at ``rev``, calling engine/constraints.py at ``rev`` (on the engine's executor); None
    where this copy of the repository has no git history to load them from."""
    try:
        before = module_at(rev, "engine/constraints.py")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no previous sampler to compare against ({rev}: {exc}); timing this revision alone", flush=True)
        return None
    before._EXECUTOR = constraints._EXECUTOR
    module = module_at(rev, "engine/sampler.py")
    module.constraints = before
    return module.sample


class Probe:
    """Replaces the model runner's ``sample``: times the paths on copies, then samples for real."""

    def __init__(self, before: Any, threads: list[int]) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.paths = {"now": sampler.sample} if before is None else {"previous": before, "now": sampler.sample}
        self.executors = {f"masks_{n}_threads": llguidance.LLExecutor(num_threads=n) for n in threads}
        self.flip = False
        self.settled = 0
        self.rows = 0
        self.masked = 0  # greedy rows masked by the ``now`` path

    def timed(self, name: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        self.times[name].append(time.perf_counter() - start)
        return result

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None
    ) -> list[int | None]:
        if greedy is None or not any(s.constraint for s in seqs):
            return sampler.sample(logits, seqs, greedy)
        sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
        sync()
        picked: dict[str, list[int | None]] = {}
        for name in reversed(self.paths) if self.flip else self.paths:
            rows, work = copies(seqs), logits.clone()
            sync()
            start = time.perf_counter()
            picked[name] = self.paths[name](work, rows, greedy)
            for s in rows:  # a token taken is fed to its matcher on next use (the next step): counted here
                if s.constraint is not None:
                    s.constraint.matcher  # noqa: B018
            sync()
            self.times[name].append(time.perf_counter() - start)
            if name == "now":
                self.masked += int(torch.isinf(work).any(dim=-1).sum())
        self.flip = not self.flip
        now = picked["now"]  # None where a row was put off a step (engine/constraints.py): no token to compare
        for other in picked.values():
            assert all(a == b for a, b in zip(now, other, strict=True) if a is not None), "the sampler paths disagree"
        words = (logits.shape[-1] + 31) // 32
        bitmask = torch.empty((len(seqs), words), dtype=torch.int32)
        for name, ex in [("masks", constraints._EXECUTOR), *self.executors.items()]:
            live = [(s.constraint.matcher, j) for j, s in enumerate(copies(seqs)) if s.constraint]
            self.timed(name, ex.unsafe_compute_mask_ptr, live, bitmask.data_ptr(), words * 4, len(seqs))
        tokens = greedy.tolist()
        rows = copies(seqs)
        checks = [(s.constraint, t) for s, t in zip(rows, tokens, strict=True) if s.constraint and s.params.greedy]
        settled = self.timed("settle", lambda: [constraints.settles(c, t) for c, t in checks])
        self.settled += sum(settled)
        self.rows += len(settled)
        rows = copies(seqs)
        self.timed("advance", constraints.advance, [s.constraint for s in rows], picked["now"])
        return sampler.sample(logits, seqs, greedy)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=16, help="decode steps probed per batch size")
    ap.add_argument("--threads", type=int, nargs="*", default=[], help="also time executors of these sizes")
    ap.add_argument("--temperature", type=float, default=0.0, help="above 0: sampled rows, seeded apart")
    ap.add_argument("--before", default="36cf91a", help="git revision of the sampler to compare against")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    _, engine, prompt, grammar = build(args, max(args.batch))
    sampled = args.temperature > 0
    before = previous_sampler(args.before)
    summary: dict[str, Any] = {}
    for batch in args.batch:
        probe = Probe(before, args.threads)
        keys = list(range(batch))
        for key in keys:
            params = SamplingParams(
                max_tokens=args.steps + 8, grammar=grammar, temperature=args.temperature, seed=key if sampled else None
            )
            engine.add(AddRequest(key, prompt, params, f"probe-{key}"))
        while any(len(engine.requests[k].output_ids) == 0 for k in keys):  # prefill: not probed
            engine.step()
        model_runner.sample = probe
        try:
            for _ in range(args.steps):
                engine.step()
        finally:
            model_runner.sample = sampler.sample
        for key in keys:
            engine.abort(key)
        row = {name: round(statistics.median(v) * 1e3, 3) for name, v in probe.times.items()}
        row |= {f"{name}_per_row": round(row[name] / batch, 4) for name in ("masks", "settle")}
        row["settled_share"] = round(probe.settled / max(probe.rows, 1), 3)
        row["masked_share"] = round(probe.masked / max(probe.rows, 1), 3)
        summary[str(batch)] = row
        print(batch, json.dumps(row), flush=True)
    cpu = machine()["cpu_model"]
    report = {
        "command": "python -m load_tests.constrained_mask_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "device": str(engine.runner.device),
        "cpu": cpu,
        "host_cpus": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "model": args.model,
        "schema": SCHEMA,
        "steps": args.steps,
        "temperature": args.temperature,
        "before": args.before,
        "unit": "ms per decode step (per row where named so), median over the probed steps",
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
