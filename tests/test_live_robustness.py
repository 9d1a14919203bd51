"""Against real ``python -m server`` processes: schema fuzzing at scale, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from load_tests.fuzz import fuzz
from tests.conftest import LAYOUTS, eventually, server_process

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def fuzz_server(cache_dir: Path) -> Iterator[str]:
    """Small generation limits keep valid fuzz cases cheap (a valid request makes at most 2 tokens per sequence)."""
    with server_process(cache_dir, max_new_tokens=2, default_max_tokens=2, max_input_tokens=128, cls_max_inputs=8) as (
        _,
        url,
    ):
        yield url


def test_schema_fuzz_no_server_errors(fuzz_server: str) -> None:
    result = fuzz(fuzz_server, examples=100, seed=0)  # per operation and mode: 10 of them take a body
    assert result.cases >= 1000
    assert result.failures == [], [f"{f.operation} {f.mode} -> {f.outcome}: {f.curl}" for f in result.failures[:5]]
    body_operations = [key for key, statuses in result.statuses.items() if key.startswith("POST")]
    assert len(body_operations) >= 10  # /generate, /classify and the /v1 routes, valid and schema-violating
    for key in body_operations:
        assert sum(result.statuses[key].values()) >= 100, (key, result.statuses[key])
    reached = [key for key in body_operations if result.statuses[key].get("200", 0) > 0]
    # The engines were reached, not only the validators.
    assert {"POST /generate positive", "POST /classify positive", "POST /v1/chat/completions positive"} <= set(reached)


def stream_in_thread(url: str, body: dict, events: list[dict], first: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        first.set()
        except httpx.HTTPError as exc:
            events.append({"transport_error": type(exc).__name__})
        finally:
            first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 96, "stream": True}  # greedy: runs to max_tokens


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigterm_drains_in_flight_stream_then_exits(cache_dir: Path, layout: str) -> None:
    args = (*LAYOUTS[layout], "--no-enable-classify")
    with server_process(cache_dir, *args, max_new_tokens=128, shutdown_grace_s=120) as (proc, url):
        events: list[dict] = []
        first = threading.Event()
        thread = stream_in_thread(url, LONG_STREAM, events, first)
        assert first.wait(60) and "text" in events[0]
        proc.send_signal(signal.SIGTERM)
        # Still listening while the stream runs: the probe and new work see 503 with Retry-After.
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert ready.headers["Retry-After"]
        # The gauge follows on the server's next tick (0.1 s).
        eventually(lambda: "\nllm_ready 0.0\n" in httpx.get(f"{url}/metrics", timeout=10).text, 2.5, "llm_ready 0")
        refused = httpx.post(f"{url}/generate", json={"prompt": "hi"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        assert refused.headers["Retry-After"]
        thread.join(120)
        assert events[-1].get("finish_reason") == "length", events[-3:]  # the in-flight stream completed
        assert events[-1]["usage"]["completion_tokens"] == 96
        assert proc.wait(30) in (0, -signal.SIGTERM)  # then the process exited by itself


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigterm_grace_period_bounds_the_wait(cache_dir: Path, layout: str) -> None:
    args = (*LAYOUTS[layout], "--no-enable-classify")
    with server_process(cache_dir, *args, max_new_tokens=128, shutdown_grace_s=1) as (proc, url):
        events: list[dict] = []
        first = threading.Event()
        thread = stream_in_thread(url, LONG_STREAM, events, first)
        assert first.wait(60)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # exits although the stream could not finish
        thread.join(30)
        assert not thread.is_alive()  # the client was not left hanging
        assert events[-1].get("finish_reason") is None  # the stream was cut, not completed
        assert time.monotonic() - signalled < 30
