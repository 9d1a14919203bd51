"""What the engine-core and API-server processes run (server/processes.py starts them): imported in those
processes only, with the engines, torch and the app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
from pathlib import Path

import torch
import uvicorn

from engine.core import EngineCore
from engine.core_client import CoreLink
from server import metrics
from server.admission import SharedCounts
from server.app import create_app
from server.config import Settings
from server.draining import DrainingServer
from server.logs import configure_logging
from server.processes import core_device
from server.runtime import Engines, freeze_heap


def _name_process(name: str) -> None:
    """The name ``ps`` and ``top`` show (Linux; elsewhere the name stays Python's)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


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
    built.warm_up()
    batcher = built.batcher(core=True) if built.classifier is not None else None
    metrics.READY.set(1)
    metrics.publish_gpu_metrics()
    freeze_heap()
    core = EngineCore(
        index, address, built.engine, batcher, pickle.dumps(built.details()), on_error=lambda _: metrics.READY.set(0)
    )
    asyncio.run(core.serve())


def run_api_server(
    settings: Settings, link_args: tuple[int, list[str], str], sock: socket.socket, counts: SharedCounts
) -> None:
    """An API-server process: HTTP on the shared socket, the engines through the cores."""
    os.setpgrp()
    link = CoreLink(*link_args)
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
