"""The classification queue (issue 18 item 8) on a virtual clock: batches are filled round-robin over the
waiting calls, so a small call runs in the next batch however many inputs bigger calls queued before it
(it used to wait behind all of them, first in first out), and the queue is bounded by tokens as well as
inputs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.batcher import BatcherFull, DynamicBatcher
from tests.test_batcher import Recorder
from tests.virtual_clock import InlineExecutor, run_virtual

pytestmark = pytest.mark.unit


def batcher(rec: Recorder, **kwargs: Any) -> DynamicBatcher[int, Any]:
    limits = {"max_batch_size": 8, "max_batch_tokens": 10_000, "max_wait_ms": 0, "cost": lambda i: 1}
    return DynamicBatcher(rec, executor=InlineExecutor(), **{**limits, **kwargs})


def test_a_small_call_runs_in_the_next_batch_behind_big_ones() -> None:
    rec = Recorder()

    async def main() -> None:
        b = batcher(rec)
        big = [asyncio.ensure_future(b.submit_many(range(c * 100, c * 100 + 64))) for c in (1, 2)]  # 128 inputs
        small = asyncio.ensure_future(b.submit(7))
        assert await small == 70
        await asyncio.gather(*big)
        await b.stop()

    run_virtual(main())
    assert rec.batches[0] == [100, 200, 7, 101, 201, 102, 202, 103]  # FIFO ran it in the 17th (last) batch
    assert sum(map(len, rec.batches)) == 129 and len(rec.batches) == 17


def test_calls_take_turns_and_keep_their_own_order() -> None:
    rec = Recorder()

    async def main() -> None:
        b = batcher(rec, max_batch_size=4)
        first = asyncio.ensure_future(b.submit_many([10, 11, 12, 13, 14, 15]))
        second = asyncio.ensure_future(b.submit_many([20, 21, 22]))
        await asyncio.gather(first, second)
        await b.stop()

    run_virtual(main())
    # each batch is sorted by cost (all 1 here: arrival order kept), calls alternate, served calls go back
    assert rec.batches == [[10, 20, 11, 21], [12, 22, 13, 14], [15]]


def test_the_queue_is_bounded_by_tokens_too() -> None:
    rec = Recorder()

    async def main() -> None:
        # 16 inputs queued at most, 2 batches' worth: 2 x 100 tokens
        b = batcher(rec, max_batch_size=8, max_batch_tokens=100, max_queued=16, cost=lambda i: i)
        assert b.max_queued_cost == 200
        b.check_room(4, 500)  # an empty queue takes any call (one call's size is bounded by its caller)
        queued = asyncio.ensure_future(b.submit_many([90, 90]))
        await asyncio.sleep(0)  # queued, not yet run (the batcher's task has not had its turn)
        assert b.queued_cost == 180
        with pytest.raises(BatcherFull, match="180 of at most 200 tokens"):
            await b.submit_many([10, 11])
        assert await b.submit(20) == 200  # fits: 200
        await queued
        await b.stop()

    run_virtual(main())
