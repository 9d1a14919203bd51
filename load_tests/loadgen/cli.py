"""``python -m load_tests.loadgen``: sweeps from the command line, results printed and written as a report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from load_tests.loadgen.prompts import BUILTIN_PROMPTS, load_prompts
from load_tests.loadgen.runner import run_sweep_sync
from load_tests.loadgen.scenarios import DEFAULT_LABELS, SCENARIO_NAMES, make_scenario
from load_tests.loadgen.targets import TargetRefused, check_target


def _int_list(text: str) -> list[int]:
    vals = [int(v) for v in text.split(",") if v.strip()]
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,4,16")
    return vals


def _float_list(text: str) -> list[float]:
    vals = [float(v) for v in text.split(",") if v.strip()]
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError("expected positive numbers, e.g. 5,10,20")
    return vals


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("expected 'Name: value'")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.loadgen",
        description="Load generator for the inference server and OpenAI-compatible peers. "
        "Closed loop (--concurrency) or open loop with Poisson arrivals (--rate); comma lists sweep.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="target base URL (may end in /v1)")
    p.add_argument("--scenario", default="generate-stream", choices=SCENARIO_NAMES)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, help="closed loop: workers, e.g. 1,4,16")
    load.add_argument("--rate", type=_float_list, help="open loop: Poisson arrivals/s, e.g. 5,10,20")
    p.add_argument("--requests", type=int, default=100, help="max requests per level")
    p.add_argument("--duration", type=float, default=60.0, help="max seconds per level")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--max-in-flight", type=int, default=256, help="open-loop cap on outstanding requests")
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests before the first level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-file", type=Path, help="prompts: .jsonl or one per line")
    p.add_argument("--label", help="name of this run in reports (e.g. ours, peer-x)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, help="/generate only")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--request-seed", action="store_true", help="send a seeded per-request 'seed'")
    gen.add_argument("--use-messages", action="store_true", help="/generate: send prompts as messages")
    gen.add_argument("--model", default="default", help="OpenAI 'model' field")
    gen.add_argument("--no-stream-usage", action="store_true", help="OpenAI streams: omit stream_options.include_usage")
    cls = p.add_argument_group("classification")
    cls.add_argument("--labels", help="comma-separated labels (default: built-in intents)")
    cls.add_argument("--no-labels", action="store_true", help="send no labels")
    cls.add_argument("--multi-label", action="store_true")
    cls.add_argument("--batch-size", type=int, default=1, help="inputs per /classify request")
    p.add_argument("--header", type=_header, action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target you own")
    p.add_argument("--out", type=Path, help="write results.json, results.md and PNG plots here")
    p.add_argument("--raw", action="store_true", help="include per-request records in results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Exit 0 on a completed run, 1 if no request succeeded, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        check_target(args.url, args.allow_remote)
    except TargetRefused as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    if args.requests < 1 or args.duration <= 0 or args.timeout <= 0:
        print("loadgen: --requests, --duration and --timeout must be positive", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts_file) if args.prompts_file else BUILTIN_PROMPTS
    labels: Sequence[str] | None = DEFAULT_LABELS
    if args.no_labels:
        labels = ()
    elif args.labels:
        labels = [lb.strip() for lb in args.labels.split(",") if lb.strip()]
    scenario = make_scenario(
        args.scenario,
        prompts=prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        request_seed=args.request_seed,
        use_messages=args.use_messages,
        model=args.model,
        stream_usage=not args.no_stream_usage,
        labels=labels,
        multi_label=args.multi_label,
        batch_size=args.batch_size,
    )
    concurrencies = args.concurrency if args.rate is None else None
    if concurrencies is None and args.rate is None:
        concurrencies = [1]
    result = run_sweep_sync(
        args.url,
        scenario,
        concurrencies=concurrencies,
        rates=args.rate,
        requests=args.requests,
        duration=args.duration,
        seed=args.seed,
        timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        warmup=args.warmup,
        allow_remote=args.allow_remote,
        headers=dict(args.header) or None,
        progress=not args.no_progress,
        label=args.label,
    )
    from load_tests import report

    print(report.markdown_report(result.to_dict()))
    if args.out is not None:
        written = report.write_report(result, args.out, raw=args.raw)
        for path in written.values():
            print(f"wrote {path}", file=sys.stderr)
    if not any(s.ok for s in result.summaries):
        print("loadgen: no request succeeded", file=sys.stderr)
        return 1
    return 0
