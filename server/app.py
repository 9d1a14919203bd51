"""FastAPI application factory. Models load in the background so /health answers at once and /ready
turns 200 only when the runtime is warmed up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine.core_client import CoreClient, CoreLink
from server import metrics
from server.admission import Admission, SharedCounts
from server.config import Settings
from server.errors import install_error_handlers
from server.metrics import MetricsMiddleware
from server.middleware import AuthMiddleware, BodyLimitMiddleware
from server.request_id import RequestIdMiddleware
from server.routes import classify, generate, health, info, openai
from server.routes.common import TIMEOUT_HEADER
from server.runtime import Runtime, freeze_heap

log = logging.getLogger(__name__)

CORE_CONNECT_TIMEOUT_S = 3600.0  # engine cores load and compress the models first; a core that dies ends the server


def create_app(
    settings: Settings,
    runtime: Runtime | None = None,
    cores: CoreLink | None = None,
    shared_counts: SharedCounts | None = None,
) -> FastAPI:
    """``runtime``, already started, lets tests share one set of loaded models between apps (its owner
    stops it); normally the app loads, starts and stops its own, or, with ``cores``, connects to engine
    cores (an API-server process; ``shared_counts`` then makes admission global across such processes)."""

    async def bring_up(app: FastAPI) -> None:
        if runtime is not None:
            app.state.runtime = runtime
            return
        try:
            if cores is not None:
                client = CoreClient(cores)
                rt = await Runtime.connect(settings, client, CORE_CONNECT_TIMEOUT_S)
                await rt.start()
                freeze_heap()
                app.state.runtime = rt
                await client.watch(lambda: metrics.READY.set(0), settings.engine_hang_timeout_s)
                return
            rt = await asyncio.to_thread(Runtime.load, settings)
            await rt.start()
            freeze_heap()
            app.state.runtime = rt
        except Exception as exc:
            log.exception("model loading failed")
            app.state.load_error = f"model loading failed ({type(exc).__name__}); see the server log"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.runtime = None
        app.state.load_error = None
        task = asyncio.create_task(bring_up(app))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if runtime is None and app.state.runtime is not None:
                await app.state.runtime.stop()

    app = FastAPI(
        title="lowlat-server",
        version="0.1.0",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.admission = Admission.from_settings(settings, shared_counts)
    install_error_handlers(app)
    # Added innermost first. CORS answers preflights before auth; metrics count 401s and 413s too.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, read_timeout_s=settings.body_read_timeout_s
    )
    keys = settings.accepted_keys()
    if keys:
        probes = frozenset({"/health", "/ready", "/metrics"} if settings.public_probes else ())
        share = settings.share_prefix_cache_across_keys
        app.add_middleware(AuthMiddleware, keys=keys, open_paths=probes, share_prefix_cache=share)
    app.add_middleware(MetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", TIMEOUT_HEADER, "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: the id is set before anything logs
    for module in (generate, classify, health, info, openai):
        app.include_router(module.router)
    return app
