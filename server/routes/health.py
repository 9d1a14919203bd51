"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.routes.common import RETRY_AFTER, service_state

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving HTTP (models may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once models are loaded and warmed up; 503 while loading, while draining for shutdown and
    after an engine failure (load balancers hold or move traffic then)."""
    state, message = service_state(request.app)
    if state == "ready":
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"status": state, "error": message}, status_code=503, headers={"Retry-After": RETRY_AFTER[state]}
    )


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
