"""Soak: mixed load for a long time; does memory stay flat and does anything leak?

Workers loop over a mix of requests: whole and streamed /generate, /classify, streams the client
abandons after the first token, and requests that run past a short ``X-Request-Timeout`` (504). The
server's resident memory and, on a CUDA machine, its GPU memory (nvidia-smi) are sampled throughout:
with ``--pid`` (the process ``python -m server`` started) the resident memory of that process and every
process under it (supervisor, engine cores, API servers: Linux /proc), else the answering process's
``process_resident_memory_bytes`` from /metrics. Growth = median of the last tenth of the samples after
warm-up over the median of the first tenth; it must stay under ``--max-growth`` (5 %). Afterwards no
request may be left in flight.

    python -m server --port 8000 &
    python -m load_tests.soak --url http://127.0.0.1:8000 --duration 1800 --warmup 120 \\
        --pid $! --out load_tests/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from load_tests.flood import leftover_gauges
from load_tests.loadgen import environment_info, make_client, make_scenario, send_request

KINDS = ("generate", "generate-stream", "classify", "abandoned-stream", "timeout")

EXPECTED_OUTCOMES = {
    "generate": {"200"},
    "generate-stream": {"200"},
    "classify": {"200"},
    "abandoned-stream": {"abandoned"},
    # 200 when the answer came before the deadline; 503 when the engine saw, while it waited behind other
    # work, that it could not finish in time (engine/deadlines.py)
    "timeout": {"504", "200", "503"},
}


@dataclass
class Sample:
    t: float  # seconds since the start
    rss_bytes: float | None  # the whole server's (every process with --pid)
    gpu_bytes: float | None
    rss_by_process: dict[str, float] | None = None  # name (pid) -> bytes, with --pid


@dataclass
class SoakResult:
    duration_s: float
    warmup_s: float
    concurrency: int
    requests: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> status -> count
    samples: list[Sample] = field(default_factory=list)
    rss_growth: float | None = None
    gpu_growth: float | None = None
    leftover_gauges: dict[str, float] = field(default_factory=dict)

    def passed(self, max_growth: float) -> bool:
        growths = [g for g in (self.rss_growth, self.gpu_growth) if g is not None]
        unexpected = {
            kind: {s: n for s, n in statuses.items() if s not in EXPECTED_OUTCOMES[kind]}
            for kind, statuses in self.requests.items()
        }
        return (
            bool(growths)
            and all(g < max_growth for g in growths)
            and not self.leftover_gauges
            and not any(unexpected.values())
        )


def growth(samples: list[Sample], warmup_s: float, key: str) -> float | None:
    values = [getattr(s, key) for s in samples if s.t >= warmup_s and getattr(s, key) is not None]
    if len(values) < 10:
        return None
    tenth = max(len(values) // 10, 1)
    first, last = sorted(values[:tenth]), sorted(values[-tenth:])
    return last[len(last) // 2] / first[len(first) // 2] - 1.0


def tree_rss(pid: int) -> dict[int, tuple[str, float]]:
    """Resident memory of ``pid`` and every process under it: pid -> (name, bytes) (Linux /proc; empty
    when ``pid`` is gone)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: dict[int, tuple[str, float]] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        name = re.search(r"^Name:\s*(.*)$", status, re.MULTILINE)
        rss_kb = re.search(r"^VmRSS:\s*(\d+) kB$", status, re.MULTILINE)
        if rss_kb:  # kernel threads and zombies have none
            found[p] = (name.group(1) if name else "?", float(rss_kb.group(1)) * 1024)
        todo.extend(children.get(p, []))
    return found


def gpu_memory(pids: set[int]) -> float | None:
    """GPU memory the server's processes hold (nvidia-smi), or None without a GPU or pids."""
    if not pids or shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = [line.split(",")[:2] for line in out.splitlines() if "," in line]
    mine = [float(mib) * 2**20 for p, mib in rows if p.strip().isdigit() and int(p) in pids]
    return sum(mine) if mine else None


