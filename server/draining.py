"""Graceful shutdown for uvicorn: drain admitted work before closing."""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from server import metrics
from server.admission import Admission

log = logging.getLogger("server")

# Once responses under way are cut (see Admission.cut): time for them to send their last event or error.
CUT_FLUSH_S = 1.0


class DrainingServer(uvicorn.Server):
    """Graceful shutdown in two phases. On the first SIGTERM/SIGINT the server keeps listening but
    drains: ``/ready`` answers 503 (load balancers move traffic away), new work gets 503 with
    Retry-After, and admitted requests run to completion. When none is left, uvicorn's own shutdown
    takes over (closing idle connections) and the lifespan stops the engines. When ``grace_s`` has
    passed, or a second signal skips the drain, the responses still under way are cut first: a stream
    ends with an ``error`` event, a whole response with 503, as a deadline ends them, rather than with
    a dropped connection."""

    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.grace_s = grace_s
        self.drain_started: float | None = None
        self.drain_announced = False
        self.skip_drain = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # already shutting down: uvicorn's own handling (a further SIGINT forces)
            super().handle_exit(sig, frame)
            return
        # Plain attribute writes only: a signal handler must not take locks (logging, metrics) or touch the
        # event loop that the interrupted code may be in. on_tick, on the event loop, does the rest.
        self._captured_signals.append(sig)  # re-raised after serving, as uvicorn does
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.admission.draining = True
        else:
            self.skip_drain = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            if not self.drain_announced:
                self.drain_announced = True
                metrics.READY.set(0)
                log.info("draining: /ready is 503, new work refused; in-flight requests get up to %.0f s", self.grace_s)
            left = self.grace_s - (time.monotonic() - self.drain_started)
            if self.admission.idle():
                log.info("drained (all requests done); shutting down")
                self.config.timeout_graceful_shutdown = max(left, 0.0)
                self.should_exit = True
            elif left <= 0 or self.skip_drain:
                log.warning("%s: ending the responses under way", "second signal" if self.skip_drain else "grace over")
                self.admission.cut()
                self.config.timeout_graceful_shutdown = CUT_FLUSH_S
                self.should_exit = True
        return await super().on_tick(counter)
