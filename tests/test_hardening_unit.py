"""Hardening (issue 18) without models or processes: probes, log escaping, cache bounds, cache salts."""

from __future__ import annotations

import types

import httpx
import pytest
from fastapi import FastAPI

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
