"""FastAPI application factory. Models load in the background so /health answers at once and /ready
turns 200 only when the runtime is warmed up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from server.config import Settings
from server.errors import install_error_handlers
from server.metrics import MetricsMiddleware
from server.request_id import RequestIdMiddleware
from server.routes import classify, generate, health, openai
from server.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """``runtime``, already started, lets tests share one set of loaded models between apps (its owner
    stops it); normally the app loads, starts and stops its own."""

    async def bring_up(app: FastAPI) -> None:
        if runtime is not None:
            app.state.runtime = runtime
            return
        try:
            rt = await asyncio.to_thread(Runtime.load, settings)
            await rt.start()
            app.state.runtime = rt
        except Exception as exc:
            log.exception("model loading failed")
            app.state.load_error = f"{type(exc).__name__}: {exc}"

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

    app = FastAPI(title="lowlat-server", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: the id is set before anything logs
    for module in (generate, classify, health, openai):
        app.include_router(module.router)
    return app
