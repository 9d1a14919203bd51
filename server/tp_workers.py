"""Tensor-parallel worker processes: one per GPU after the first, started by the engine's rank 0 (an engine
core, or the server's own process) once its model is compressed, so the workers find that compression in
the cache and every rank shards the same weights. A worker builds its shard with the same builder
(:meth:`server.runtime.Engines.build`), then runs the steps rank 0 sends (engine/tp.py) until rank 0 stops
or dies (the kernel kills a worker whose parent dies: it may be waiting inside a collective).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch

from engine.tp import follow
from models.llama import Llama
from models.tensor_parallel import NO_MULTICAST, AllReduceKind, init_group, make_all_reduce, shard_llama
from server import metrics
from server.config import Settings
from server.logs import configure_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in its engine's tensor-parallel group."""

    rank: int
    world: int
    store: str  # host:port where the ranks meet to form the process group
    steps: tuple[str, ...]  # where ranks 1.. take rank 0's steps (ZeroMQ addresses)

    def device(self, device: torch.device) -> torch.device:
        """Rank r runs on the r-th GPU this engine may use (``CUDA_VISIBLE_DEVICES``); on CPU, on the CPU."""
        return torch.device("cuda", self.rank) if device.type == "cuda" else device


def start_workers(settings: Settings) -> tuple[TensorParallel, list[BaseProcess]]:
    """Rank 0's group, with ranks 1.. started as processes (they join it while rank 0 waits in ``join``)."""
    world = settings.tensor_parallel_size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        store = f"127.0.0.1:{s.getsockname()[1]}"
    run_dir = Path(tempfile.mkdtemp(prefix="lowlat-tp-"))
    tp = TensorParallel(0, world, store, tuple(f"ipc://{run_dir}/rank-{r}" for r in range(1, world)))
    context = multiprocessing.get_context("spawn")
    # Workers serve no metrics: without the multiprocess directory their gauges stay in their own memory.
    metrics_dir = os.environ.pop(metrics.MULTIPROC_ENV, None)
    try:
        workers = []
        for rank in range(1, world):
            worker = context.Process(
                target=run_worker, args=(settings, replace(tp, rank=rank)), name=f"tp-worker-{rank}", daemon=True
            )
            worker.start()
            workers.append(worker)
    finally:
        if metrics_dir is not None:
            os.environ[metrics.MULTIPROC_ENV] = metrics_dir
    log.info("tensor parallel over %d devices: %d worker process(es) started", world, len(workers))
    return tp, workers


def join(model: Llama, tp: TensorParallel, device: torch.device, all_reduce: AllReduceKind = "auto") -> Llama:
    """Joins the group (waiting for every rank), sets up its all-reduce and keeps this rank's shard of ``model``."""
    os.environ.update(NO_MULTICAST)
    init_group(tp.rank, tp.world, tp.store, device)
    reduce = make_all_reduce(all_reduce, device, model.embed_tokens.weight.dtype)
    return shard_llama(model, tp.rank, tp.world, reduce)


def run_worker(settings: Settings, tp: TensorParallel) -> None:
    """A worker process: builds rank ``tp.rank``'s shard, then follows rank 0's steps."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with rank 0
        with contextlib.suppress(OSError):
            Path("/proc/self/comm").write_text(f"tp-worker-{tp.rank}")
    configure_logging(settings.log_level)
    if torch.cuda.is_available():
        torch.cuda.set_device(tp.rank)
    from server.runtime import Engines  # the builder imports this module to start workers

    built = Engines.build(settings.model_copy(update={"enable_classify": False}), tp)
    assert built.follower is not None
    follow(tp.steps[tp.rank - 1], built.follower.follow)
