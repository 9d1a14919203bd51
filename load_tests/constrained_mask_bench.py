"""Where a constrained decode step's host time goes, sampler level, before and after side by side.

Builds the engine the server builds, fills a batch with B copies of one chat prompt constrained by the
JSON schema of load_tests/constrained_bench.py, and runs real decode steps. At each step it takes the step's
logits and precomputed argmax, and on copies of every row's matcher times, in alternating order:

- ``before``: ``sampler.sample`` without the precomputed argmax: every constrained row masked and searched
  again (the path every constrained step took until the argmax was reused);
- ``after``: ``sampler.sample`` as the decode step calls it, with the argmax;
- ``masks``: llguidance computing the batch's masks alone, through the engine's executor and through
  executors of 1, 2, 4, ... threads (does the batch spread over the host's cores?), and one matcher at a time;
- ``advance``: feeding every matcher its token, one call per row (the engine's) and in one batched call
  (``LLExecutor.consume_token_par``).

Both sampler paths must pick the same tokens (checked at every step). The step itself then runs as usual.

    python -m load_tests.constrained_mask_bench --batch 64 --out load_tests/results/constrained/mask-cpu
    python -m load_tests.constrained_mask_bench --device cuda --batch 64 256 --model dummy:smollm2-135m \\
        --tokenizer .bench/tok-smollm2 --out load_tests/results/constrained_h200/mask
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
from load_tests.constrained_bench import SCHEMA, build, model_arguments


def copies(seqs: list[Sequence]) -> list[Sequence]:
    """Shallow copies of the rows whose matchers are deep copies, so a timed path leaves the real ones alone."""
    out = []
    for s in seqs:
        c = copy.copy(s)
        if s.constraint is not None:
            c.constraint = constraints.Constraint(s.constraint.matcher.deep_copy(), s.constraint.eos_ids)
        out.append(c)
    return out


def one_by_one(live: list[tuple[llguidance.LLMatcher, int]]) -> None:
    for matcher, _ in live:
        matcher.compute_bitmask()


class Probe:
    """Replaces the model runner's ``sample``: times the paths on copies, then samples for real."""

    def __init__(self, threads: list[int]) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.executors = {n: llguidance.LLExecutor(num_threads=n) for n in threads}
        self.flip = False
        self.turn = 0
        self.kept_rows = 0
        self.rows = 0
        self.real = sampler.sample

    def timed(self, name: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args)
        self.times[name].append(time.perf_counter() - start)
        return result

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None) -> list[int]:
        if greedy is None or not any(s.constraint for s in seqs):
            return self.real(logits, seqs, greedy)
        sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
        sync()
        picked: dict[str, list[int]] = {}
        for name in ("after", "before") if self.flip else ("before", "after"):
            rows, work = copies(seqs), logits.clone()
            sync()
            start = time.perf_counter()
            picked[name] = self.real(work, rows, greedy if name == "after" else None)
            sync()
            self.times[name].append(time.perf_counter() - start)
            if name == "after" and not logits.is_cuda:
                self.kept_rows += sum(bool(torch.equal(work[i], logits[i])) for i in range(len(seqs)))
                self.rows += len(seqs)
        self.flip = not self.flip
        assert picked["before"] == picked["after"], "the two sampler paths disagree"
        words = (logits.shape[-1] + 31) // 32
        variants: list[tuple[Any, Any]] = [("engine", constraints._EXECUTOR), *self.executors.items(), ("one", None)]
        self.turn += 1
        for label, ex in variants[self.turn % len(variants) :] + variants[: self.turn % len(variants)]:
            rows = copies(seqs)  # each variant on fresh copies, in a rotating order (warm caches favour later ones)
            bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
            live = [(s.constraint.matcher, j) for j, s in enumerate(rows) if s.constraint]
            if ex is None:
                self.timed("masks_one_by_one", one_by_one, live)
            else:
                name = label if label == "engine" else f"{label}_threads"
                self.timed(f"masks_{name}", ex.unsafe_compute_mask_ptr, live, bitmask.data_ptr(), words * 4, len(rows))
        tokens = picked["after"]
        rows = copies(seqs)
        self.timed("advance_per_row", constraints.advance, [s.constraint for s in rows], tokens)
        rows = copies(seqs)
        pairs = [(s.constraint.matcher, t) for s, t in zip(rows, tokens, strict=True)]
        self.timed("advance_batched", constraints._EXECUTOR.consume_token_par, pairs)
        return self.real(logits, seqs, greedy)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument("--steps", type=int, default=16, help="decode steps probed per batch size")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    _, engine, prompt, grammar = build(args, max(args.batch))
    params = SamplingParams(max_tokens=args.steps + 8, grammar=grammar)
    summary: dict[str, Any] = {}
    for batch in args.batch:
        probe = Probe(args.threads)
        keys = list(range(batch))
        for key in keys:
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
        summary[str(batch)] = {name: round(statistics.median(v) * 1e3, 3) for name, v in probe.times.items()}
        summary[str(batch)]["kept_row_share"] = round(probe.kept_rows / max(probe.rows, 1), 3)
        print(batch, json.dumps(summary[str(batch)]), flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    report = {
        "command": "python -m load_tests.constrained_mask_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "device": str(engine.runner.device),
        "cpu": cpu,
        "host_cpus": len(os.sched_getaffinity(0)),
        "model": args.model,
        "schema": SCHEMA,
        "steps": args.steps,
        "unit": "ms per decode step, median over the probed steps",
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
