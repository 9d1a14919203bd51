"""DynamicBatcher semantics on a virtual clock: batch size, token budget, wait window, failures, shutdown.

Most tests run batches inline on the loop's thread (``InlineExecutor``), so the order of events is fixed
and the loop's time at each batch is exact; the two that need the real worker thread hold it with events.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import REGISTRY

from engine.batcher import BatcherClosed, BatcherFull, DynamicBatcher
from tests.virtual_clock import InlineExecutor, run_virtual

pytestmark = pytest.mark.unit


class Recorder:
    """An inline run_batch that records each batch and the loop time it ran at; returns ``item * 10``."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list[int]] = []
        self.times: list[float] = []
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.times.append(asyncio.get_running_loop().time())
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [i * 10 for i in items]


def inline_batcher(run_batch: Callable[[list[int]], Sequence[Any]], **kwargs: Any) -> DynamicBatcher[int, Any]:
    return DynamicBatcher(run_batch, executor=InlineExecutor(), **kwargs)


class Gate:
    """A run_batch for the real worker thread: tells the loop it started, then waits to be released."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.started = asyncio.Event()
        self.release = threading.Event()
        self.threads: set[int] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.loop.call_soon_threadsafe(self.started.set)
        assert self.release.wait(timeout=30), "the test never released the batch"
        return [i * 10 for i in items]


def test_max_batch_size_closes_batches_at_once() -> None:
    rec = Recorder()

    async def main() -> list[int]:
        b = inline_batcher(rec, max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=50)
        res = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.stop()
        return list(res)

    assert run_virtual(main()) == [i * 10 for i in range(10)]
    assert rec.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rec.times == [0.0, 0.0, pytest.approx(0.05)]  # full batches go at once; the rest waits its window


def test_token_budget_closes_batches_and_an_oversized_item_runs_alone() -> None:
    rec = Recorder()

    async def main() -> list[int]:
        b = inline_batcher(rec, max_batch_size=32, max_batch_tokens=10, max_wait_ms=50, cost=lambda i: i)
        res = await b.submit_many([4, 4, 4, 30, 3, 3])
        await b.stop()
        return res

    assert run_virtual(main()) == [40, 40, 40, 300, 30, 30]
    # costs 4,4,4 -> [4,4] then [4] (the next would pass 10); 30 is over the budget alone; then [3,3]
    assert rec.batches == [[4, 4], [4], [30], [3, 3]]
    assert rec.times == [0.0, 0.0, 0.0, pytest.approx(0.05)]


def test_single_item_waits_exactly_max_wait() -> None:
    rec = Recorder()

    async def main() -> float:
        b = inline_batcher(rec, max_batch_size=8, max_batch_tokens=100, max_wait_ms=40)
        assert await b.submit(7) == 70
        await b.stop()
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(0.04)
    assert rec.batches == [[7]] and rec.times == [pytest.approx(0.04)]


def test_wait_counts_from_the_first_item() -> None:
    rec = Recorder()

    async def main() -> None:
        b = inline_batcher(rec, max_batch_size=8, max_batch_tokens=100, max_wait_ms=400)
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.25)
        second = asyncio.ensure_future(b.submit(2))
        assert await asyncio.gather(first, second) == [10, 20]
        await b.stop()

    run_virtual(main())
    assert rec.batches == [[1, 2]]
    assert rec.times == [pytest.approx(0.4)]  # not 0.65: the second item did not restart the window


def test_sorts_by_cost_and_keeps_order_for_submit_many() -> None:
    rec = Recorder()

    async def main() -> list[int]:
        b = inline_batcher(rec, max_batch_size=8, max_batch_tokens=100, max_wait_ms=20, cost=lambda i: i)
        res = await b.submit_many([5, 1, 9, 3, 7])
        await b.stop()
        return res

    assert run_virtual(main()) == [50, 10, 90, 30, 70]
    assert rec.batches == [[1, 3, 5, 7, 9]]


def test_an_exception_fails_only_its_batch() -> None:
    rec = Recorder(fail_on=13)

    async def main() -> list[object]:
        b = inline_batcher(rec, max_batch_size=2, max_batch_tokens=100, max_wait_ms=20)
        res = await asyncio.gather(*(b.submit(i) for i in (11, 13, 15, 17)), return_exceptions=True)
        await b.stop()
        return res

    res = run_virtual(main())
    assert rec.batches == [[11, 13], [15, 17]]
    assert isinstance(res[0], ValueError) and isinstance(res[1], ValueError)
    assert res[2:] == [150, 170]


def test_an_exception_in_place_of_a_result_fails_only_its_item() -> None:
    def run(items: list[int]) -> list[int | Exception]:
        return [ValueError("odd") if i % 2 else i for i in items]

    async def main() -> list[object]:
        b = inline_batcher(run, max_batch_size=8, max_batch_tokens=100, max_wait_ms=10)
        res = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        await b.stop()
        return res

    res = run_virtual(main())
    assert res[0] == 0 and res[2] == 2
    assert isinstance(res[1], ValueError) and isinstance(res[3], ValueError)


def test_a_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        b = inline_batcher(lambda items: items[:-1], max_wait_ms=0)
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await b.submit_many([1, 2])
        await b.stop()

    run_virtual(main())


def test_cancelled_items_are_skipped() -> None:
    rec = Recorder()

    async def main() -> None:
        b = inline_batcher(rec, max_batch_size=8, max_batch_tokens=100, max_wait_ms=50)
        keep, gone, keep2 = (asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3))
        await asyncio.sleep(0)  # the three submissions queue
        assert b.queued == 3
        gone.cancel()
        assert await keep == 10 and await keep2 == 30
        with pytest.raises(asyncio.CancelledError):
            await gone
        await b.stop()

    run_virtual(main())
    assert rec.batches == [[1, 3]]


def test_submit_many_failure_drops_the_rest() -> None:
    ran: list[list[int]] = []

    def run(items: list[int]) -> list[int | Exception]:
        ran.append(items)
        return [ValueError("bad") if i == 0 else i for i in items]

    async def main() -> None:
        b = inline_batcher(run, max_batch_size=1, max_batch_tokens=100, max_wait_ms=5)
        with pytest.raises(ValueError):
            await b.submit_many([0, 1, 2])
        assert await b.submit_many([]) == []
        await b.stop()

    run_virtual(main())
    # The batcher took item 1 before the caller saw item 0 fail; item 2 was dropped, never run.
    assert ran == [[0], [1]]


def test_max_queued_refuses_a_flood_all_or_none() -> None:
    async def main() -> None:
        b = inline_batcher(Recorder(), max_batch_size=8, max_batch_tokens=100, max_wait_ms=10, max_queued=3)
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(BatcherFull):
            await b.submit_many([7, 8])  # 2 + 2 > 3: neither queues
        assert b.queued == 2
        assert await b.submit(2) == 20
        assert [f.result() for f in queued] == [0, 10]
        await b.stop()

    run_virtual(main())


def test_batches_run_on_one_worker_thread_while_the_loop_stays_responsive() -> None:
    async def main() -> None:
        gate = Gate(asyncio.get_running_loop())
        b = DynamicBatcher(gate, max_batch_size=8, max_batch_tokens=100, max_wait_ms=0)
        result = asyncio.ensure_future(b.submit(1))
        await gate.started.wait()
        assert not result.done()  # the batch is blocked in its thread while the loop runs this test
        gate.release.set()
        assert await result == 10
        assert await b.submit(2) == 20
        await b.stop()
        assert len(gate.threads) == 1 and threading.get_ident() not in gate.threads

    run_virtual(main())


def test_inline_items_runs_a_small_batch_taken_when_idle_on_the_loop_and_the_rest_on_the_worker() -> None:
    threads: list[tuple[list[int], int]] = []

    def run(items: list[int]) -> list[int]:
        threads.append((list(items), threading.get_ident()))
        return [i * 10 for i in items]

    async def main() -> None:
        loop_thread = threading.get_ident()
        b = DynamicBatcher(run, max_batch_size=1, max_batch_tokens=100, max_wait_ms=0, inline_items=1)
        assert await b.submit(1) == 10  # alone, the batcher idle: on the loop
        # Three calls queued at once: the first batch is taken when idle, the next ones after a batch.
        assert await asyncio.gather(b.submit(2), b.submit(3), b.submit(4)) == [20, 30, 40]
        b.max_batch_size = 8
        assert await b.submit_many([5, 6]) == [50, 60]  # over inline_items: on the worker
        await b.stop()
        on_loop = [items for items, thread in threads if thread == loop_thread]
        assert on_loop == [[1], [2]]
        assert [items for items, thread in threads if thread != loop_thread] == [[3], [4], [5, 6]]

    run_virtual(main())


def test_stop_drains_the_queue() -> None:
    rec = Recorder()

    async def main() -> None:
        b = inline_batcher(rec, max_batch_size=1, max_batch_tokens=100, max_wait_ms=1)
        futures = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        await b.stop()
        assert [f.result() for f in futures] == [0, 10, 20]
        with pytest.raises(BatcherClosed):
            await b.submit(1)

    run_virtual(main())


def test_stop_without_drain_fails_the_running_and_the_queued() -> None:
    worker = ThreadPoolExecutor(max_workers=1)

    async def main() -> None:
        gate = Gate(asyncio.get_running_loop())
        b = DynamicBatcher(gate, max_batch_size=1, max_batch_tokens=100, max_wait_ms=0, executor=worker)
        futures = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await gate.started.wait()  # the first batch is running
        await b.stop(drain=False)
        gate.release.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, BatcherClosed) for r in results)
        assert "stopped while running" in str(results[0]) and "stopped before" in str(results[1])

    run_virtual(main())
    worker.shutdown(wait=True)  # the released batch finishes in its thread, its result unused


def test_metrics() -> None:
    name = "t_metrics"

    def sample(metric: str) -> float:
        return REGISTRY.get_sample_value(metric, {"endpoint": name}) or 0.0

    before_batches = sample("llm_batch_size_count")
    before_items = sample("llm_batch_size_sum")
    before_waits = sample("llm_queue_time_seconds_count")
    before_wait_sum = sample("llm_queue_time_seconds_sum")

    async def main() -> None:
        b = inline_batcher(Recorder(), max_batch_size=3, max_batch_tokens=100, max_wait_ms=5, name=name)
        await b.submit_many(range(5))
        assert b.queued == 0
        await b.stop()

    run_virtual(main())
    assert sample("llm_batch_size_count") - before_batches == 2
    assert sample("llm_batch_size_sum") - before_items == 5
    assert sample("llm_queue_time_seconds_count") - before_waits == 5
    # the first three went at once, the last two waited their 5 ms window
    assert sample("llm_queue_time_seconds_sum") - before_wait_sum == pytest.approx(2 * 0.005)
    assert REGISTRY.get_sample_value("llm_queued_requests", {"endpoint": name}) == 0


def test_queued_counts_stay_the_sums_of_the_queue_through_every_path() -> None:
    """``queued`` and ``queued_cost`` are kept as items come and go (not summed per call): after random
    submissions, cancellations of whole calls and of single items, batches and a stop, they equal the sums
    over what is queued."""
    rng = random.Random(0)

    async def main() -> None:
        b = DynamicBatcher(
            lambda items: items, max_batch_size=4, max_batch_tokens=12, max_wait_ms=0, max_queued=40,
            cost=lambda x: x, executor=InlineExecutor(),
        )  # fmt: skip
        b.start()
        calls: list[list[asyncio.Future[Any]]] = []

        def check() -> None:
            pending = [p for call in b._calls.values() for p in call]
            assert b.queued == len(pending) and b.queued_cost == sum(p.cost for p in pending)

        for _ in range(300):
            action = rng.random()
            if action < 0.5:
                with contextlib.suppress(BatcherFull):
                    calls.append(b.enqueue_many([rng.randint(1, 6) for _ in range(rng.randint(1, 4))]))
            elif action < 0.65 and calls:
                for fut in calls.pop(rng.randrange(len(calls))):
                    fut.cancel()
            elif action < 0.75 and calls:
                rng.choice(rng.choice(calls)).cancel()
            else:
                for _ in range(rng.randint(1, 5)):
                    await asyncio.sleep(0)
            check()
        await b.stop(drain=False)
        check()
        assert b.queued == 0 and b.queued_cost == 0

    run_virtual(main())
