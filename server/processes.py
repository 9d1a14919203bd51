"""A server of several processes: engine cores (one per device) and API servers sharing one port.

The supervisor (the process ``python -m server`` started) binds the port, starts the engine cores, then
the API servers, which inherit the listening socket and connect to every core over Unix sockets in the
server's run directory (engine/frames.py). It watches them all: SIGTERM drains the API servers, then stops
the cores; a core or an API server that exits on its own takes the whole server down with exit code 1 (after
the API servers have failed what was in flight with a clear error), so that the orchestrator restarts it
rather than it serving half-broken.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import uvicorn
from prometheus_client import multiprocess

from server import metrics
from server.admission import shared_counts
from server.config import Settings
from server.hardware import api_servers

log = logging.getLogger("server")

CORE_STOP_TIMEOUT_S = 10.0
FAILURE_FLUSH_S = 1.0  # after a core died: time for the API servers to answer what was in flight


def core_device(index: int, visible: str | None, per_core: int = 1) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of data-parallel core ``index``: its ``per_core`` entries (the tensor
    parallel size) of the devices this server may use (all of them when none are named)."""
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    first = index * per_core
    if devices is None:
        return ",".join(str(d) for d in range(first, first + per_core))
    if first + per_core > len(devices):
        raise ValueError(f"data-parallel core {index} has no GPU: CUDA_VISIBLE_DEVICES names {len(devices)}")
    return ",".join(devices[first : first + per_core])


def _entry(name: str, *args: object) -> None:
    """A child's start: the serving modules (torch, the engines, the app) load here, in the processes that
    run them, so the supervisor starts every process without importing them first."""
    from server import workers

    getattr(workers, name)(*args)


def listening_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """The port's socket for each of ``n`` API servers. Where the kernel balances new connections across
    sockets bound to one port (Linux's ``SO_REUSEPORT``), each API server gets a socket of its own. One
    shared socket would let whichever process wakes first accept a whole burst of connections (the event
    loop accepts until the backlog is empty), leaving one API server with most of the keep-alive clients
    while the others idle."""
    # A plain bind first: it fails while anything listens on the port, another server of ours included (a
    # socket with SO_REUSEPORT would silently join that server's group and take a share of its clients).
    probe = uvicorn.Config(app=None, host=host, port=port).bind_socket()
    if n == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [probe] * n
    port = probe.getsockname()[1]  # port 0: the one the probe got
    probe.close()
    socks: list[socket.socket] = []
    for _ in range(n):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        socks.append(sock)
    return socks


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = Path(tempfile.mkdtemp(prefix="lowlat-"))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.cores: list[BaseProcess] = []
        self.api_servers: list[BaseProcess] = []
        self.signals = 0

    def run(self) -> int:
        """Serves until SIGTERM/SIGINT (exit code 0) or a process failure (1)."""
        s = self.settings
        # Before any child starts: every process then writes its metrics where the scrape reads them.
        os.environ[metrics.MULTIPROC_ENV] = str(self.metrics_dir)
        context = multiprocessing.get_context("spawn")
        addresses = [f"{self.run_dir}/core-{i}" for i in range(s.data_parallel_size)]
        for i, address in enumerate(addresses):
            self.cores.append(context.Process(target=_entry, args=("run_core", s, i, address), name=f"engine-core-{i}"))
        socks = listening_sockets(s.host, s.port, api_servers(s))
        counts = shared_counts(context)
        for i, sock in enumerate(socks):
            link = (i, addresses, f"{self.run_dir}/api-{i}")  # a CoreLink, made in the API server
            self.api_servers.append(
                context.Process(target=_entry, args=("run_api_server", s, link, sock, counts), name=f"api-server-{i}")
            )
        for process in [*self.cores, *self.api_servers]:
            process.start()
        for sock in set(socks):
            sock.close()  # the API servers hold them now
        log.info("%d engine core(s), %d API server(s) on %s:%d", len(self.cores), len(self.api_servers), s.host, s.port)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            return self._watch()
        finally:
            self._stop_all()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _on_signal(self, sig: int, _frame: FrameType | None) -> None:
        # The first signal drains the API servers; a second one makes them skip the drain.
        self.signals += 1
        for process in self.api_servers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def _watch(self) -> int:
        sentinels = {p.sentinel: p for p in [*self.cores, *self.api_servers]}
        while True:
            ready = wait(list(sentinels), timeout=1.0)
            for sentinel in ready:
                process = sentinels.pop(sentinel)  # type: ignore[call-overload]
                process.join()
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))
                if self.signals == 0 or process in self.cores:
                    log.error("%s exited (code %s): stopping the server", process.name, process.exitcode)
                    if process in self.cores:
                        time.sleep(FAILURE_FLUSH_S)
                    return 1
            if self.signals and not any(p.is_alive() for p in self.api_servers):
                log.info("API servers stopped; stopping the engine cores")
                return 0

    def _stop_all(self) -> None:
        for process in [*self.api_servers, *self.cores]:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + max(self.settings.shutdown_grace_s, CORE_STOP_TIMEOUT_S)
        for process in [*self.api_servers, *self.cores]:
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
