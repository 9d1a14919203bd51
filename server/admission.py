"""Admission control: how much work the server takes on at once, and whether it takes any now.

A request holds a slot from the moment it is admitted until its response, whole or streamed, is fully
sent (or its client is gone). Past a gate's bound the answer is an immediate 429: a burst queues only as
far as the engine can work it off, never without bound. While draining for shutdown the answer is 503,
and draining ends when no slot is held.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from fastapi.responses import StreamingResponse

from server.config import Settings
from server.errors import APIError

RETRY_AFTER_BUSY = "1"  # seconds: an engine step frees slots within well under this


class Gate:
    """A bounded count of requests holding one kind of slot (``limit=None``: counted, not bounded)."""

    def __init__(self, what: str, limit: int | None, setting: str) -> None:
        self.what, self.limit, self.setting = what, limit, setting
        self.count = 0

    def enter(self, cost: int = 1) -> None:
        """Takes ``cost`` slots (a request of n sequences takes n); one request alone is always let in."""
        if self.limit is not None and self.count > 0 and self.count + cost > self.limit:
            raise APIError(
                429,
                f"server busy: {self.limit} {self.what} already in progress ({self.setting}); retry shortly",
                type="overloaded",
                headers={"Retry-After": RETRY_AFTER_BUSY},
            )
        self.count += cost

    def leave(self, cost: int = 1) -> None:
        self.count -= cost


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


@dataclass
class Admission:
    generate: Gate
    streams: Gate
    classify: Gate
    draining: bool = False
    all_gates: list[Gate] = field(init=False)

    def __post_init__(self) -> None:
        self.all_gates = [self.generate, self.streams, self.classify]

    @classmethod
    def from_settings(cls, s: Settings) -> Admission:
        return cls(
            # Admitted sequences = running batch + waiting list: the engine's queue stays within max_queued_requests.
            generate=Gate("generation sequences", s.max_num_seqs + s.max_queued_requests, "max_queued_requests"),
            streams=Gate("streams", s.max_concurrent_streams, "max_concurrent_streams"),
            # Classification is bounded by the batcher's queue (cls_max_queued_inputs); counted here for draining.
            classify=Gate("classify requests", None, "cls_max_queued_inputs"),
        )

    def _admit(self, wanted: list[tuple[Gate, int]]) -> Ticket:
        """Takes every wanted slot, or none of them (429)."""
        held: list[tuple[Gate, int]] = []
        try:
            for gate, cost in wanted:
                gate.enter(cost)
                held.append((gate, cost))
        except APIError:
            Ticket(held).release()
            raise
        return Ticket(held)

    def generation(self, sequences: int = 1, stream: bool = False) -> Ticket:
        """Slots for a generation request of ``sequences`` sequences (OpenAI ``n``), streamed or not."""
        return self._admit([(self.generate, sequences), *([(self.streams, 1)] if stream else [])])

    def classification(self) -> Ticket:
        return self._admit([(self.classify, 1)])

    def idle(self) -> bool:
        return all(gate.count == 0 for gate in self.all_gates)
