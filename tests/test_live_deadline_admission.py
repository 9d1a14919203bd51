"""Deadline-aware admission (issue 18 item 13) against real servers in both process layouts: a request
that waits behind running work and cannot finish before its deadline is refused with 503 and Retry-After
(a stream with an ``overloaded`` error event) instead of running into a 504; the engine core decides, the
API server that took the request answers."""

from __future__ import annotations

import json
import re

import httpx
import pytest

pytestmark = pytest.mark.live

SHORTEST_S = 0.5  # far less than 63 decode steps take on a CPU


async def test_a_request_that_cannot_finish_behind_running_work_is_refused(live_server: str) -> None:
    async with httpx.AsyncClient(base_url=live_server, timeout=60) as c:
        before = shed_count((await c.get("/metrics")).text)
        busy = {"model": "default", "prompt": "Once upon a time", "n": 4, "temperature": 1.0, "max_tokens": 64}
        async with c.stream("POST", "/v1/completions", json={**busy, "stream": True}) as running:
            lines, events = running.aiter_lines(), 0  # not closed while it runs (that would abort it)
            while events < 24:  # 4 choices, 6 steps: the engine has measured its decode step time
                events += (await anext(lines)).startswith("data: ")
            # The engine sees a new request at its next step: the deadline leaves it a few steps for that (a
            # slow CPU's step can take most of half a second), still far fewer than the 63 the request needs.
            timeout = max(SHORTEST_S, 4 * decode_step_s((await c.get("/metrics")).text))
            short = {"X-Request-Timeout": f"{timeout:.3f}"}
            whole = await c.post("/generate", json={"prompt": "Tell me a story.", "max_tokens": 64}, headers=short)
            stream = await c.post(
                "/generate", json={"prompt": "Tell me a story.", "max_tokens": 64, "stream": True}, headers=short
            )
        assert whole.status_code == 503, whole.text
        assert whole.headers["Retry-After"] == "5"
        error = whole.json()["error"]
        assert error["type"] == "overloaded" and "deadline" in error["message"]
        assert stream.status_code == 200 and "event: error" in stream.text
        assert json.loads(stream.text.rsplit("data: ", 1)[1])["error"]["type"] == "overloaded"
        assert shed_count((await c.get("/metrics")).text) - before >= 2


def shed_count(metrics: str) -> float:
    match = re.search(r"^llm_shed_requests_total (\S+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def decode_step_s(metrics: str) -> float:
    """The engine's mean decode step so far, from its step-time histogram."""
    total = re.search(r'^llm_engine_step_seconds_sum\{phase="decode"\} (\S+)$', metrics, re.MULTILINE)
    count = re.search(r'^llm_engine_step_seconds_count\{phase="decode"\} (\S+)$', metrics, re.MULTILINE)
    assert total and count and float(count.group(1)) > 0, "no decode step measured yet"
    return float(total.group(1)) / float(count.group(1))
