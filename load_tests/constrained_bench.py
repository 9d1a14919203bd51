"""Constrained and logprobs against free decoding, engine level: step time and tokens/s at several batch sizes.

Builds the engine the server builds (server.runtime.Engines.build), fills a batch with B copies of one
chat prompt (with ``--varied``, B distinct ones: rows whose grammar states differ, as users' do), either
free, constrained by a JSON schema (an array of at least 100 short strings, so no row can finish inside the
measured steps), or asking for logprobs with the top 5 alternatives, and times
``--steps`` decode steps of the full batch (tokens/s counts the tokens the steps produced: a constrained row
put off a step while its mask is computed produces none; ``put_off_pct`` says how many); it also times the
extra work inside each step (grammar: mask computation and application, feeding each matcher its token;
logprobs: picking the values and top alternatives of the rows that ask, but not their log-softmax, which is
inline in ``sampler.sample``; the grammar's time leaves out waiting for the step's argmax, which greedy rows'
masks do on a GPU).
Rounds alternate the modes so that drift on a shared machine hits all alike.

    python -m load_tests.constrained_bench --batch 1 64 --out load_tests/results/constrained
    python -m load_tests.constrained_bench --device cuda --batch 1 64 256 --out load_tests/results/constrained_h200 \
        --model dummy:smollm2-135m --tokenizer .bench/tok-smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llguidance

from engine import constraints, sampler
from engine.llm_engine import LLMEngine
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from load_tests.cpu_bench import machine
from server.config import Settings
from server.runtime import Engines

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 100}
PROMPT = [{"role": "user", "content": "List the words you know as a JSON array of strings."}]


class ExtraClock:
    """Seconds the sampler spends on grammars and logprobs, accumulated by wrapping their entry points."""

    def __init__(self) -> None:
        self.seconds = 0.0

        def timed(fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            return wrapper

        constraints.apply_masks, constraints.advance = timed(constraints.apply_masks), timed(constraints.advance)
        sampler._record_logprobs = timed(sampler._record_logprobs)  # the log-softmax is inline in sample(): not here
        argmax_on_host = sampler._argmax_on_host

        def untimed_wait(greedy: Any) -> Any:  # masking greedy rows waits for the argmax: forward time, not grammar
            ready, tokens = argmax_on_host(greedy)

            def wait() -> list[int]:
                start = time.perf_counter()
                try:
                    return tokens()
                finally:
                    self.seconds -= time.perf_counter() - start

            return ready, wait

        sampler._argmax_on_host = untimed_wait


def run_once(
    engine: LLMEngine, prompts: list[list[int]], batch: int, steps: int, params: SamplingParams, clock: ExtraClock
) -> dict[str, float]:
    """Row ``i`` starts from ``prompts[i % len(prompts)]``."""
    keys = list(range(batch))
    for key in keys:
        engine.add(AddRequest(key, prompts[key % len(prompts)], params, f"bench-{key}"))
    while any(len(engine.requests[k].output_ids) == 0 for k in keys):  # prefill (and first tokens)
        engine.step()
    times, extra_times, tokens = [], [], 0
    for _ in range(steps):
        before = clock.seconds
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        extra_times.append(clock.seconds - before)
        finished = [o.finish_reason for o in outputs if o.finish_reason is not None]
        assert not finished, f"a row finished early ({finished[0]}, {params})"
        tokens += len(outputs)  # a constrained row put off a step (engine/constraints.py) has none
    for key in keys:
        engine.abort(key)
    return {
        "step_ms": statistics.median(times) * 1e3,
        "mean_step_ms": statistics.fmean(times) * 1e3,  # the median hides steps that recur (a mask every 4th)
        "tokens_per_s": tokens / sum(times),
        "extra_ms": statistics.median(extra_times) * 1e3,
        "put_off_pct": 100 * (1 - tokens / (batch * steps)),
    }


def model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for dummy: models")


def build(args: argparse.Namespace, max_num_seqs: int) -> tuple[Engines, LLMEngine, list[int], str]:
    """The engine the server builds for ``--model``, the benchmark's chat prompt as token ids and its
    schema's grammar, with the grammar token table built (not part of any measured step)."""
    settings = Settings(
        gen_model=args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        enable_classify=False,
        max_num_seqs=max_num_seqs,
    )
    built = Engines.build(settings)
    engine = built.engine
    assert engine is not None
    prompt = engine.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    # Compact, as the server's JSON was when these figures began (comparable across sessions); the server's
    # layout now allows a little whitespace (server.services.constraints.JSON_OPTIONS).
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, {"whitespace_flexible": False})
    engine.grammars.warm()
    return built, engine, prompt, grammar


