"""An asyncio event loop on a virtual clock, for unit tests of code that waits on the loop's time.

When nothing is ready to run, the loop does not sleep until its next timer: it moves its clock there at
once. Waits, timeouts and ``asyncio.sleep`` then take no real time, and every time a test reads from
``loop.time()`` is exact, so it can assert equalities instead of wall-clock windows. A loop with no timer
left blocks for real until another thread wakes it (``call_soon_threadsafe``), so work handed to a thread
is awaited normally (idle for a minute of real time, it raises: a deadlock). While such a thread runs, a
pending timer may fire early: a test that uses threads synchronises them with events, not with time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

IDLE_LIMIT_S = 60.0


class _VirtualTimeSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls without blocking; a wait until a timer becomes a jump of the virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer: only another thread can wake the loop
            ready = super().select(IDLE_LIMIT_S)
            if not ready:
                raise RuntimeError(f"virtual-clock loop: nothing to run and nothing woke it for {IDLE_LIMIT_S} s")
            return ready
        self.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """``time()`` starts at 0 and advances only by the waits the loop would otherwise have slept."""

    def __init__(self) -> None:
        self._virtual = _VirtualTimeSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a ``VirtualClockLoop`` (``asyncio.Runner`` needs Python 3.11)."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


class InlineExecutor(ThreadPoolExecutor):
    """Runs each submitted call at once on the caller's thread (the event loop's): with no worker thread,
    a test of code that offloads work to an executor is single-threaded and its order deterministic."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future
