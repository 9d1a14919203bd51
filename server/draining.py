"""The uvicorn server: graceful shutdown (drain admitted work before closing), a deadline for each
request's headers, and a response's head written with its body."""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from server import metrics
from server.admission import Admission
from server.asgi import Receive, Scope, Send

log = logging.getLogger("server")

# Once responses under way are cut (see Admission.cut): time for them to send their last event or error.
CUT_FLUSH_S = 1.0


def header_deadline(base: type[asyncio.Protocol], timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``base`` (httptools or h11) closing a connection that has not sent a
    request's complete headers ``timeout_s`` after it opened or after its previous response: uvicorn
    bounds the idle wait between requests (keep-alive) but not a slow trickle of header bytes, so
    without this a slowloris client holds its connection for ever. The body's deadline is an ASGI
    middleware's (``server.middleware.BodyLimitMiddleware``), which can still answer 408."""

    class HeaderDeadline(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            app = self.app

            async def headers_in(scope: Scope, receive: Receive, send: Send) -> None:
                self._disarm()  # uvicorn calls the app once a request's headers are complete
                await app(scope, receive, send)

            self.app = headers_in

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.debug("closing a connection whose request headers took over %.0f s", timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers (a pipelined one's app call disarms it again)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


class _HeadJoined:
    """A connection's transport that holds a response's head (uvicorn's first write of it) until the next write
    or the end of the event-loop turn, whichever comes first: uvicorn writes a whole response's head and body
    apart, and they leave together, as one send and one wake-up of the client instead of two. Everything else
    is the transport's own."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self.head_next = True  # the next write is a response's head

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        elif self.head_next:
            self.head_next = False
            self._held = data
            asyncio.get_running_loop().call_soon(self._release)
        else:
            self._transport.write(data)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def head_joined(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``base`` writing each response's head with what follows it in the same
    event-loop turn (:class:`_HeadJoined`)."""

    class HeadJoined(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(_HeadJoined(transport))  # type: ignore[arg-type]

        def on_response_complete(self) -> None:
            self.transport.head_next = True
            super().on_response_complete()

    HeadJoined.__name__ = f"HeadJoined{base.__name__}"
    return HeadJoined


class DrainingServer(uvicorn.Server):
    """Graceful shutdown in two phases. On the first SIGTERM/SIGINT the server keeps listening but
    drains: ``/ready`` answers 503 (load balancers move traffic away), new work gets 503 with
    Retry-After, and admitted requests run to completion. When none is left, uvicorn's own shutdown
    takes over (closing idle connections) and the lifespan stops the engines. When ``grace_s`` has
    passed, or a second signal skips the drain, the responses still under way are cut first: a stream
    ends with an ``error`` event, a whole response with 503, as a deadline ends them, rather than with
    a dropped connection. Each request's headers must arrive within ``header_timeout_s``
    (:func:`header_deadline`); a response's head leaves with its body (:func:`head_joined`)."""

    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float, header_timeout_s: float) -> None:
        base = import_from_string(HTTP_PROTOCOLS[config.http]) if isinstance(config.http, str) else config.http
        config.http = header_deadline(head_joined(base), header_timeout_s)
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
