"""Helpers shared by the routes: readiness gate, admission, deadlines, client-disconnect watching,
encoder input limits."""

from __future__ import annotations

import asyncio
import copy
import math
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import FastAPI, Request

from engine.batcher import BatcherClosed, BatcherFull
from engine.classifier import EncoderFrontend
from engine.response_cache import BytesLRU
from server.admission import RETRY_AFTER_BUSY, Admission
from server.errors import APIError
from server.runtime import Runtime
from server.schemas import MAX_CHARS_PER_TOKEN, ErrorResponse
from server.services.tokenizing import OFF_LOOP_CHARS

# The error responses the native routes (/generate, /classify) document in the OpenAPI schema.
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 503, 504)}
T = TypeVar("T")

TIMEOUT_HEADER = "X-Request-Timeout"
DEADLINE_MESSAGE = "request deadline exceeded; the work was cancelled"
SHUTDOWN_MESSAGE = "server shut down before the response was complete; the work was cancelled, retry elsewhere"


def service_state(app: FastAPI) -> tuple[str, str | None]:
    """``("ready", None)``, or why the server takes no new work: loading, draining (shutting down) or
    failed (model loading or the generation engine), with a message safe to show clients."""
    runtime: Runtime | None = getattr(app.state, "runtime", None)
    admission: Admission | None = getattr(app.state, "admission", None)
    if admission is not None and admission.draining:
        return "draining", "server is shutting down; retry on another replica"
    if getattr(app.state, "load_error", None):
        return "failed", app.state.load_error
    if runtime is None or not runtime.ready:
        return "loading", "model is loading; retry shortly"
    if runtime.failure is not None:
        return "failed", runtime.failure
    return "ready", None


RETRY_AFTER = {"loading": "5", "draining": "5", "failed": "30"}


def ready_runtime(request: Request) -> Runtime:
    state, message = service_state(request.app)
    if state != "ready":
        kind = {"loading": "not_ready", "draining": "shutting_down", "failed": "unavailable"}[state]
        raise APIError(503, message or state, type=kind, headers={"Retry-After": RETRY_AFTER[state]})
    return request.app.state.runtime


def admission(request: Request) -> Admission:
    return request.app.state.admission


def request_deadline(request: Request, limit_s: float) -> float:
    """Event-loop time by which the request must be answered: ``request_timeout_s``, or less when the
    client asks for less with the ``X-Request-Timeout`` header (seconds)."""
    timeout = limit_s
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            asked = math.nan
        if not (asked > 0 and math.isfinite(asked)):
            raise APIError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds", field=TIMEOUT_HEADER)
        timeout = min(asked, limit_s)
    return asyncio.get_running_loop().time() + timeout


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


