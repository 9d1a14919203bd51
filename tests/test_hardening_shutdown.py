"""Shutdown (issue 18 items 11 and 12) without models or processes, on the virtual clock: responses still
under way when the shutdown grace ends, or when a second signal skips the drain, are cut with the error a
deadline gives (a stream's last event, a whole response's 503) instead of a dropped connection; a second
signal ends the drain at once. The same against real server processes: test_live_shutdown.py."""

from __future__ import annotations

import asyncio
import json
import signal
import types
from collections.abc import AsyncIterator

import pytest
import uvicorn

from engine.llm_engine import GenerationChunk
from engine.sequence import SamplingParams
from server import metrics
from server.admission import Admission
from server.config import Settings
from server.draining import CUT_FLUSH_S, DrainingServer
from server.errors import APIError
from server.routes import generate, openai
from server.routes.common import StreamCut, until_disconnect, within_deadline
from server.services.generation import Choice, Events, _guarded, _merged, sse
from tests.virtual_clock import run_virtual

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _ready_gauge_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Draining turns the process's llm_ready gauge to 0; here it is not the process that drains."""
    monkeypatch.setattr(metrics, "READY", types.SimpleNamespace(set=lambda value: None))


CUT_AT = 2.5


class Present:
    """A client that stays connected: no message comes once its body is in."""

    async def receive(self) -> dict[str, str]:
        await asyncio.get_running_loop().create_future()
        return {"type": "http.disconnect"}


def tokens(closed_at: list[float]) -> AsyncIterator[GenerationChunk]:
    """One chunk a second, like a long generation; closing it (which aborts the engine request) is recorded."""

    async def gen() -> AsyncIterator[GenerationChunk]:
        try:
            for i in range(100):
                await asyncio.sleep(1.0)
                yield GenerationChunk(f" t{i}", None, 3, i + 1)
        finally:
            closed_at.append(asyncio.get_running_loop().time())

    return gen()


async def cut_later(admission: Admission) -> None:
    admission.cutoff()
    asyncio.get_running_loop().call_later(CUT_AT, admission.cut)


async def texts(events: Events) -> AsyncIterator[str]:
    async for _, chunk in events:
        yield sse({"text": chunk.text})


def test_a_cut_stream_ends_with_an_error_event_and_aborts_its_work() -> None:
    closed_at: list[float] = []
    choice = Choice(0, 0, [1, 2, 3], SamplingParams())

    async def main() -> tuple[list[str], float]:
        admission = Admission.from_settings(Settings())
        await cut_later(admission)
        merged = _merged([choice], [within_deadline(tokens(closed_at), 120.0, admission.cutoff())])
        events = [e async for e in _guarded(texts, merged, generate._error_event)]
        return events, asyncio.get_running_loop().time()

    events, ended = run_virtual(main())
    assert ended == pytest.approx(CUT_AT) and closed_at == [pytest.approx(CUT_AT)]
    assert [json.loads(e[6:])["text"] for e in events[:-1]] == [" t0", " t1"]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["type"] == "shutting_down" and "shut down" in error["message"]


def test_a_cut_openai_stream_ends_with_an_error_payload() -> None:
    closed_at: list[float] = []
    choice = Choice(0, 0, [1, 2, 3], SamplingParams())

    async def main() -> list[str]:
        admission = Admission.from_settings(Settings())
        await cut_later(admission)
        merged = _merged([choice], [within_deadline(tokens(closed_at), 120.0, admission.cutoff())])
        return [e async for e in _guarded(texts, merged, openai._Serve._error_event)]

    events = run_virtual(main())
    assert closed_at == [pytest.approx(CUT_AT)]
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"


def test_a_cut_whole_response_is_503_and_its_work_cancelled() -> None:
    cancelled_at: list[float] = []

    async def work() -> str:
        try:
            await asyncio.sleep(100.0)
        except asyncio.CancelledError:
            cancelled_at.append(asyncio.get_running_loop().time())
            raise
        return "done"

    async def main() -> float:
        admission = Admission.from_settings(Settings())
        await cut_later(admission)
        with pytest.raises(APIError) as err:
            await until_disconnect(Present(), work(), 120.0, admission.cutoff())  # type: ignore[arg-type]
        assert err.value.status == 503 and err.value.type == "shutting_down" and err.value.headers
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(CUT_AT)
    assert cancelled_at == [pytest.approx(CUT_AT)]


def test_a_stream_started_after_the_cut_ends_at_once() -> None:
    async def main() -> float:
        admission = Admission.from_settings(Settings())
        admission.cutoff()
        admission.cut()
        with pytest.raises(StreamCut):
            async for _ in within_deadline(tokens([]), 120.0, admission.cutoff()):
                pass
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == 0.0


def server(grace_s: float) -> tuple[DrainingServer, Admission]:
    admission = Admission.from_settings(Settings())
    config = uvicorn.Config(app=lambda: None, timeout_graceful_shutdown=grace_s)
    return DrainingServer(config, admission, grace_s, header_timeout_s=10.0), admission


def busy(admission: Admission) -> None:
    admission.generation([10], stream=True)  # a stream under way (its ticket is never released here)
    admission.cutoff()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_skips_the_drain(sig: int) -> None:
    async def main() -> tuple[DrainingServer, Admission]:
        srv, admission = server(grace_s=30.0)
        busy(admission)
        srv.handle_exit(sig, None)
        await srv.on_tick(1)
        assert admission.draining and not srv.should_exit and not admission.cutoff().done()  # draining
        srv.handle_exit(sig, None)
        await srv.on_tick(2)
        return srv, admission

    srv, admission = run_virtual(main())
    assert srv.should_exit and srv.config.timeout_graceful_shutdown == CUT_FLUSH_S
    assert admission._cutoff is not None and admission._cutoff.done()  # streams told to end first


def test_the_grace_end_cuts_what_still_runs() -> None:
    async def main() -> tuple[DrainingServer, Admission]:
        srv, admission = server(grace_s=0.0)
        busy(admission)
        srv.handle_exit(signal.SIGTERM, None)
        await srv.on_tick(1)
        return srv, admission

    srv, admission = run_virtual(main())
    assert srv.should_exit and srv.config.timeout_graceful_shutdown == CUT_FLUSH_S
    assert admission._cutoff is not None and admission._cutoff.done()


def test_a_drained_server_shuts_down_without_cutting() -> None:
    async def main() -> tuple[DrainingServer, Admission]:
        srv, admission = server(grace_s=30.0)
        admission.cutoff()
        srv.handle_exit(signal.SIGTERM, None)
        await srv.on_tick(1)
        return srv, admission

    srv, admission = run_virtual(main())
    assert srv.should_exit and admission._cutoff is not None and not admission._cutoff.done()


def test_a_stream_cancelled_while_waiting_closes_its_source() -> None:
    """A client gone mid-stream cancels the stream's task while it waits for the next chunk: the source
    must still be closed (its engine request aborted)."""
    closed_at: list[float] = []

    async def main() -> None:
        admission = Admission.from_settings(Settings())

        async def consume() -> None:
            async for _ in within_deadline(tokens(closed_at), 120.0, admission.cutoff()):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(CUT_AT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_virtual(main())
    assert closed_at == [pytest.approx(CUT_AT)]
