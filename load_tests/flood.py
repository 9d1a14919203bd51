"""Flood benchmark: is overload handled by quick refusals rather than hangs, 500s or lost requests?

1. **capacity**: a closed loop at ``--capacity-concurrency`` measures the sustainable rate (successful
   requests/s).
2. **flood**: an open loop (Poisson arrivals, no client-side cap) at ``--factor`` times that rate for
   ``--duration`` seconds. Every request must come back either accepted and complete (200 with a
   finish reason) or refused (429/503 with Retry-After); a 5xx, a timeout, a dropped connection or an
   incomplete stream counts as a failure.
3. **after**: the server's ``/metrics`` must show nothing left in flight (no hanging connection, no
   sequence left in the batch, no KV block held).

Start the server first (see the top-level README), e.g. with the embedded models on CPU:

    python -m server --port 8000 --max-num-seqs 8 --max-queued-requests 8 &
    python -m load_tests.flood --url http://127.0.0.1:8000 --scenario generate-stream --max-tokens 32 \\
        --duration 60 --out load_tests/results/flood
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from load_tests.loadgen import Scenario, environment_info, make_client, make_scenario, percentile, run_level

REFUSALS = ("429", "503")
IDLE_GAUGES = ("http_requests_in_flight", "llm_running_sequences", "llm_queued_requests", "llm_kv_cache_usage_ratio")


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    return {
        q: (None if (v := percentile(values, p)) is None else round(v * 1000.0, 2))
        for q, p in (("p50", 50), ("p99", 99), ("max", 100))
    }


@dataclass
class FloodResult:
    rate: float  # offered arrivals per second
    sent: int
    duration_s: float
    statuses: dict[str, int]  # HTTP status, or error:<Exception> when no complete answer came back
    accepted_latency_ms: dict[str, float | None]
    refused_latency_ms: dict[str, float | None]
    refusals_without_retry_after: int
    leftover_gauges: dict[str, float] = field(default_factory=dict)  # non-zero ones after the flood

    @property
    def accepted(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def refused(self) -> int:
        return sum(self.statuses.get(code, 0) for code in REFUSALS)

    @property
    def failures(self) -> int:
        """5xx, timeouts, dropped connections, incomplete streams: anything but an answer or a refusal."""
        return self.sent - self.accepted - self.refused - self.statuses_4xx_other

    @property
    def statuses_4xx_other(self) -> int:
        return sum(n for s, n in self.statuses.items() if s.startswith("4") and s not in REFUSALS)

    @property
    def passed(self) -> bool:
        return self.failures == 0 and not self.leftover_gauges and self.refusals_without_retry_after == 0


async def leftover_gauges(client: httpx.AsyncClient, settle_s: float = 5.0) -> dict[str, float]:
    """Gauges of work in flight that are still non-zero after up to ``settle_s`` seconds (the last
    aborts and the /metrics request itself are allowed to settle)."""
    busy: dict[str, float] = {}
    for _ in range(int(settle_s / 0.1)):
        text = (await client.get("/metrics")).text
        busy = {}
        for line in text.splitlines():
            match = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
            if match and match.group(1) in IDLE_GAUGES and float(match.group(3)) != 0:
                name = match.group(1) + (match.group(2) or "")
                if name != 'http_requests_in_flight{endpoint="/metrics"}':
                    busy[name] = float(match.group(3))
        if not busy:
            break
        await asyncio.sleep(0.1)
    return busy


async def flood(
    client: httpx.AsyncClient,
    scenario: Scenario,
    *,
    rate: float,
    requests: int,
    duration: float = 3600.0,
    timeout: float = 120.0,
    seed: int = 0,
) -> FloodResult:
    """Offers ``requests`` Poisson arrivals at ``rate``/s (at most ``duration`` s of arrivals) and classifies
    every answer; ``client`` must not queue requests itself (see ``loadgen.make_client``)."""
    level = await run_level(
        client,
        scenario,
        rate=rate,
        requests=requests,
        duration=duration,
        seed=seed,
        timeout=timeout,
        max_in_flight=requests,
    )
    records = level.records
    statuses = Counter(str(r.status) for r in records)
    refused = [r for r in records if str(r.status) in REFUSALS]
    return FloodResult(
        rate=rate,
        sent=len(records),
        duration_s=round(level.summary.duration_s, 2),
        statuses=dict(sorted(statuses.items())),
        accepted_latency_ms=_ms([r.latency for r in records if r.ok]),
        refused_latency_ms=_ms([r.latency for r in refused]),
        refusals_without_retry_after=sum(1 for r in refused if not r.retry_after),
        leftover_gauges=await leftover_gauges(client),
    )


def write_report(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    env, cap, fl = doc["environment"], doc["capacity"], doc["flood"]
    lines = [
        "# Flood: 3x the sustainable rate",
        "",
        f"- command: `python -m load_tests.flood {shlex.join(env['argv'][1:])}`",
        f"- server: `{doc['server_command'] or 'not recorded'}` ({doc['server']['status']})",
        f"- date: {env['date']}, host: {env['platform']}, {env['cpu_count']} CPUs (no GPU)",
        f"- scenario: {doc['scenario']}",
        "",
        "| phase | offered | sent | accepted (200) | refused (429/503) | failures (5xx, timeouts, drops) "
        "| accepted p50 / p99 ms | refused p50 / p99 / max ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| capacity (closed loop, c={cap['concurrency']}) | – | {cap['requests']} | {cap['ok']} | – | "
        f"{cap['requests'] - cap['ok']} | {cap['latency_ms']['p50']} / {cap['latency_ms']['p99']} | – |",
        f"| flood at {fl['rate']:.2f}/s ({doc['factor']}x {cap['throughput_rps']:.2f}/s) | {fl['rate']:.2f}/s | "
        f"{fl['sent']} | {fl['accepted']} | {fl['refused']} | {fl['failures']} | "
        f"{fl['accepted_latency_ms']['p50']} / {fl['accepted_latency_ms']['p99']} | "
        f"{fl['refused_latency_ms']['p50']} / {fl['refused_latency_ms']['p99']} / {fl['refused_latency_ms']['max']} |",
        "",
        f"- statuses: {fl['statuses']}",
        f"- refusals without Retry-After: {fl['refusals_without_retry_after']}",
        f"- in-flight gauges left non-zero after the flood: {fl['leftover_gauges'] or 'none'}",
        f"- **{'PASS' if fl['passed'] else 'FAIL'}**: every request answered (accepted and complete, or refused "
        "quickly), zero 5xx, nothing left hanging",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    scenario = make_scenario(args.scenario, max_tokens=args.max_tokens, labels=args.labels)
    async with make_client(args.url, timeout=args.timeout, max_connections=10_000) as client:
        capacity = await run_level(
            client,
            scenario,
            concurrency=args.capacity_concurrency,
            requests=args.capacity_requests,
            duration=args.duration,
            timeout=args.timeout,
        )
        rate = args.factor * capacity.summary.throughput_rps
        result = await flood(
            client,
            scenario,
            rate=rate,
            requests=int(rate * args.duration) + 1,
            duration=args.duration,
            timeout=args.timeout,
        )
        server = (await client.get("/ready")).json()
    flood_doc = {
        **asdict(result),
        "accepted": result.accepted,
        "refused": result.refused,
        "failures": result.failures,
        "passed": result.passed,
    }
    return {
        "environment": environment_info(args.url),
        "server": server,
        "server_command": args.server_command,
        "scenario": f"{scenario.name} (max_tokens={args.max_tokens})",
        "factor": args.factor,
        "capacity": capacity.summary.to_dict(),
        "flood": flood_doc,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.flood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--scenario", default="generate-stream")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--labels", default=None, help="comma-separated labels (classify scenario)")
    parser.add_argument("--capacity-concurrency", type=int, default=8)
    parser.add_argument("--capacity-requests", type=int, default=48)
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of flood arrivals")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request; a timeout is a failure")
    parser.add_argument("--server-command", default=None, help="how the server was started, for the report")
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/flood"))
    args = parser.parse_args(argv)
    if args.labels:
        args.labels = args.labels.split(",")
    doc = asyncio.run(_main(args))
    write_report(doc, args.out)
    print((args.out / "results.md").read_text())
    return 0 if doc["flood"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
