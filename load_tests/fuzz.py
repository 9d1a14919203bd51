"""Schema fuzzing: schemathesis generates requests from the server's own OpenAPI schema, valid ones
(positive) and schema-violating ones (negative), and every answer must be a non-5xx.

Run it against a server started with small generation limits, so valid cases stay cheap:

    python -m server --port 8000 --max-new-tokens 4 --default-max-tokens 4 --max-input-tokens 128 \\
        --cls-max-inputs 8 &
    python -m load_tests.fuzz --url http://127.0.0.1:8000 --examples 300 --out load_tests/results/fuzz

A case counts as failed on a 5xx status or when no response came back (connection error, timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from load_tests.loadgen import check_target, environment_info


@dataclass
class FuzzFailure:
    operation: str
    mode: str
    outcome: str  # status code or exception name
    curl: str


@dataclass
class FuzzResult:
    url: str
    examples_per_operation: int
    seed: int
    cases: int = 0
    duration_s: float = 0.0
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)  # "POST /generate positive" -> status -> n
    failures: list[FuzzFailure] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return len(self.failures)


def _generate(
    strategy: hypothesis.strategies.SearchStrategy[schemathesis.Case],
    send: Callable[[schemathesis.Case], None],
    examples: int,
    seed: int,
) -> None:
    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: every case is a distinct request
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @hypothesis.given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        send(case)

    run()


def fuzz(
    url: str, *, examples: int = 250, seed: int = 0, timeout: float = 30.0, model: str | None = "default"
) -> FuzzResult:
    """``examples`` cases per operation and generation mode (positive and negative), reproducible
    from ``seed``. Never raises for a bad answer: failures are collected into the result. ``model``
    replaces the ``model`` of valid /v1 bodies (a random name only reaches the 404), so they reach
    the engines."""
    check_target(url)
    schema = schemathesis.openapi.from_url(f"{url.rstrip('/')}/openapi.json")
    result = FuzzResult(url=url, examples_per_operation=examples, seed=seed)
    session = requests.Session()
    session.trust_env = False
    start = time.perf_counter()
    for entry in schema.get_all_operations():
        operation = entry.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{operation.label} {mode.value}"
            counts: Counter[str] = Counter()

            def send(
                case: schemathesis.Case, key: str = key, mode: str = mode.value, counts: Counter[str] = counts
            ) -> None:
                result.cases += 1
                if model is not None and mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model
                try:
                    response = case.call(base_url=url, session=session, timeout=timeout)
                    outcome, failed = str(response.status_code), response.status_code >= 500
                except requests.RequestException as exc:
                    outcome, failed = f"error:{type(exc).__name__}", True
                counts[outcome] += 1
                if failed:
                    result.failures.append(FuzzFailure(key.rsplit(" ", 1)[0], mode, outcome, case.as_curl_command()))

            # Unsatisfiable: nothing to violate (a GET without parameters has no negative cases).
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                _generate(operation.as_strategy(generation_mode=mode), send, examples, seed)
            result.statuses[key] = dict(sorted(counts.items()))
    result.duration_s = round(time.perf_counter() - start, 2)
    return result


def write_report(result: FuzzResult, out: Path, environment: dict[str, Any], server_command: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "environment": environment,
        "server_command": server_command,
        **asdict(result),
        "server_errors": result.server_errors,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Schema fuzzing (schemathesis)",
        "",
        f"- command: `python -m load_tests.fuzz {shlex.join(environment['argv'][1:])}`",
        f"- server: `{server_command or 'not recorded'}`",
        f"- date: {environment['date']}, host: {environment['platform']}, {environment['cpu_count']} CPUs",
        f"- schemathesis {schemathesis.SCHEMATHESIS_VERSION}, hypothesis {hypothesis.__version__}, seed {result.seed}",
        f"- **{result.cases} cases in {result.duration_s} s, {result.server_errors} server errors (5xx or no answer)**",
        "",
        "| operation and mode | responses by status |",
        "|---|---|",
    ]
    for key, counts in result.statuses.items():
        lines.append(f"| {key} | {', '.join(f'{s}: {n}' for s, n in counts.items())} |")
    for failure in result.failures[:20]:
        lines += ["", f"- {failure.operation} ({failure.mode}) → {failure.outcome}: `{failure.curl}`"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--examples", type=int, default=250, help="cases per operation and generation mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default", help="model name put into valid /v1 bodies")
    parser.add_argument("--server-command", default=None, help="how the server was started, for the report")
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/fuzz"))
    args = parser.parse_args(argv)
    result = fuzz(args.url, examples=args.examples, seed=args.seed, model=args.model)
    write_report(result, args.out, environment_info(args.url), args.server_command)
    print((args.out / "results.md").read_text())
    return 1 if result.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
