"""Request ids: every response carries ``X-Request-ID`` (the client's own when it sent a usable one),
every log record made while serving the request carries it, and the generation engine names its
sequence after it, so one id follows a request from the load balancer through the engine's logs."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

HEADER = "x-request-id"
# Printable, no spaces or quotes: safe to echo in a header and to put in a log line.
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

access_log = logging.getLogger("server.access")

_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def current_request_id() -> str:
    """The id of the request being served in this context ("-" outside a request)."""
    return _current.get()


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` so formats can use ``%(request_id)s``; attach it to handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        return True


class RequestIdMiddleware:
    """Pure ASGI middleware (a streamed body keeps the id in context until its last chunk). It also
    writes the access log line, at the last body chunk, so the line carries the id, the status and
    the full duration of a streamed response (uvicorn's own access log knows neither id nor end)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        request_id = sent if _VALID.fullmatch(sent) else uuid.uuid4().hex
        # Not reset afterwards: each request runs in its own task (own context), and the 500 handler,
        # which runs outside this middleware, still needs the id.
        _current.set(request_id)

        start, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), request_id.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_access(status)

        def log_access(code: int) -> None:
            ms = (time.perf_counter() - start) * 1000
            access_log.info("%s %s %d %.1fms", scope["method"], scope["path"], code, ms)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log_access(500)  # answered by the error handler outside this middleware
            raise
