"""Hardening (issue 18) without models or processes: probes, log escaping, cache bounds, cache salts."""

from __future__ import annotations

import logging
import types
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.request_id import RequestIdFilter, RequestIdMiddleware, escape_controls
from server.routes import health

pytestmark = pytest.mark.unit


def _probe_app(loaded: object | None, draining: bool = False) -> FastAPI:
    app = FastAPI()
    app.include_router(health.router)
    app.state.runtime = loaded
    app.state.load_error = None
    app.state.admission = types.SimpleNamespace(draining=draining)
    return app


READY = types.SimpleNamespace(ready=True, failure=None)


@pytest.mark.parametrize(
    ("path", "loaded", "draining", "status"),
    [
        ("/health", None, False, 200),
        ("/ready", READY, False, 200),
        ("/ready", None, False, 503),  # loading
        ("/ready", READY, True, 503),  # draining
    ],
)
async def test_head_probes_answer_like_get(path: str, loaded: object | None, draining: bool, status: int) -> None:
    """Load balancers that probe with HEAD get GET's status (not 405), and no body."""
    transport = httpx.ASGITransport(app=_probe_app(loaded, draining))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        get = await client.get(path)
        head = await client.head(path)
    assert get.status_code == head.status_code == status
    assert head.content == b""
    assert head.headers.get("retry-after") == get.headers.get("retry-after")


def _access_app() -> RequestIdMiddleware:
    async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return RequestIdMiddleware(ok)


@pytest.mark.parametrize(
    "path",
    [
        "/x%0D%0A2026-11-30 08:00:00,000 INFO server.access [admin]: GET /admin 200 1.0ms",  # percent-encoded
        "/x%0a%1b[31m%c2%85%e2%80%a8",  # LF, an ANSI escape, NEL, LINE SEPARATOR
    ],
)
async def test_access_log_escapes_control_characters(path: str, caplog: pytest.LogCaptureFixture) -> None:
    """A request path cannot forge access-log lines, even unauthenticated (uvicorn hands the app the
    percent-decoded path, so the CR/LF arrive raw)."""
    transport = httpx.ASGITransport(app=_access_app())
    with caplog.at_level(logging.INFO, logger="server.access"):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get(path)
    (record,) = [r for r in caplog.records if r.name == "server.access"]
    line = record.getMessage()
    assert line.startswith("GET /x\\") and line.endswith("ms")
    assert not any(ch in line for ch in "\r\n\x1b\x85\u2028")


def test_log_filter_escapes_every_message() -> None:
    """Any logged value, client-supplied or not, stays on its line; tracebacks keep theirs."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "prompt: %s", ("a\r\nFAKE line\x00",), None)
    assert RequestIdFilter().filter(record)
    assert record.getMessage() == "prompt: a\\r\\nFAKE line\\x00"
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "%d tokens", (3,), None)
    RequestIdFilter().filter(plain)
    assert plain.args == (3,) and plain.getMessage() == "3 tokens"
    assert escape_controls("tab\there\u2029") == "tab\\there\\u2029"
