"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.metrics import exposition
from server.routes.common import RETRY_AFTER, service_state

router = APIRouter()


def _probe(request: Request, response: JSONResponse) -> Response:
    """``response`` for GET; for HEAD (some load balancers probe with it) the same status and headers
    without the body."""
    if request.method != "HEAD":
        return response
    head = Response(status_code=response.status_code, media_type=response.media_type)
    head.headers.update({k: v for k, v in response.headers.items() if k != "content-length"})
    return head


@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health(request: Request) -> Response:
    """The process is up and serving HTTP (models may still be loading)."""
    return _probe(request, JSONResponse({"status": "ok"}))


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(request: Request) -> Response:
    """200 once models are loaded and warmed up; 503 while loading, while draining for shutdown and
    after an engine failure (load balancers hold or move traffic then)."""
    state, message = service_state(request.app)
    if state == "ready":
        return _probe(request, JSONResponse({"status": "ready"}))
    response = JSONResponse(
        {"status": state, "error": message}, status_code=503, headers={"Retry-After": RETRY_AFTER[state]}
    )
    return _probe(request, response)


@router.get("/metrics")
async def metrics() -> Response:
    body, media_type = exposition()
    return Response(body, media_type=media_type)
