"""``python -m server``: parse settings from the CLI and environment, then serve with uvicorn."""

from __future__ import annotations

import logging
import sys
import time
from types import FrameType

import uvicorn

from server import metrics
from server.admission import Admission
from server.app import create_app
from server.config import Settings
from server.request_id import RequestIdFilter

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


def main(argv: list[str] | None = None) -> None:
    settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    app = create_app(settings)
    # access_log=False: server.access (server/request_id.py) writes the access lines, with request ids.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    DrainingServer(config, app.state.admission, settings.shutdown_grace_s).run()


if __name__ == "__main__":
    main()
