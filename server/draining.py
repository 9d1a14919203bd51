"""Graceful shutdown for uvicorn: drain admitted work before closing."""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from server import metrics
from server.admission import Admission

log = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """Graceful shutdown in two phases. On the first SIGTERM/SIGINT the server keeps listening but
    drains: ``/ready`` answers 503 (load balancers move traffic away), new work gets 503 with
    Retry-After, and admitted requests run to completion. When none is left, or ``grace_s`` has passed,
    uvicorn's own shutdown takes over (closing idle connections, cancelling whatever still runs after the
    rest of the grace period) and the lifespan stops the engines. A second signal skips the drain."""

    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.grace_s = grace_s
        self.drain_started: float | None = None
        self.drain_announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        # Plain attribute writes only: a signal handler must not take locks (logging, metrics) that the
        # interrupted code may hold. on_tick, on the event loop, does the rest.
        self._captured_signals.append(sig)  # re-raised after serving, as uvicorn does
        self.drain_started = time.monotonic()
        self.admission.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            if not self.drain_announced:
                self.drain_announced = True
                metrics.READY.set(0)
                log.info("draining: /ready is 503, new work refused; in-flight requests get up to %.0f s", self.grace_s)
            left = self.grace_s - (time.monotonic() - self.drain_started)
            if self.admission.idle() or left <= 0:
                log.info("drained (%s); shutting down", "all requests done" if self.admission.idle() else "grace over")
                self.config.timeout_graceful_shutdown = max(left, 0.0)
                self.should_exit = True
        return await super().on_tick(counter)
