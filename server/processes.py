"""A server of several processes: engine cores (one per device) and API servers sharing one port.

The supervisor (the process ``python -m server`` started) binds the port, starts the engine cores, then
the API servers, which inherit the listening socket and connect to every core over ZeroMQ. It watches
them all: SIGTERM drains the API servers, then stops the cores; a core or an API server that exits on
its own takes the whole server down with exit code 1 (after the API servers have failed what was in
flight with a clear error), so that the orchestrator restarts it rather than it serving half-broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import torch
import uvicorn
from prometheus_client import multiprocess

from engine.classifier import ClassifyItem
from engine.core import EngineCore
from engine.core_client import CoreLink
from engine.protocol import AddRequest
from engine.sequence import SamplingParams
from server import metrics
from server.admission import SharedCounts, shared_counts
from server.app import create_app
from server.config import Settings
from server.draining import DrainingServer
from server.hardware import api_servers
from server.logs import configure_logging
from server.runtime import Engines, freeze_heap

log = logging.getLogger("server")

CORE_STOP_TIMEOUT_S = 10.0
FAILURE_FLUSH_S = 1.0  # after a core died: time for the API servers to answer what was in flight


def _name_process(name: str) -> None:
    """The name ``ps`` and ``top`` show (Linux; elsewhere the name stays Python's)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


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


def run_core(settings: Settings, index: int, address: str) -> None:
    """An engine-core process: builds and warms up the engines of one device, then serves them."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which stops processes in order
    _name_process(f"engine-core-{index}")
    configure_logging(settings.log_level)
    if settings.data_parallel_size > 1:
        # Before CUDA starts in this process: the core's one GPU becomes its cuda:0 for every thread
        # (torch.cuda.set_device holds for the calling thread only; the engine runs on others).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = core_device(index, visible, settings.tensor_parallel_size)
    built = Engines.build(settings)
    if built.engine is not None:
        start = time.perf_counter()
        built.engine.add(AddRequest(0, [0, 1, 2], SamplingParams(max_tokens=2), "warmup"))
        while built.engine.has_work():
            built.engine.step()
        metrics.WARMUP_SECONDS.labels(model="generate").set(time.perf_counter() - start)
    batcher = None
    if built.classifier is not None:
        start = time.perf_counter()
        built.classifier.run([ClassifyItem("warm up", ("a", "b"), False, 4)])
        metrics.WARMUP_SECONDS.labels(model="classify").set(time.perf_counter() - start)
        batcher = built.batcher()
    metrics.READY.set(1)
    metrics.publish_gpu_metrics()
    freeze_heap()
    core = EngineCore(
        index, address, built.engine, batcher, pickle.dumps(built.details()), on_error=lambda _: metrics.READY.set(0)
    )
    asyncio.run(core.serve())


def run_api_server(settings: Settings, link: CoreLink, sock: socket.socket, counts: SharedCounts) -> None:
    """An API-server process: HTTP on the shared socket, the engines through the cores."""
    os.setpgrp()
    _name_process(f"api-server-{link.api_index}")
    # One request's few strings at a time: a thread pool per tokenizer call costs more than it saves, and
    # many API servers' pools spinning at once would take the host's cores. No tensor work runs here.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)
    configure_logging(settings.log_level)
    app = create_app(settings, cores=link, shared_counts=counts)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    server = DrainingServer(config, app.state.admission, settings.shutdown_grace_s, settings.header_read_timeout_s)
    server.run(sockets=[sock])


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
        addresses = [f"ipc://{self.run_dir}/core-{i}" for i in range(s.data_parallel_size)]
        for i, address in enumerate(addresses):
            self.cores.append(context.Process(target=run_core, args=(s, i, address), name=f"engine-core-{i}"))
        socks = listening_sockets(s.host, s.port, api_servers(s))
        counts = shared_counts(context)
        for i, sock in enumerate(socks):
            link = CoreLink(i, addresses, f"ipc://{self.run_dir}/api-{i}")
            self.api_servers.append(
                context.Process(target=run_api_server, args=(s, link, sock, counts), name=f"api-server-{i}")
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
