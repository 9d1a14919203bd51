"""Helpers shared by the routes: readiness gate, client-disconnect watching, encoder input limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.errors import APIError
from server.runtime import Runtime

T = TypeVar("T")

DISCONNECT_POLL_S = 0.05


def ready_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None or not runtime.ready:
        raise APIError(503, "model is loading; retry shortly", type="not_ready", headers={"Retry-After": "5"})
    return runtime


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work`` but cancels it as soon as the client disconnects, so a vanished client stops
    holding a batch slot (its generator's cleanup aborts the sequence in the engine)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected
    finally:
        if not task.done():
            task.cancel()


def encoder_inputs(runtime: Runtime, texts: list[str], field: str, single: bool) -> list[int]:
    """Checks the per-call input count and per-input token limits of the classification model (shared
    by /classify and /v1/embeddings); returns each text's token count, the batcher's cost."""
    settings = runtime.settings
    assert runtime.classifier is not None
    if len(texts) > settings.cls_max_inputs:
        raise APIError(
            400, f"{len(texts)} inputs; the limit is {settings.cls_max_inputs} (cls_max_inputs)", field=field
        )
    counts = runtime.classifier.count_tokens(texts)
    for i, n_tokens in enumerate(counts):
        if n_tokens > settings.cls_max_input_tokens:
            raise APIError(
                400,
                f"{field}[{i}] has {n_tokens} tokens; the limit is {settings.cls_max_input_tokens} "
                "(cls_max_input_tokens)",
                type="input_too_long",
                field=field if single else f"{field}.{i}",
            )
    return counts