THINGS = ("fruits", "animals", "cities", "colors", "first names", "rivers", "tools", "dishes", "plants", "sports")
LIST_CASES = [(thing, letter) for letter in "ABCDEFGHIJKLMNOPRSTW" for thing in THINGS]  # (what, first letter)


def chat(engine: LLMEngine, text: str) -> list[int]:
    """One user turn through the model's chat template, as token ids."""
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def varied_prompts(engine: LLMEngine) -> list[list[int]]:
    """Distinct chat prompts in the manner of :data:`PROMPT`, one per :data:`LIST_CASES` entry, so that rows'
    outputs (and grammar states) differ, as different users' would."""
    return [chat(engine, f"List {thing} starting with {letter} as a JSON array.") for thing, letter in LIST_CASES]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--varied", action="store_true", help="a distinct prompt per row (else one prompt for all)")
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=("free", "json_schema", "logprobs"),
        default=["free", "json_schema", "logprobs"],
        help="free and logprobs rows may end early on --varied prompts (the benchmark then stops): leave them out",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    built, engine, prompt, grammar = build(args, max(args.batch))
    prompts = varied_prompts(engine) if args.varied else [prompt]
    clock = ExtraClock()
    room = 2 * args.steps + 64  # for the decode steps that run between prefill steps while distinct prompts fill
    modes = {
        "free": SamplingParams(max_tokens=room),
        "json_schema": SamplingParams(max_tokens=room, grammar=grammar),
        "logprobs": SamplingParams(max_tokens=room, logprobs=5),
    }
    modes = {mode: modes[mode] for mode in args.modes}
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    run_once(engine, prompts, 1, 4, modes["json_schema"], clock)  # warm-up
    for _ in range(args.rounds):
        for batch in args.batch:
            for mode, params in modes.items():
                results.setdefault(str(batch), {}).setdefault(mode, []).append(
                    run_once(engine, prompts, batch, args.steps, params, clock)
                )
    summary: dict[str, dict[str, float]] = {}
    for batch, runs in results.items():
        summary[batch] = {}
        if "free" in runs:
            free = statistics.median(r["step_ms"] for r in runs["free"])
            free_rate = statistics.median(r["tokens_per_s"] for r in runs["free"])
            free_mean = statistics.median(r["mean_step_ms"] for r in runs["free"])
            summary[batch] |= {
                "free_step_ms": round(free, 3),
                "free_mean_step_ms": round(free_mean, 3),
                "free_tokens_per_s": round(free_rate, 1),
            }
        for mode in [m for m in runs if m != "free"]:
            step = statistics.median(r["step_ms"] for r in runs[mode])
            extra = statistics.median(r["extra_ms"] for r in runs[mode])
            summary[batch] |= {
                f"{mode}_step_ms": round(step, 3),
                f"{mode}_mean_step_ms": round(statistics.median(r["mean_step_ms"] for r in runs[mode]), 3),
                f"{mode}_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs[mode]), 1),
                f"{mode}_put_off_pct": round(statistics.median(r["put_off_pct"] for r in runs[mode]), 1),
                f"{mode}_extra_ms_per_step": round(extra, 3),
                f"{mode}_extra_share_of_step_pct": round(extra / step * 100, 1),
            }
    cpu = machine()["cpu_model"]
    report = {
        "command": "python -m load_tests.constrained_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(),
        "device": str(engine.runner.device),
        "cpu": cpu,
        "model": built.served.gen_model_id,
        "schema": SCHEMA,
        "prompts": len(prompts),
        "steps": args.steps,
        "rounds": args.rounds,
        "summary": summary,
        "runs": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
