"""Shutdown against real server processes, in both layouts (issue 18 items 11 and 12): a stream still
running when the shutdown grace ends gets a final ``event: error`` (as at a deadline) rather than a cut
connection, and a second SIGTERM skips the drain (the process exits within seconds, not the grace)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LAYOUTS, eventually, server_process

pytestmark = pytest.mark.live

# Greedy: runs to max_tokens, far longer than these tests wait.
ENDLESS = {"prompt": "Once upon a time", "max_tokens": 500, "stream": True}


class Stream:
    """A streamed /generate read on a thread: its SSE lines, and when its first token arrived."""

    def __init__(self, url: str) -> None:
        self.lines: list[str] = []
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/generate", json=ENDLESS, timeout=180) as r:
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first.set()
        except httpx.HTTPError as exc:
            self.lines.append(f"transport error: {type(exc).__name__}")
        finally:
            self.first.set()

    def assert_ended_with_shutdown_error(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.lines[-2] == "event: error", self.lines[-3:]
        assert json.loads(self.lines[-1][len("data: ") :])["error"]["type"] == "shutting_down"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_stream_open_at_the_grace_end_gets_an_error_event(cache_dir: Path, layout: str) -> None:
    args = (*LAYOUTS[layout], "--no-enable-classify")
    with server_process(cache_dir, *args, max_new_tokens=512, shutdown_grace_s=1) as (proc, url):
        stream = Stream(url)
        assert stream.first.wait(60) and stream.lines[0].startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        stream.assert_ended_with_shutdown_error()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_second_sigterm_skips_the_drain(cache_dir: Path, layout: str) -> None:
    args = (*LAYOUTS[layout], "--no-enable-classify")
    with server_process(cache_dir, *args, max_new_tokens=512, shutdown_grace_s=120) as (proc, url):
        stream = Stream(url)
        assert stream.first.wait(60)
        proc.send_signal(signal.SIGTERM)
        eventually(lambda: httpx.get(f"{url}/ready", timeout=10).status_code == 503, 5, "draining")
        second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert time.monotonic() - second < 10  # not the 120 s grace (it used to wait out the whole drain)
        stream.assert_ended_with_shutdown_error()