async def until_disconnect(
    request: Request, work: Awaitable[T], deadline: float | None = None, cutoff: asyncio.Future[None] | None = None
) -> T:
    """Awaits ``work`` but cancels it as soon as the client disconnects, ``deadline`` (loop time)
    passes (504) or ``cutoff`` is done (503: the server is shutting down, see ``Admission.cutoff``), so a
    vanished or timed-out request stops holding a batch slot (its generator's cleanup aborts the
    sequence in the engine). The disconnect is the ASGI server's own ``http.disconnect`` message, awaited
    (the body has been read by then): no polling, which cost each request wake-ups and Starlette's
    ``is_disconnected`` (a cancel scope and a task repr per poll). ``work`` runs in the calling task, which
    the disconnect, the deadline's timer or the cutoff cancel: a task of its own and ``asyncio.wait`` over
    it cost a request at one client more event-loop turns and CPU (load_tests/results/serve/c1_local)."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    why: list[str] = []  # what stopped the work, once it did

    def stop(reason: str) -> None:
        if not why:
            why.append(reason)
            me.cancel()

    def on_gone(_: object) -> None:
        stop("gone")

    def on_cutoff(_: object) -> None:
        stop("cutoff")

    gone = asyncio.ensure_future(_disconnected(request))
    gone.add_done_callback(on_gone)
    if cutoff is not None:
        cutoff.add_done_callback(on_cutoff)
    timer = None if deadline is None else loop.call_at(deadline, stop, "deadline")
    try:
        result = await work  # cancelled by ``stop``, the work's own cleanup (engine abort) runs before this returns
    except (asyncio.CancelledError, Exception):
        if not why:  # stopped here, whatever the work raised on its way out gives way to why it was stopped
            raise
    finally:
        gone.remove_done_callback(on_gone)
        if cutoff is not None:
            cutoff.remove_done_callback(on_cutoff)
        if timer is not None:
            timer.cancel()
        if not gone.cancel() and not gone.cancelled():
            gone.exception()  # retrieved, so an error reading the request after the work ended is not logged as lost
    if not why:
        return result
    if not _only_own_cancel(me):  # cancelled from elsewhere too: that goes on
        raise asyncio.CancelledError
    if why[0] == "cutoff":
        raise APIError(503, SHUTDOWN_MESSAGE, type="shutting_down", headers={"Retry-After": RETRY_AFTER["draining"]})
    if why[0] == "gone":
        gone.result()  # an error reading the request (a body limit's 408/413) is that error, not a disconnect
        raise ClientDisconnected
    raise APIError(504, DEADLINE_MESSAGE, type="timeout")


def _only_own_cancel(task: asyncio.Task[object]) -> bool:
    """After ``until_disconnect`` cancelled ``task``: withdraws that cancellation, False when the task was
    also cancelled from elsewhere (then the cancellation goes on). Python 3.10 has no count of them."""
    uncancel = getattr(task, "uncancel", None)
    return uncancel is None or uncancel() == 0


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: what ``receive`` yields once a request's body is in (the routes
    that wait here take a body model, which FastAPI has read whole). It consumes the ``http.disconnect``
    message: on an ASGI server that delivers it once from a queue, nothing else may wait for it (uvicorn
    answers every later ``receive`` with it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def on_encoder(request: Request, runtime: Runtime, n_items: int, work: Callable[[], Awaitable[T]]) -> T:
    """Runs ``work`` on the encoder's batching queue (/classify, /v1/embeddings) under admission, the
    request's deadline and disconnect watching; a full queue answers 429, a stopping one 503."""
    assert runtime.batcher is not None
    deadline = request_deadline(request, runtime.settings.request_timeout_s)
    with admission(request).classification():
        try:
            runtime.batcher.check_room(n_items)
            return await until_disconnect(request, work(), deadline, admission(request).cutoff())
        except BatcherFull as exc:
            raise APIError(
                429,
                f"server busy: {exc} (cls_max_queued_inputs); retry shortly",
                type="overloaded",
                headers={"Retry-After": RETRY_AFTER_BUSY},
            ) from exc
        except BatcherClosed as exc:
            raise APIError(
                503, "server is shutting down", type="shutting_down", headers={"Retry-After": RETRY_AFTER["draining"]}
            ) from exc


class DeadlineExceeded(Exception):
    """A streamed response ran past its deadline (headers are sent: it ends with an error event)."""


class StreamCut(Exception):
    """A streamed response was still running when the server had to stop (it ends with an error event)."""


