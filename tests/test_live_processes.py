"""A server of several processes (engine core + API servers): what must hold across them. Every other
live test also runs against this layout (``live_server`` in conftest.py)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import LAYOUTS, server_process
from tests.test_live_robustness import LONG_STREAM, stream_in_thread

pytestmark = pytest.mark.live

PROCESSES = LAYOUTS["core+2api"]


def children(pid: int) -> dict[str, int]:
    """The server's child processes by name (engine-core-N, api-server-N)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = (stat.parent / "comm").read_text().strip()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[name] = int(stat.parent.name)
    return found


def counter(url: str, name: str, labels: str) -> float:
    """One scrape's value of a series (fresh connection: any API server may answer)."""
    text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=10).text
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_processes_are_named(cache_dir: Path) -> None:
    with server_process(cache_dir, *PROCESSES, "--no-enable-classify") as (proc, _):
        assert {"engine-core-0", "api-server-0", "api-server-1"} <= set(children(proc.pid))


def test_metrics_count_every_api_server(live_server: str) -> None:
    series = ("http_requests_total", 'endpoint="/classify",status="200"')
    before = counter(live_server, *series)
    for _ in range(8):  # a new connection each: the kernel spreads them over both API servers
        r = httpx.post(
            f"{live_server}/classify", json={"inputs": "hello", "labels": ["a", "b"]}, headers={"Connection": "close"}
        )
        assert r.status_code == 200
    scrapes = {counter(live_server, *series) - before for _ in range(6)}
    assert scrapes == {8.0}  # every scrape, whichever process answers it, sees all eight
    text = httpx.get(f"{live_server}/metrics", timeout=10).text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):  # the dashboard's panels
        values = re.findall(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert len(values) == 1 and float(values[0]) > 0, name


def test_admission_is_global_across_api_servers(cache_dir: Path) -> None:
    """Two API servers, room for 2 sequences in all: of 12 long requests sent at once, 2 run and the
    rest get 429 (with one count per API server, each would have let 2 in)."""
    with server_process(cache_dir, *PROCESSES, "--no-enable-classify", max_num_seqs=2, max_queued_requests=0) as (
        _,
        url,
    ):
        body = {"prompt": "Once upon a time", "max_tokens": 48}

        def send() -> int:
            return httpx.post(f"{url}/generate", json=body, headers={"Connection": "close"}, timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda _: send(), range(12)))
        assert statuses.count(200) <= 2 and statuses.count(200) + statuses.count(429) == 12, statuses
        assert statuses.count(429) >= 10


def test_engine_core_death_fails_work_and_stops_the_server(cache_dir: Path) -> None:
    with server_process(cache_dir, *PROCESSES, "--no-enable-classify", max_new_tokens=128) as (proc, url):
        events: list[dict] = []
        first = threading.Event()
        thread = stream_in_thread(url, LONG_STREAM, events, first)
        assert first.wait(60) and "text" in events[0]
        core = children(proc.pid)["engine-core-0"]
        os.kill(core, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        assert "error" in events[-1] and "engine core 0 stopped" in events[-1]["error"]["message"], events[-2:]
        assert proc.wait(60) == 1  # the whole server exits, for the orchestrator to restart it
        assert proc.stderr is not None and "engine-core-0 exited" in proc.stderr.read()


def test_hung_engine_core_is_killed_and_the_server_exits(cache_dir: Path) -> None:
    """A core that stops answering (here: stopped by SIGSTOP) with a request in flight."""
    with server_process(cache_dir, *PROCESSES, "--no-enable-classify", engine_hang_timeout_s=2) as (proc, url):
        os.kill(children(proc.pid)["engine-core-0"], signal.SIGSTOP)
        r = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 500 and "engine core 0 stopped" in r.json()["error"]["message"]
        assert proc.wait(60) == 1
        assert proc.stderr is not None and "killing it" in proc.stderr.read()


def test_the_supervisor_starts_its_processes_without_torch() -> None:
    """``python -m server``'s own imports (settings, the process layout, the supervisor) leave torch and the app
    to the processes that use them, so a start does not wait for them twice (results/ready_time)."""
    probe = (
        "import sys, server.__main__, server.processes; from server.config import Settings; "
        "from server.hardware import api_servers, engines_in_process; "
        "api_servers(Settings()); engines_in_process(Settings(engine_core='process')); "
        "engines_in_process(Settings(api_servers=2)); "
        "print(sorted(m for m in ('torch', 'transformers', 'server.app', 'server.workers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
