"""Dynamic batching queue: asyncio-facing submission, model execution on one worker thread.

Requests arrive one input at a time on the event loop; the model is far more efficient on a
batch. The batcher holds items briefly (at most ``max_wait_ms`` after the first one arrived),
closes a batch on a size or token budget, and runs it off the event loop so that HTTP handling
stays responsive while the model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine.metrics import BATCH_SIZE, QUEUE_TIME, QUEUED

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher is stopped (or stopping) and will not execute this item."""


class BatcherFull(RuntimeError):
    """The queue holds ``max_queued`` items already; the caller should back off and retry."""


@dataclass
class _Pending(Generic[T]):
    item: T
    cost: int
    future: asyncio.Future[Any]
    submitted: float  # loop.time() at submission
    call: int  # the submission it belongs to (``submit_many``'s items share one)


def _unit_cost(_: object) -> int:
    return 1


class DynamicBatcher(Generic[T, R]):
    """Gathers submitted items into batches and runs ``run_batch`` on a single worker thread.

    A batch closes as soon as one of these holds:

    * it has ``max_batch_size`` items;
    * adding the next queued item would push the summed ``cost`` (token count) over
      ``max_batch_tokens`` — an item whose cost alone exceeds the budget runs in a batch of its own;
    * ``max_wait_ms`` have passed since the *first* item of the batch was submitted (so an item
      never waits longer than that for company, and items that queued up while the previous
      batch was running go out immediately).

    Batches are filled round-robin over the waiting calls (``submit_many``'s items form one call, a
    ``submit`` its own): one item from each call in turn, the calls served last going to the back. A
    call of one input thus runs in the next batch however many inputs bigger calls queued before it;
    within a call items keep their order.

    Within a batch items are sorted by cost (ascending) to keep similar lengths together, and
    results are scattered back to each caller's future. ``run_batch`` must return one result per
    item in the order given; it may put an ``Exception`` instance in place of a result to fail
    only that item. If ``run_batch`` raises, every item of that batch (and only that batch) gets
    the exception. Items whose caller went away (future cancelled) are dropped before running.

    The server passes its own limits (``cls_max_*`` settings; why its wait is 0:
    load_tests/results/serve/README.md#what-the-figures-say).
    ``cost`` defaults to 1 per item (then only the size and wait limits matter). ``max_queued``
    bounds the waiting items, and their summed cost to as many full batches as it makes
    (``ceil(max_queued / max_batch_size) * max_batch_tokens``): a submission that would pass either
    raises ``BatcherFull`` at once, so a flood is refused instead of queueing without end (a call
    that finds the queue empty is always taken: the callers bound one call's size).

    ``inline_items`` (0: never) lets a batch of at most that many items, taken while the batcher was idle,
    run on the event loop itself instead of the worker thread: a lone request then skips two thread
    hand-offs (the worker's wake-up and the loop's). Only for a loop with nothing to serve meanwhile (an
    engine core's, whose sockets queue what arrives); never for one that serves HTTP. Not after a batch,
    whose callers' callbacks are still pending: those run first. The engine core asks for it only where
    the encoder runs on CUDA (``Engines.batcher``): a CPU forward on the loop's thread was measured to
    multiply the tail (load_tests/results/serve/c1_local/README.md).

    Lifecycle: ``start()`` inside a running loop (``submit`` starts it lazily too), ``await
    stop()`` to drain (default) or to fail pending items with ``BatcherClosed``.
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 5.0,
        max_queued: int | None = None,
        cost: Callable[[T], int] = _unit_cost,
        name: str = "classify",
        executor: ThreadPoolExecutor | None = None,
        inline_items: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queued = max_queued
        self.cost = cost
        self.name = name
        self.inline_items = inline_items
        self._own_executor = executor is None
        self._executor = executor
        self.max_queued_cost = None if max_queued is None else math.ceil(max_queued / max_batch_size) * max_batch_tokens
        # Waiting items by call, in round-robin order (the next batch starts with the first call).
        self._calls: dict[int, deque[_Pending[T]]] = {}
        # Items in ``_calls`` and their summed cost, kept as they change: admission checks them per submission,
        # and summing a queue of hundreds each time made the engine core's loop quadratic in its depth.
        self._n_queued = 0
        self._cost_queued = 0
        self._call_ids = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._running: list[_Pending[T]] = []
        self._queue_time = QUEUE_TIME.labels(endpoint=name)
        self._batch_size = BATCH_SIZE.labels(endpoint=name)
        self._queued_gauge = QUEUED.labels(endpoint=name)

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        """True while the background task is alive."""
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the batch being executed); for backpressure."""
        return self._n_queued

    @property
    def queued_cost(self) -> int:
        """Summed cost (tokens) of the waiting items."""
        return self._cost_queued

    def start(self) -> None:
        """Start the background batching task on the running event loop (idempotent)."""
        if self._closing:
            raise BatcherClosed(f"batcher {self.name!r} is stopped")
        if self.running:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{self.name}")
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._on_loop_done)

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        """A crashed loop must not leave callers waiting forever."""
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher %r loop crashed", self.name, exc_info=task.exception())
            self._fail_all(RuntimeError(f"batcher {self.name!r} failed: {task.exception()!r}"))

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting items; with ``drain`` run what is queued first, else fail it.

        Pending items that will not run get ``BatcherClosed``. ``timeout`` bounds the drain; on
        expiry the rest is failed as with ``drain=False``.
        """
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            if drain:
                assert self._wakeup is not None
                self._wakeup.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_all(BatcherClosed(f"batcher {self.name!r} stopped before this request ran"))
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ submission

    def check_room(self, n: int, cost: int = 0) -> None:
        """Raises ``BatcherFull`` (or ``BatcherClosed``) unless ``n`` more items of summed ``cost`` may
        queue now."""
        if self._closing:
            raise BatcherClosed(f"batcher {self.name!r} is stopped")
        queued = self.queued
        if self.max_queued is not None and queued + n > self.max_queued:
            raise BatcherFull(f"{queued} of at most {self.max_queued} items already queued")
        if self.max_queued_cost is not None and queued and self.queued_cost + cost > self.max_queued_cost:
            raise BatcherFull(f"{self.queued_cost} of at most {self.max_queued_cost} tokens already queued")

    def _enqueue(self, call: int, item: T, cost: int) -> asyncio.Future[R]:
        if not self.running:
            self.start()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._calls.setdefault(call, deque()).append(_Pending(item, cost, fut, loop.time(), call))
        self._n_queued += 1
        self._cost_queued += cost
        self._queued_gauge.set(self._n_queued)
        assert self._wakeup is not None
        self._wakeup.set()
        return fut

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result (cancelling the await drops the item)."""
        cost = int(self.cost(item))
        self.check_room(1, cost)
        return await self._enqueue(next(self._call_ids), item, cost)

    def enqueue_many(self, items: Iterable[T]) -> list[asyncio.Future[R]]:
        """Queue several items at once, all or none (``BatcherFull``), as one call; a future per item, in
        input order. Cancelling one drops its item when the call's turn reaches it (until then it still
        counts against ``max_queued``). For callers that wait by callback, not by task."""
        items = list(items)
        costs = [int(self.cost(item)) for item in items]
        self.check_room(len(items), sum(costs))
        call = next(self._call_ids)
        return [self._enqueue(call, item, cost) for item, cost in zip(items, costs, strict=True)]

    async def submit_many(self, items: Iterable[T]) -> list[R]:
        """Queue several items at once, all or none (``BatcherFull``), as one call; results in input
        order. If one fails, the rest are dropped."""
        futures = self.enqueue_many(items)
        if not futures:
            return []
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise

    # ------------------------------------------------------------------ batching loop

    def _popleft(self, pending: deque[_Pending[T]]) -> None:
        """Drops the first of a call's items from the queue and its counts."""
        self._n_queued -= 1
        self._cost_queued -= pending.popleft().cost

    def _drop_cancelled_heads(self) -> None:
        """Items whose caller went away leave the front of their call's queue; empty calls leave."""
        for call, pending in list(self._calls.items()):
            while pending and pending[0].future.done():
                self._popleft(pending)
            if not pending:
                del self._calls[call]

    def _plan(self) -> tuple[list[_Pending[T]], bool]:
        """The next batch, one live item from each call in turn, and whether it is closed: the size
        is reached, or the next item in turn would pass the token budget. Linear in the queue's length."""
        turns = [iter(pending) for pending in self._calls.values()]
        batch: list[_Pending[T]] = []
        tokens = 0
        while turns:
            still = []
            for turn in turns:
                p = next((q for q in turn if not q.future.done()), None)
                if p is None:
                    continue
                if len(batch) >= self.max_batch_size or (batch and tokens + p.cost > self.max_batch_tokens):
                    return batch, True
                batch.append(p)
                tokens += p.cost
                still.append(turn)
            turns = still
        return batch, len(batch) >= self.max_batch_size or tokens >= self.max_batch_tokens

    def _take_batch(self) -> list[_Pending[T]]:
        batch, _ = self._plan()
        taken = {id(p) for p in batch}
        for call in dict.fromkeys(p.call for p in batch):  # the calls just served go to the back, in their order
            pending = self._calls.pop(call)
            # A call's taken items are its first live ones: drop them with the cancelled ones among them.
            while pending and (id(pending[0]) in taken or pending[0].future.done()):
                self._popleft(pending)
            if pending:
                self._calls[call] = pending
        self._queued_gauge.set(self._n_queued)
        return batch

    def _oldest(self) -> float:
        return min(pending[0].submitted for pending in self._calls.values())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        assert wakeup is not None
        idle = True  # no batch ran since the batcher last waited with nothing queued
        while True:
            self._drop_cancelled_heads()
            if not self._calls:
                self._queued_gauge.set(0)
                if self._closing:
                    return
                wakeup.clear()
                await wakeup.wait()
                idle = True
                continue
            deadline = self._oldest() + self.max_wait_s
            while not self._closing and not self._plan()[1]:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if batch:
                await self._execute(batch, loop, inline=idle and len(batch) <= self.inline_items)
                idle = False

    async def _execute(self, batch: list[_Pending[T]], loop: asyncio.AbstractEventLoop, inline: bool = False) -> None:
        batch.sort(key=lambda p: p.cost)  # stable: equal costs keep arrival order
        now = loop.time()
        for p in batch:
            self._queue_time.observe(now - p.submitted)
        self._batch_size.observe(len(batch))
        self._running = batch
        try:
            items = [p.item for p in batch]
            if inline:
                results = self.run_batch(items)
            else:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batcher {self.name!r}: run_batch returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed(f"batcher {self.name!r} stopped while running"))
            raise
        except Exception as exc:
            log.debug("batch of %d failed in %r: %r", len(batch), self.name, exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._running = []
        for p, res in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(res, BaseException):
                p.future.set_exception(res)
            else:
                p.future.set_result(res)

    def _fail_all(self, exc: BaseException) -> None:
        for p in [*self._running, *(p for pending in self._calls.values() for p in pending)]:
            if not p.future.done():
                p.future.set_exception(exc)
        self._calls.clear()
        self._n_queued = self._cost_queued = 0
        self._running = []
        self._queued_gauge.set(0)