async def within_deadline(
    chunks: AsyncIterator[T], deadline: float, cutoff: asyncio.Future[None] | None = None
) -> AsyncIterator[T]:
    """Passes ``chunks`` through until ``deadline`` (loop time) or ``cutoff`` (see ``Admission.cutoff``),
    then closes them (which aborts the engine request) and raises :class:`DeadlineExceeded` or
    :class:`StreamCut`."""
    loop = asyncio.get_running_loop()
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(chunks))
            waited = {step} if cutoff is None else {step, cutoff}
            await asyncio.wait(waited, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise StreamCut if cutoff is not None and cutoff.done() else DeadlineExceeded
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        if step is not None and not step.done():  # past the deadline, cut, or this stream itself cancelled
            step.cancel()
            await asyncio.wait({step})
        await chunks.aclose()  # type: ignore[attr-defined]


# Classification inputs and labels of OFF_LOOP_CHARS characters or more are counted on this thread, as
# prompts are (load_tests/results/tokenize_offload/results.md), with a copy of the frontend of its own:
# the frontend locks its tokenizer, and the loop must not wait on that lock for a long encoding.
_ENCODER_TOKENIZE = ThreadPoolExecutor(1, thread_name_prefix="tokenize-encoder")
_worker_frontends: weakref.WeakKeyDictionary[EncoderFrontend, EncoderFrontend] = weakref.WeakKeyDictionary()
# Label texts' token counts: a deployment sends the same few label sets with every request, and counting them
# again would cost more than counting the input.
_label_counts: weakref.WeakKeyDictionary[EncoderFrontend, BytesLRU[str, int]] = weakref.WeakKeyDictionary()
LABEL_COUNTS_KEPT = 4096
LABEL_COUNTS_BYTES = 4 << 20


def _worker_frontend(frontend: EncoderFrontend) -> EncoderFrontend:
    own = _worker_frontends.get(frontend)
    if own is None:
        own = _worker_frontends[frontend] = copy.deepcopy(frontend.frontend())
    return own


async def encoder_inputs(
    runtime: Runtime, texts: list[str], field: str, single: bool, labels: Sequence[str] = ()
) -> tuple[list[list[int]], list[int]]:
    """Checks the per-call input count and per-input character and token limits of the classification
    model (shared by /classify and /v1/embeddings); returns each text's token ids (their count is the
    batcher's cost; the engine builds its batch from them) and each label text's token count (from the
    same tokenizer call). Characters are checked first, so an
    oversized text is refused without tokenizing it; long ones are tokenized off the event loop."""
    settings = runtime.settings
    assert runtime.classifier is not None
    if len(texts) > settings.cls_max_inputs:
        raise APIError(
            400, f"{len(texts)} inputs; the limit is {settings.cls_max_inputs} (cls_max_inputs)", field=field
        )
    max_chars = settings.cls_max_input_tokens * MAX_CHARS_PER_TOKEN
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise APIError(
                400,
                f"{field}[{i}] has {len(text)} characters; the limit is {max_chars} "
                f"({MAX_CHARS_PER_TOKEN} per token of cls_max_input_tokens)",
                type="input_too_long",
                field=field if single else f"{field}.{i}",
            )
    known = _label_counts.get(runtime.classifier)
    if known is None:
        known = _label_counts[runtime.classifier] = BytesLRU(LABEL_COUNTS_BYTES, LABEL_COUNTS_KEPT)
    by_label = {label: known.get(label) for label in dict.fromkeys(labels)}
    new_labels = [label for label, n in by_label.items() if n is None]
    every = [*texts, *new_labels]
    if sum(map(len, every)) < OFF_LOOP_CHARS:
        all_ids = runtime.classifier.token_ids(every)
    else:
        own = _worker_frontend(runtime.classifier)
        all_ids = await asyncio.get_running_loop().run_in_executor(_ENCODER_TOKENIZE, own.token_ids, every)
    ids = all_ids[: len(texts)]
    counts = [len(row) for row in ids]
    for label, row in zip(new_labels, all_ids[len(texts) :], strict=True):
        by_label[label] = len(row)
        known.put(label, len(row))
    label_counts = [by_label[label] for label in labels]
    for i, n_tokens in enumerate(counts):
        if n_tokens > settings.cls_max_input_tokens:
            raise APIError(
                400,
                f"{field}[{i}] has {n_tokens} tokens; the limit is {settings.cls_max_input_tokens} "
                "(cls_max_input_tokens)",
                type="input_too_long",
                field=field if single else f"{field}.{i}",
            )
    return ids, label_counts
