"""Where a constrained decode step's host time goes, phase by phase, in real engine steps.

Builds the engine the server builds, fills a batch with B copies of the chat prompt of
load_tests/constrained_bench.py, constrained by its JSON schema (or free), and steps it, stamping the host
clock where the step launches its forward, where the sampler starts, where it starts and stops waiting for
the argmax (on a GPU: for the forward), around each batch of llguidance masks, and where sampling ends.
Prints the median of each phase over the timed steps, constrained and free alternating.

    python -m load_tests.constrained_timeline --device cuda --model dummy:smollm2-135m \\
        --tokenizer .bench/tok-smollm2 --batches 64 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from engine import constraints, model_runner, sampler
from engine.llm_engine import LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from load_tests.constrained_bench import build, model_arguments, varied_prompts

Event = tuple[float, str, dict[str, float]]


def instrument(engine: LLMEngine, events: list[Event]) -> None:
    """Wraps the step's phases so that each appends (time, name, details) to ``events``."""

    def stamp(name: str, **details: float) -> None:
        events.append((time.perf_counter(), name, details))

    def around(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stamp(f"{name}_start")
            try:
                return fn(*args, **kwargs)
            finally:
                stamp(f"{name}_end")

        return wrapper

    decode = engine.runner.decode
    decode.replay = around(decode.replay, "launch")
    model_runner.sample = around(model_runner.sample, "sample")
    compute = constraints._Bitmask.compute

    def timed_compute(self: Any, js: Any) -> None:
        js = list(js)
        rows = sum(not self.computed[j] for j in js)
        start = time.perf_counter()
        compute(self, js)
        stamp("masks", rows=rows, seconds=time.perf_counter() - start)

    constraints._Bitmask.compute = timed_compute
    argmax_on_host = sampler._argmax_on_host

    def timed_argmax(greedy: Any) -> Any:
        ready, tokens = argmax_on_host(greedy)
        return ready, around(tokens, "wait")

    sampler._argmax_on_host = timed_argmax


def phases(events: list[Event], start: float, end: float) -> dict[str, float]:
    """One step's phases in ms (rows: counts)."""
    at = {name: t for t, name, _ in events if name != "masks"}
    out = {
        "step": end - start,
        "to_launch_end": at["launch_end"] - start,
        "sample": at["sample_end"] - at["sample_start"],
        "after_sample": end - at["sample_end"],
    }
    if "wait_start" in at:
        masks = [(t, d) for t, name, d in events if name == "masks"]
        out |= {
            "sample_to_wait": at["wait_start"] - at["sample_start"],
            "wait": at["wait_end"] - at["wait_start"],
            "after_wait": at["sample_end"] - at["wait_end"],
            "masks_before_wait": sum(d["seconds"] for t, d in masks if t <= at["wait_start"]),
            "masks_after_wait": sum(d["seconds"] for t, d in masks if t > at["wait_start"]),
        }
        rows = {
            "rows_masked_before_wait": sum(d["rows"] for t, d in masks if t <= at["wait_start"]),
            "rows_masked_after_wait": sum(d["rows"] for t, d in masks if t > at["wait_start"]),
        }
    else:
        rows = {}
    return {k: v * 1e3 for k, v in out.items()} | rows


def measure(
    engine: LLMEngine, events: list[Event], prompts: list[list[int]], grammar: str | None, batch: int, steps: int
) -> dict[str, float]:
    """Row ``i`` starts from ``prompts[i % len(prompts)]``."""
    params = SamplingParams(max_tokens=steps + 48, grammar=grammar)
    keys = list(range(batch))
    for key in keys:
        engine.add(AddRequest(key, prompts[key % len(prompts)], params, f"timeline-{key}"))
    while any(len(engine.requests[k].output_ids) == 0 for k in keys):
        engine.step()
    for _ in range(8):  # past the first decode steps (a new width's capture, the matchers' first states)
        engine.step()
    timed = []
    for _ in range(steps):
        events.clear()
        start = time.perf_counter()
        engine.step()
        timed.append(phases(events, start, time.perf_counter()))
    for key in keys:
        engine.abort(key)
    return {k: round(statistics.median(t[k] for t in timed), 3) for k in timed[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--varied",
        action="store_true",
        help="constrained rows start from distinct prompts (free rows keep one: on distinct ones they end early)",
    )
    args = ap.parse_args(argv)
    _, engine, prompt, grammar = build(args, max(args.batches))
    varied = varied_prompts(engine)
    events: list[Event] = []
    instrument(engine, events)
    for batch in args.batches:
        for _ in range(args.rounds):
            for mode, g in (("json_schema", grammar), ("free", None)):
                prompts = varied if g is not None and args.varied else [prompt]
                row = measure(engine, events, prompts, g, batch, args.steps)
                print(json.dumps({"batch": batch, "mode": mode, "varied": prompts is varied} | row), flush=True)


if __name__ == "__main__":
    main()