async def rss(client: httpx.AsyncClient) -> float | None:
    text = (await client.get("/metrics")).text
    match = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def soak(
    client: httpx.AsyncClient,
    *,
    duration: float,
    warmup: float,
    concurrency: int = 8,
    max_tokens: int = 32,
    sample_every: float = 2.0,
    pid: int | None = None,
    seed: int = 0,
) -> SoakResult:
    result = SoakResult(duration_s=duration, warmup_s=warmup, concurrency=concurrency)
    scenarios = {
        "generate": make_scenario("generate", max_tokens=max_tokens),
        "generate-stream": make_scenario("generate-stream", max_tokens=max_tokens),
        "classify": make_scenario("classify", batch_size=4),
    }
    counts: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    rng = random.Random(seed)
    start = time.perf_counter()
    end = start + duration

    async def one(kind: str) -> str:
        if kind in scenarios:
            scenario = scenarios[kind]
            rec = await send_request(client, scenario, scenario.path, scenario.make_body(rng), timeout=300)
            return str(rec.status)
        body = scenarios["generate-stream"].make_body(rng)
        if kind == "timeout":
            r = await client.post("/generate", json={**body, "stream": False}, headers={"X-Request-Timeout": "0.05"})
            return str(r.status_code)
        async with client.stream("POST", "/generate", json=body) as r:  # abandoned after the first event
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return "abandoned"
            return f"{r.status_code}-no-event"

    async def worker() -> None:
        while time.perf_counter() < end:
            kind = rng.choices(KINDS, weights=(3, 3, 3, 1, 1))[0]
            try:
                status = await one(kind)
            except httpx.HTTPError as exc:
                status = f"error:{type(exc).__name__}"
            counts[kind][status] += 1

    async def sampler() -> None:
        while time.perf_counter() < end:
            tree = tree_rss(pid) if pid is not None else {}
            total = sum(b for _, b in tree.values()) if tree else await rss(client)
            by_process = {f"{name} ({p})": b for p, (name, b) in tree.items()} or None
            t = round(time.perf_counter() - start, 2)
            result.samples.append(Sample(t, total, gpu_memory(set(tree)), by_process))
            await asyncio.sleep(sample_every)

    await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    result.requests = {kind: dict(sorted(c.items())) for kind, c in counts.items()}
    result.rss_growth = growth(result.samples, warmup, "rss_bytes")
    result.gpu_growth = growth(result.samples, warmup, "gpu_bytes")
    result.leftover_gauges = await leftover_gauges(client)
    return result


def _outcomes(statuses: dict[str, int]) -> str:
    return ", ".join(f"{s}: {n}" for s, n in statuses.items()) or "–"


def _pct(x: float | None) -> str:
    return "not measured" if x is None else f"{100 * x:+.2f} %"


def _per_process(samples: list[dict[str, Any]], warmup_s: float) -> list[str]:
    """A line per server process: its resident memory at the first sample after warm-up and at the last."""
    tree = [s["rss_by_process"] for s in samples if s["t"] >= warmup_s and s.get("rss_by_process")]
    if not tree:
        return []
    first, last = tree[0], tree[-1]
    summed = sum(s for s in tree[-1].values())
    lines = [f"- summed over {len(last)} server processes (last sample {summed / 2**20:.0f} MiB), of which:"]
    for name in sorted(set(first) | set(last)):
        a, b = first.get(name), last.get(name)
        shown = [f"{v / 2**20:.0f} MiB" if v is not None else "absent" for v in (a, b)]
        lines.append(f"  - `{name}`: {shown[0]} after warm-up, {shown[1]} at the end")
    return lines


def write_report(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    env, res = doc["environment"], doc["result"]
    rss_values = [s["rss_bytes"] for s in res["samples"] if s["rss_bytes"] is not None]
    lines = [
        "# Soak: mixed load, memory over time",
        "",
        f"- command: `python -m load_tests.soak {shlex.join(env['argv'][1:])}`",
        f"- server: `{doc['server_command'] or 'not recorded'}`",
        f"- date: {env['date']}, host: {env['platform']}, {env['cpu_count']} CPUs",
        f"- {res['duration_s']:g} s of load, the first {res['warmup_s']:g} s warm-up; "
        f"{res['concurrency']} workers; {len(res['samples'])} memory samples",
        "",
        "| request kind | outcomes |",
        "|---|---|",
        *(
            f"| {kind} | {', '.join(f'{s}: {n}' for s, n in st.items()) or '–'} |"
            for kind, st in res["requests"].items()
        ),
        "",
        f"- resident memory: {min(rss_values) / 2**20:.0f}–{max(rss_values) / 2**20:.0f} MiB; "
        f"growth after warm-up {_pct(res['rss_growth'])}"
        if rss_values
        else "- resident memory: not measured",
        *_per_process(res["samples"], res["warmup_s"]),
        f"- GPU memory growth after warm-up: {_pct(res['gpu_growth'])}",
        f"- in-flight gauges left non-zero afterwards: {res['leftover_gauges'] or 'none'}",
        f"- **{'PASS' if doc['passed'] else 'FAIL'}** (growth under {100 * doc['max_growth']:.0f} %, "
        "only expected outcomes, nothing left in flight)",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before memory is compared")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument(
        "--pid", type=int, default=None, help="server pid: memory of it and every process under it (RSS, GPU)"
    )
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--server-command", default=None, help="how the server was started, for the report")
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/soak"))
    args = parser.parse_args(argv)

    async def run() -> SoakResult:
        async with make_client(args.url, timeout=300) as client:
            return await soak(
                client,
                duration=args.duration,
                warmup=args.warmup,
                concurrency=args.concurrency,
                max_tokens=args.max_tokens,
                sample_every=args.sample_every,
                pid=args.pid,
            )

    result = asyncio.run(run())
    doc = {
        "environment": environment_info(args.url),
        "server_command": args.server_command,
        "max_growth": args.max_growth,
        "passed": result.passed(args.max_growth),
        "result": asdict(result),
    }
    write_report(doc, args.out)
    print((args.out / "results.md").read_text())
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
