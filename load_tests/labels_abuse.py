"""/classify label abuse (issue 18, item 3), in process on the real embedded MiniLM: what concurrent calls
with as many and as long labels as the server accepts cost, and what a one-text call sent meanwhile waits.

    python -m load_tests.labels_abuse --out load_tests/results/labels_abuse/results.json

Before the label limits one input with 64 distinct ~512-token labels took 9.2 s and 3.2 GB peak RSS, and
8 such calls made a one-text call wait 114.6 s (the issue's numbers). Now labels are at most 64 tokens and
the ones not cached count in the batch token budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time
from pathlib import Path

import httpx

from load_tests.loadgen.prompts import SUPPORT_WORDS
from server.app import create_app
from server.config import Settings
from server.runtime import Runtime
from server.schemas import CLS_MAX_LABEL_TOKENS, CLS_MAX_LABELS


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _labels(runtime: Runtime, rng: random.Random, tag: str) -> list[str]:
    """CLS_MAX_LABELS distinct labels of at most CLS_MAX_LABEL_TOKENS tokens, as long as allowed."""
    assert runtime.classifier is not None
    labels = []
    for i in range(CLS_MAX_LABELS):
        words = [f"{tag}{i}", *rng.choices(SUPPORT_WORDS, k=CLS_MAX_LABEL_TOKENS)]
        while runtime.classifier.count_tokens([" ".join(words)])[0] > CLS_MAX_LABEL_TOKENS:
            words.pop()
        labels.append(" ".join(words))
    return labels


async def _timed(client: httpx.AsyncClient, body: dict[str, object]) -> tuple[int, float]:
    start = time.perf_counter()
    r = await client.post("/classify", json=body)
    return r.status_code, time.perf_counter() - start


async def main(out: Path, concurrent: int) -> None:
    settings = Settings(enable_generate=False)
    runtime = await asyncio.to_thread(Runtime.load, settings)
    await runtime.start()
    rng = random.Random(0)
    results: dict[str, object] = {"settings": {"cls_max_batch_tokens": settings.cls_max_batch_tokens}}
    app = create_app(settings, runtime)
    try:
        async with app.router.lifespan_context(app):
            while getattr(app.state, "runtime", None) is None:
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x", timeout=600) as client:

                def small(k: int) -> dict[str, object]:  # a new text each time: no response-cache hit
                    return {"inputs": f"Where is my parcel? (order {k})", "labels": ["billing", "shipping"]}

                await _timed(client, small(0))  # caches the small call's labels
                results["small_alone_s"] = [round((await _timed(client, small(k)))[1], 3) for k in (1, 2, 3)]
                too_long = {"inputs": "x", "labels": [" ".join(["refund"] * 512) + f" {i}" for i in range(64)]}
                status, seconds = await _timed(client, too_long)
                results["over_limit_labels"] = {"status": status, "seconds": round(seconds, 3)}

                one = {"inputs": "I was charged twice", "labels": _labels(runtime, rng, "one")}
                rss = _rss_mb()
                status, seconds = await _timed(client, one)
                results["one_call_max_labels"] = {"status": status, "seconds": round(seconds, 3)}

                bodies = [
                    {"inputs": "I was charged twice", "labels": _labels(runtime, rng, f"c{k}")}
                    for k in range(concurrent)
                ]
                big = [asyncio.create_task(_timed(client, b)) for b in bodies]
                await asyncio.sleep(0)  # the big calls are queued first
                meanwhile = await _timed(client, small(4))
                done = await asyncio.gather(*big)
                results["concurrent_max_labels"] = {
                    "calls": concurrent,
                    "statuses": sorted({s for s, _ in done}),
                    "slowest_s": round(max(t for _, t in done), 3),
                    "small_meanwhile_s": round(meanwhile[1], 3),
                    "rss_before_mb": round(rss, 1),
                    "rss_after_mb": round(_rss_mb(), 1),
                    "peak_rss_mb": round(_peak_mb(), 1),
                }
    finally:
        await runtime.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("load_tests/results/labels_abuse/results.json"))
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.out, args.concurrent))
