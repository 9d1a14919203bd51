"""Admission control: how much work the server takes on at once, and whether it takes any now.

A request holds a slot from the moment it is admitted until its response, whole or streamed, is fully
sent (or its client is gone). Past a gate's bound the answer is an immediate 429: a burst queues only as
far as the engine can work it off, never without bound. While draining for shutdown the answer is 503,
and draining ends when no slot is held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Callable, MutableMapping
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import Synchronized
from types import TracebackType
from typing import Any

from fastapi.responses import StreamingResponse

from server.config import Settings
from server.errors import APIError

RETRY_AFTER_BUSY = "1"  # seconds: an engine step frees slots within well under this
RETRY_AFTER_SHED = "5"  # seconds: a shed request met a backlog, which takes more than a step to clear


def shed_error(exc: Exception) -> APIError:
    """503 for a request the engine refused while it waited because it could no longer finish before its
    deadline (engine/deadlines.py): overload, as a 429, but found after admission."""
    return APIError(503, str(exc), type="overloaded", headers={"Retry-After": RETRY_AFTER_SHED})


class Gate:
    """A bounded count of requests holding one kind of slot (``limit=None``: counted, not bounded).
    With ``shared`` (a ``multiprocessing.Value``) the count is the whole server's, across API-server
    processes, so a 429 is decided once for all of them."""

    def __init__(self, what: str, limit: int | None, setting: str, shared: Synchronized[int] | None = None) -> None:
        self.what, self.limit, self.setting = what, limit, setting
        self._count = shared if shared is not None else _Local()
        self._lock = shared.get_lock() if shared is not None else contextlib.nullcontext()

    @property
    def count(self) -> int:
        return self._count.value

    def enter(self, cost: int = 1, field: str | None = None) -> None:
        """Takes ``cost`` slots (a request of n sequences takes n). A request that needs more than the
        bound could never be let in: 400 naming ``field`` (retrying would not help), not 429."""
        if self.limit is not None and cost > self.limit:
            raise APIError(
                400,
                f"this request needs {cost} {self.what}; the server admits at most {self.limit} ({self.setting})",
                type="request_too_large",
                field=field,
            )
        with self._lock:
            count = self._count.value
            if self.limit is None or count + cost <= self.limit:
                self._count.value = count + cost
                return
        raise APIError(
            429,
            f"server busy: {self.limit} {self.what} already in progress ({self.setting}); retry shortly",
            type="overloaded",
            headers={"Retry-After": RETRY_AFTER_BUSY},
        )

    def leave(self, cost: int = 1) -> None:
        with self._lock:
            self._count.value -= cost


class _Local:
    value = 0


SharedCounts = tuple["Synchronized[int]", ...]


def shared_counts(context: BaseContext) -> SharedCounts:
    """Counts in shared memory for :meth:`Admission.from_settings` (one per gate), made before the API
    servers start."""
    return tuple(context.Value("q", 0) for _ in range(GATES))


class Ticket:
    """The slots one request holds. As a context manager it releases them on exit, unless a streamed
    response took them over (then they are released when that response ends, however it ends)."""

    def __init__(self, held: list[tuple[Gate, int]]) -> None:
        self._held = held

    def release(self) -> None:
        held, self._held = self._held, []
        for gate, cost in held:
            gate.leave(cost)

    def stream(self, content: AsyncIterable[str], **kwargs: Any) -> StreamingResponse:
        owned, self._held = self._held, []  # the response owns the slots from here on
        return _AdmittedStream(content, release=Ticket(owned).release, **kwargs)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


class _AdmittedStream(StreamingResponse):
    def __init__(self, content: AsyncIterable[str], *, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


GATES = 4  # generate, tokens, streams, classify


@dataclass
class Admission:
    generate: Gate
    tokens: Gate
    streams: Gate
    classify: Gate
    draining: bool = False
    all_gates: list[Gate] = field(init=False)
    _cutoff: asyncio.Future[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.all_gates = [self.generate, self.tokens, self.streams, self.classify]

    def cutoff(self) -> asyncio.Future[None]:
        """Done when responses still under way must end now (the shutdown grace is over, or a second
        signal skipped it): the routes wait on it beside their work, so they can answer with an error
        (a stream's last event) instead of having their connection cut mid-response."""
        loop = asyncio.get_running_loop()
        if self._cutoff is None or self._cutoff.get_loop() is not loop:
            self._cutoff = loop.create_future()
        return self._cutoff

    def cut(self) -> None:
        """Ends every response under way (on the event loop that serves them)."""
        if self._cutoff is not None and not self._cutoff.done():
            self._cutoff.set_result(None)

    @classmethod
    def from_settings(cls, s: Settings, shared: SharedCounts | None = None) -> Admission:
        """``shared``: the counts of every API-server process of this server (see :func:`shared_counts`)."""
        counts = shared or (None,) * GATES
        tokens = s.max_admitted_tokens or 2 * s.kv_cache_tokens
        return cls(
            # Admitted sequences = running batch + waiting list: the engine's queue stays within max_queued_requests.
            generate=Gate(
                "generation sequences",
                (s.max_num_seqs + s.max_queued_requests) * s.data_parallel_size,
                "max_num_seqs + max_queued_requests",
                counts[0],
            ),
            # What those sequences may grow to (prompt + max_tokens each): few long ones weigh as many short ones.
            tokens=Gate("generation tokens", tokens * s.data_parallel_size, "max_admitted_tokens", counts[1]),
            streams=Gate("streams", s.max_concurrent_streams, "max_concurrent_streams", counts[2]),
            # Classification is bounded by the batcher's queue (cls_max_queued_inputs); counted here for draining.
            classify=Gate("classify requests", None, "cls_max_queued_inputs", counts[3]),
        )

    def _admit(self, wanted: list[tuple[Gate, int, str | None]]) -> Ticket:
        """Takes every wanted slot, or none of them (429; 400 for a request no gate could ever let in)."""
        held: list[tuple[Gate, int]] = []
        try:
            for gate, cost, field_name in wanted:
                gate.enter(cost, field_name)
                held.append((gate, cost))
        except APIError:
            Ticket(held).release()
            raise
        return Ticket(held)

    def generation(self, sequences: list[int], stream: bool = False, field: str = "n") -> Ticket:
        """Slots for a generation request: one per sequence (prompts x OpenAI ``n``), ``sequences`` giving
        each one's prompt + max_tokens; ``field`` is what a request with too many sequences should change."""
        wanted = [(self.generate, len(sequences), field), (self.tokens, sum(sequences), "max_tokens")]
        return self._admit([*wanted, *([(self.streams, 1, None)] if stream else [])])

    def classification(self) -> Ticket:
        return self._admit([(self.classify, 1, None)])

    def idle(self) -> bool:
        return all(gate.count == 0 for gate in self.all_gates)
