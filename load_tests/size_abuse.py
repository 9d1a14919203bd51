"""Size abuse over HTTP (issue 18 items 3, 4, 5, 13): what a client's sheer size does to a running server
and to the other clients, in any process layout.

1. **labels**: ``--concurrent`` /classify calls, each with 64 new labels at the token limit, and a
   one-text call sent meanwhile; 64 labels over the limit are refused.
2. **huge prompts**: 16 concurrent 1 MB prompts (/generate, /v1/chat/completions): refused with 400
   before tokenizing; /health and a running stream must not stall meanwhile.
3. **huge words**: 400 distinct 900 KB single-word /classify inputs: refused by characters; the server's
   memory must not grow with them.
4. **big and small**: ``--big`` concurrent prompts of ~2,000 tokens with 512 new tokens each (the issue's
   overload case) while a small client sends short requests one after another: every answer is 200, a
   refusal (429/503 with Retry-After) or, for the big ones only, a 504; no small request may run into
   its deadline because of the big ones.

    python -m server --port 8000 --engine-core process --api-servers 2 &
    python -m load_tests.size_abuse --url http://127.0.0.1:8000 --pid $! --out load_tests/results/robustness/abuse

Memory is the server's whole process tree with ``--pid`` (load_tests/soak.py), else not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from load_tests.loadgen import environment_info, make_client
from load_tests.loadgen.prompts import SUPPORT_WORDS
from load_tests.soak import tree_rss


def _rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    tree = tree_rss(pid)
    return round(sum(b for _, b in tree.values()) / 2**20, 1) if tree else None


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any], **kw: Any) -> tuple[str, float, str]:
    """(status, seconds, Retry-After) of one request; a transport failure is ``error:<type>``."""
    start = time.perf_counter()
    try:
        r = await client.post(path, json=body, **kw)
        status, retry = str(r.status_code), r.headers.get("retry-after", "")
    except httpx.HTTPError as exc:
        status, retry = f"error:{type(exc).__name__}", ""
    return status, round(time.perf_counter() - start, 3), retry


async def labels(client: httpx.AsyncClient, concurrent: int, rng: random.Random) -> dict[str, Any]:
    def label_set(tag: str) -> list[str]:  # 64 distinct labels of ~45 tokens (the limit is 64)
        return [" ".join([f"{tag}{i}", *rng.choices(SUPPORT_WORDS, k=30)]) for i in range(64)]

    over = {"inputs": "x", "labels": [" ".join(["refund"] * 512) + f" {i}" for i in range(64)]}
    over_status = await _post(client, "/classify", over)
    small = {"inputs": "Where is my parcel? (labels run)", "labels": ["billing", "shipping"]}
    big = [
        asyncio.create_task(_post(client, "/classify", {"inputs": "I was charged twice", "labels": label_set(f"c{k}")}))
        for k in range(concurrent)
    ]
    await asyncio.sleep(0.05)  # the big calls are queued first
    meanwhile = await _post(client, "/classify", small)
    done = await asyncio.gather(*big)
    return {
        "over_limit_labels": over_status[:2],
        "calls": concurrent,
        "statuses": dict(Counter(s for s, _, _ in done)),
        "slowest_s": max(t for _, t, _ in done),
        "small_meanwhile": meanwhile[:2],
    }


async def huge_prompts(client: httpx.AsyncClient) -> dict[str, Any]:
    prompt = "a" * 1_000_000
    stream_gaps: list[float] = []

    async def stream() -> None:
        story = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]
        body = {"messages": story, "max_tokens": 128, "stream": True}
        async with client.stream("POST", "/generate", json=body) as r:
            last = time.perf_counter()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    now = time.perf_counter()
                    stream_gaps.append(now - last)
                    last = now

    running = asyncio.create_task(stream())
    await asyncio.sleep(0.5)
    health: list[float] = []
    bodies = [
        ("/generate", {"prompt": prompt}),
        ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": prompt}]}),
    ] * 8
    sent = [asyncio.create_task(_post(client, path, body)) for path, body in bodies]
    while not all(t.done() for t in sent):
        start = time.perf_counter()
        await client.get("/health")
        health.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)
    done = [t.result() for t in sent]
    await running
    return {
        "requests": len(done),
        "statuses": dict(Counter(s for s, _, _ in done)),
        "slowest_s": max(t for _, t, _ in done),
        "health_max_s": round(max(health), 3),
        "stream_max_gap_s": round(max(stream_gaps[1:], default=0.0), 3),
    }


async def huge_words(client: httpx.AsyncClient, pid: int | None, n: int = 400) -> dict[str, Any]:
    rss_before = _rss_mib(pid)
    statuses: Counter[str] = Counter()
    for k in range(0, n, 16):  # 16 at a time: 900 KB bodies
        batch = [
            _post(client, "/classify", {"inputs": f"{k + i:06d}" + "x" * 900_000, "labels": ["a", "b"]})
            for i in range(16)
        ]
        statuses.update(s for s, _, _ in await asyncio.gather(*batch))
    return {"inputs": n, "statuses": dict(statuses), "rss_before_mib": rss_before, "rss_after_mib": _rss_mib(pid)}


async def big_and_small(client: httpx.AsyncClient, big: int, rng: random.Random) -> dict[str, Any]:
    def long_prompt() -> str:  # about 2,000 tokens, different for each request (no prefix-cache sharing)
        return " ".join(rng.choices(SUPPORT_WORDS, k=1900))

    bigs = [
        asyncio.create_task(_post(client, "/generate", {"prompt": long_prompt(), "max_tokens": 512}))
        for _ in range(big)
    ]
    small: list[tuple[str, float, str]] = []
    while not all(t.done() for t in bigs):
        small.append(await _post(client, "/generate", {"prompt": "Where is my parcel?", "max_tokens": 16}))
        await asyncio.sleep(0.5)
    done = [t.result() for t in bigs]

    def summary(results: list[tuple[str, float, str]]) -> dict[str, Any]:
        refused = [r for r in results if r[0] in ("429", "503")]
        times = sorted(t for _, t, _ in results)
        return {
            "requests": len(results),
            "statuses": dict(Counter(s for s, _, _ in results)),
            "refusals_without_retry_after": sum(1 for r in refused if not r[2]),
            "p50_s": times[len(times) // 2] if times else None,
            "max_s": times[-1] if times else None,
            "ok_max_s": max((t for s, t, _ in results if s == "200"), default=None),
        }

    return {"big": summary(done), "small": summary(small)}


def passed(result: dict[str, Any]) -> bool:
    bs = result["big_and_small"]
    return (
        result["labels"]["over_limit_labels"][0] in ("400", "422")
        and set(result["labels"]["statuses"]) <= {"200", "429"}
        and set(result["huge_prompts"]["statuses"]) == {"400"}
        and set(result["huge_words"]["statuses"]) == {"400"}
        and set(bs["big"]["statuses"]) <= {"200", "429", "503", "504"}
        and set(bs["small"]["statuses"]) <= {"200", "429", "503"}
        and bs["big"]["refusals_without_retry_after"] == 0
        and bs["small"]["refusals_without_retry_after"] == 0
    )


async def run(url: str, pid: int | None, concurrent: int, big: int) -> dict[str, Any]:
    rng = random.Random(0)
    async with make_client(url, timeout=600, max_connections=1000) as client:
        result: dict[str, Any] = {"rss_start_mib": _rss_mib(pid)}
        result["labels"] = await labels(client, concurrent, rng)
        result["huge_prompts"] = await huge_prompts(client)
        result["huge_words"] = await huge_words(client, pid)
        result["big_and_small"] = await big_and_small(client, big, rng)
        result["rss_end_mib"] = _rss_mib(pid)
    result["passed"] = passed(result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.size_abuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, default=None, help="server pid: memory of its whole process tree")
    parser.add_argument("--concurrent", type=int, default=8, help="concurrent calls with 64 new labels each")
    parser.add_argument("--big", type=int, default=64, help="concurrent ~2,000-token prompts with 512 new tokens")
    parser.add_argument("--server-command", default=None, help="how the server was started, for the report")
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/robustness/abuse.json"))
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.pid, args.concurrent, args.big))
    doc = {"environment": environment_info(args.url), "server_command": args.server_command, "result": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
