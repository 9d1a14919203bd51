"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving HTTP (models may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once models are loaded and warmed up; 503 before (load balancers hold traffic until then)."""
    runtime = getattr(request.app.state, "runtime", None)
    error = getattr(request.app.state, "load_error", None)
    if runtime is not None and runtime.ready:
        return JSONResponse({"status": "ready"})
    status = "failed" if error else "loading"
    return JSONResponse({"status": status, "error": error}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
