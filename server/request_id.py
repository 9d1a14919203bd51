"""Request ids: every response carries ``X-Request-ID`` (the client's own when it sent a usable one),
every log record made while serving the request carries it, and the generation engine names its
sequence after it, so one id follows a request from the load balancer through the engine's logs."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

from server.asgi import HTTPMiddleware, Receive, Scope, Send, WatchedSend

HEADER = "x-request-id"
_HEADER_KEY = HEADER.encode()
# Printable, no spaces or quotes: safe to echo in a header and to put in a log line.
_VALID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

access_log = logging.getLogger("server.access")

# Control characters (C0, DEL, C1) and Unicode line separators, written as Python escapes: a client
# value holding them (a percent-decoded path, a prompt) cannot start a forged log line.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: repr(chr(c))[1:-1] for c in _CONTROLS}

_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    """The id of the request being served in this context ("-" outside a request)."""
    return _current.get()


def escape_controls(text: str) -> str:
    """``text`` with every control character escaped (``\\r``, ``\\n``, ``\\x1b``, ...): safe on one log line."""
    return text.translate(_ESCAPES)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` so formats can use ``%(request_id)s``, and escapes control characters
    in the message, so that no logged value (client-supplied or not) can forge a log line; attach it
    to handlers. Tracebacks (``exc_info``) keep their lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format: leave it to the handler, which reports it as usual
        safe = escape_controls(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


class RequestIdMiddleware(HTTPMiddleware):
    """Sets the request's id (a streamed body keeps it in context until its last chunk) and writes the
    access log line at the last body chunk, so the line carries the id, the status and the full duration
    of a streamed response (uvicorn's own access log knows neither id nor end)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = b""
        for key, value in scope["headers"]:
            if key == _HEADER_KEY:
                sent = value  # the last one, as a dict of the headers would keep
        sent_id = sent.decode("latin-1")
        request_id = sent_id if _VALID.fullmatch(sent_id) else uuid.uuid4().hex
        # Not reset afterwards: each request runs in its own task (own context), and the 500 handler,
        # which runs outside this middleware, still needs the id.
        _current.set(request_id)
        start = time.perf_counter()

        def log_access(code: int) -> None:
            if not access_log.isEnabledFor(logging.INFO):  # access lines off (a level above info)
                return
            ms = (time.perf_counter() - start) * 1000
            method, path = escape_controls(scope["method"]), escape_controls(scope["path"])
            access_log.info("%s %s %d %.1fms", method, path, code, ms)

        try:
            await self.app(scope, receive, WatchedSend(send, log_access, [(_HEADER_KEY, request_id.encode())]))
        except Exception:
            log_access(500)  # answered by the error handler outside this middleware
            raise
