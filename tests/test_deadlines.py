"""Request deadlines and disconnect watching (server/routes/common.py) on a virtual clock: a request's work
is cancelled exactly at its deadline (504) or the moment its client leaves, and a stream ends
exactly at its deadline; the engine-side cleanup (the work's ``finally``) has run when the error surfaces.
The same paths through the real routes and models: test_robustness.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.requests import Request

from server.errors import APIError
from server.routes.common import (
    TIMEOUT_HEADER,
    ClientDisconnected,
    DeadlineExceeded,
    request_deadline,
    until_disconnect,
    within_deadline,
)
from tests.virtual_clock import run_virtual

pytestmark = pytest.mark.unit


class FakeRequest:
    """What ``until_disconnect`` asks of a request: its ASGI messages once the body is in, here a
    disconnect at ``gone_at`` (never, by default)."""

    def __init__(self, gone_at: float = float("inf")) -> None:
        self.gone_at = gone_at

    async def receive(self) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        if self.gone_at == float("inf"):
            await loop.create_future()
        await asyncio.sleep(self.gone_at - loop.time())
        return {"type": "http.disconnect"}


class Work:
    """Engine work that takes ``seconds``; records whether it finished or was cancelled, and when."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.outcome: tuple[str, float] | None = None

    async def __call__(self) -> str:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.outcome = ("cancelled", loop.time())
            raise
        self.outcome = ("done", loop.time())
        return "result"


def http_request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/generate", "headers": raw})


@pytest.mark.parametrize(("header", "expected"), [(None, 120.0), ("2.5", 2.5), ("500", 120.0)])
def test_deadline_is_the_setting_or_less_when_the_client_asks(header: str | None, expected: float) -> None:
    async def main() -> float:
        await asyncio.sleep(10)
        request = http_request({} if header is None else {TIMEOUT_HEADER: header})
        return request_deadline(request, 120.0) - asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(expected)


@pytest.mark.parametrize("header", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_timeout_header_is_400_naming_it(header: str) -> None:
    async def main() -> None:
        with pytest.raises(APIError) as err:
            request_deadline(http_request({TIMEOUT_HEADER: header}), 120.0)
        assert err.value.status == 400 and err.value.field == TIMEOUT_HEADER

    run_virtual(main())


def test_work_within_its_deadline_returns_its_result() -> None:
    work = Work(1.0)

    async def main() -> str:
        return await until_disconnect(FakeRequest(), work(), deadline=2.0)  # type: ignore[arg-type]

    assert run_virtual(main()) == "result"
    assert work.outcome == ("done", pytest.approx(1.0))


def test_work_past_its_deadline_is_cancelled_at_the_deadline_with_504() -> None:
    work = Work(10.0)

    async def main() -> float:
        with pytest.raises(APIError) as err:
            await until_disconnect(FakeRequest(), work(), deadline=2.0)  # type: ignore[arg-type]
        assert err.value.status == 504 and err.value.type == "timeout"
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(2.0)
    assert work.outcome == ("cancelled", pytest.approx(2.0))  # cleaned up before the 504 went out


def test_a_client_that_left_cancels_its_work_when_it_left() -> None:
    work = Work(10.0)
    gone_at = 0.33

    async def main() -> float:
        with pytest.raises(ClientDisconnected):
            await until_disconnect(FakeRequest(gone_at), work())  # type: ignore[arg-type]
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(gone_at)
    assert work.outcome == ("cancelled", pytest.approx(gone_at))


class BrokenRequest:
    """A request whose reading fails at ``at`` (a body limit's 408 raised from ``receive``)."""

    def __init__(self, at: float) -> None:
        self.at = at

    async def receive(self) -> dict[str, str]:
        await asyncio.sleep(self.at)
        raise APIError(408, "request body not received in time", type="timeout")


def test_an_error_reading_the_request_is_that_error_not_a_disconnect() -> None:
    work = Work(10.0)

    async def main() -> int:
        with pytest.raises(APIError) as err:
            await until_disconnect(BrokenRequest(0.5), work())  # type: ignore[arg-type]
        return err.value.status

    assert run_virtual(main()) == 408
    assert work.outcome == ("cancelled", pytest.approx(0.5))


def test_the_work_runs_in_the_callers_task_which_is_left_uncancelled_after_a_504() -> None:
    tasks: list[asyncio.Task[object] | None] = []

    async def work() -> str:
        tasks.append(asyncio.current_task())
        await asyncio.sleep(10.0)
        return "late"

    async def main() -> float:
        with pytest.raises(APIError) as err:
            await until_disconnect(FakeRequest(), work(), deadline=2.0)  # type: ignore[arg-type]
        assert err.value.status == 504 and tasks == [asyncio.current_task()]
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the 504's cancellation is withdrawn
        await asyncio.sleep(1.0)  # and none is left pending for the caller's next await
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(3.0)


def test_work_that_swallows_its_cancellation_still_ends_in_504_at_the_deadline() -> None:
    async def work() -> str:
        try:
            await asyncio.sleep(10.0)
        except asyncio.CancelledError:
            return "swallowed"
        return "late"

    async def main() -> int:
        with pytest.raises(APIError) as err:
            await until_disconnect(FakeRequest(), work(), deadline=2.0)  # type: ignore[arg-type]
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        return err.value.status

    assert run_virtual(main()) == 504


def test_a_caller_cancelled_from_outside_stays_cancelled_and_its_work_is_cleaned_up() -> None:
    work = Work(10.0)

    async def main() -> float:
        task = asyncio.ensure_future(until_disconnect(FakeRequest(), work(), deadline=5.0))  # type: ignore[arg-type]
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(10.0)  # the deadline's timer is gone with it: nothing fires at 5 s
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(11.0)
    assert work.outcome == ("cancelled", pytest.approx(1.0))


def test_a_stream_ends_at_its_deadline_and_closes_its_source() -> None:
    closed_at: list[float] = []

    async def chunks() -> AsyncIterator[int]:
        """One chunk a second, like tokens from the engine; closing it aborts the engine request."""
        try:
            for i in range(100):
                await asyncio.sleep(1.0)
                yield i
        finally:
            closed_at.append(asyncio.get_running_loop().time())

    async def main() -> tuple[list[int], float]:
        got: list[int] = []
        with pytest.raises(DeadlineExceeded):
            async for chunk in within_deadline(chunks(), deadline=2.5):
                got.append(chunk)
        return got, asyncio.get_running_loop().time()

    got, ended = run_virtual(main())
    assert got == [0, 1] and ended == pytest.approx(2.5)
    assert closed_at == [pytest.approx(2.5)]


def test_a_stream_that_finishes_in_time_passes_through() -> None:
    async def chunks() -> AsyncIterator[str]:
        for text in ("a", "b", "c"):
            await asyncio.sleep(0.5)
            yield text

    async def main() -> list[str]:
        return [c async for c in within_deadline(chunks(), deadline=2.0)]

    assert run_virtual(main()) == ["a", "b", "c"]
