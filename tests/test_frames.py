"""engine/frames.py: frames over Unix sockets reach the callback whole and in each connection's order, those sent
before reading started and those split across reads too; an error in the callback stops reading and surfaces;
cancelling closes the listener and its connections; a sender never blocks its thread on a reader that does not
read, and loses nothing; a sender whose peer is gone drops frames instead of raising. Real sockets on asyncio's
event loop and on uvloop's (the API servers run uvloop when installed, the engine cores asyncio's)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from engine.frames import HEADER, Sender, _Reader, listen, read_frames

pytestmark = pytest.mark.integration


def loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    with contextlib.suppress(ImportError):
        import uvloop

        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return factories


def run(factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


class Frames(list[bytes]):
    """The frames a callback got, and an event set at each one: waiting needs no polling."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def append(self, frame: bytes) -> None:
        super().append(frame)
        self.arrived.set()

    async def reach(self, n: int, what: str) -> None:
        """Until ``n`` frames are in (the 10 s bound only turns a hang into a failure)."""
        while len(self) < n:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 10.0)
            except asyncio.TimeoutError:
                raise AssertionError(f"no {what} within 10 s (got {len(self)} of {n})") from None


async def stop(reader: asyncio.Future[None]) -> None:
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader


@pytest.mark.parametrize("factory", loop_factories())
def test_frames_arrive_in_order_including_those_sent_before_reading_started(tmp_path: Path, factory: Any) -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        listener = listen(str(tmp_path / "own"))
        first, second = Sender(str(tmp_path / "own"), loop), Sender(str(tmp_path / "own"), loop)
        for i in range(3):
            first.send(b"early %d" % i)
        got = Frames()
        reader = asyncio.ensure_future(read_frames(listener, got.append))
        await got.reach(3, "the early frames")
        for i in range(500):
            first.send(b"a%d" % i)
            second.send(b"b%d" % i)
        first.send(b"")  # an empty frame is a frame
        await got.reach(1004, "the later frames")
        await stop(reader)
        first.close()
        second.close()
        return [f for f in got if not f.startswith(b"b")], [f for f in got if f.startswith(b"b")]

    from_first, from_second = run(factory, main())
    assert from_first == [b"early 0", b"early 1", b"early 2", *(b"a%d" % i for i in range(500)), b""]
    assert from_second == [b"b%d" % i for i in range(500)]


@pytest.mark.parametrize("factory", loop_factories())
def test_a_frame_split_across_reads_arrives_whole(factory: Any) -> None:
    """A connection's reader given the stream a byte per read (length prefixes split too): no timing, every
    split point."""

    async def main() -> list[bytes]:
        got: list[bytes] = []
        reader = _Reader(got.append, asyncio.get_running_loop().create_future(), set())
        reader.connection_made(asyncio.BaseTransport())
        stream = b"".join(HEADER.pack(len(f)) + f for f in (b"one", b"two" * 100, b"three"))
        for i in range(len(stream)):
            reader.data_received(stream[i : i + 1])
        return got

    assert run(factory, main()) == [b"one", b"two" * 100, b"three"]


@pytest.mark.parametrize("factory", loop_factories())
def test_an_error_in_the_callback_stops_reading_and_is_raised(tmp_path: Path, factory: Any) -> None:
    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        listener = listen(str(tmp_path / "own"))
        sender = Sender(str(tmp_path / "own"), loop)
        got: list[bytes] = []

        def handle(frame: bytes) -> None:
            if frame == b"bad":
                raise ValueError("undecodable frame")
            got.append(frame)

        for frame in (b"a", b"bad", b"b"):
            sender.send(frame)
        with pytest.raises(ValueError, match="undecodable"):
            await asyncio.wait_for(read_frames(listener, handle), 10.0)
        sender.close()
        return got

    assert run(factory, main()) == [b"a"]


@pytest.mark.parametrize("factory", loop_factories())
def test_cancelling_closes_the_listener_and_its_connections(tmp_path: Path, factory: Any) -> None:
    async def main() -> tuple[list[bytes], bytes]:
        loop = asyncio.get_running_loop()
        listener = listen(str(tmp_path / "own"))
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(tmp_path / "own"))
        got = Frames()
        reader = asyncio.ensure_future(read_frames(listener, got.append))
        raw.sendall(HEADER.pack(1) + b"1")
        await got.reach(1, "the first frame")
        await stop(reader)
        raw.settimeout(10.0)
        end = await loop.run_in_executor(None, raw.recv, 1)  # b"": the reading side closed the connection
        raw.close()
        with pytest.raises(ConnectionRefusedError):
            Sender(str(tmp_path / "own"), loop)
        return list(got), end

    assert run(factory, main()) == ([b"1"], b"")


@pytest.mark.parametrize("factory", loop_factories())
def test_a_sender_never_blocks_its_thread_and_loses_nothing(tmp_path: Path, factory: Any) -> None:
    frames = [bytes([i % 251]) * 65536 for i in range(300)]  # ~20 MB: far beyond the socket's buffer

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        listener = listen(str(tmp_path / "own"))
        sender = Sender(str(tmp_path / "own"), loop)
        done = threading.Event()

        def engine_thread() -> None:  # nothing reads yet: what the socket cannot take waits in the sender
            for frame in frames:
                sender.send(frame)
            done.set()

        thread = threading.Thread(target=engine_thread)
        thread.start()
        await loop.run_in_executor(None, thread.join, 30.0)
        assert done.is_set(), "the sending thread blocked"
        got = Frames()
        reader = asyncio.ensure_future(read_frames(listener, got.append))
        await got.reach(len(frames), "every frame")
        await stop(reader)
        sender.close()
        return list(got)

    assert run(factory, main()) == frames


@pytest.mark.parametrize("factory", loop_factories())
def test_a_sender_whose_peer_is_gone_drops_frames_without_raising(tmp_path: Path, factory: Any) -> None:
    async def main() -> bool:
        loop = asyncio.get_running_loop()
        listener = listen(str(tmp_path / "own"))
        sender = Sender(str(tmp_path / "own"), loop)
        peer, _ = listener.accept()
        peer.close()
        listener.close()
        for _ in range(3):  # each finds the peer gone (EPIPE on AF_UNIX) and is dropped
            sender.send(b"x" * 1000)
        closed = sender.closed
        sender.close()
        return closed

    assert run(factory, main()) is True


@pytest.mark.parametrize("factory", loop_factories())
def test_an_engine_core_outlives_an_api_server_that_is_gone(tmp_path: Path, factory: Any) -> None:
    """A Hello from an API server whose path is gone by then is skipped (the core serves on and answers the
    next one); a step for an API server that went away after its Hello is dropped on the engine thread, which
    the connect it used to make at the step (and its exception) would have ended."""
    from engine.core import EngineCore
    from engine.protocol import Hello, Ready, StepOutputs, TokenOutput, decode_from_core, encode

    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = EngineCore(0, str(tmp_path / "core-0"), None, None, b"details")
        serving = asyncio.ensure_future(core.serve())
        await asyncio.sleep(0)  # serve() listens before it first awaits
        to_core = Sender(str(tmp_path / "core-0"), loop)
        to_core.send(encode(Hello(1, str(tmp_path / "never-there"))))
        frames = Frames()
        api_listener = listen(str(tmp_path / "api-0"))
        reader = asyncio.ensure_future(read_frames(api_listener, frames.append))
        to_core.send(encode(Hello(0, str(tmp_path / "api-0"))))
        await frames.reach(1, "Ready")
        ready = decode_from_core(frames[0])
        assert isinstance(ready, Ready) and ready.details == b"details" and not serving.done()
        await stop(reader)  # the API server goes away: its listener and connections close
        step = StepOutputs([TokenOutput(0, 7, None, 3, 0)], 1, 0)
        await asyncio.to_thread(core._publish_step, step)  # the engine thread: no exception
        await asyncio.to_thread(core._publish_step, step)
        assert not serving.done()
        to_core.close()
        await stop(serving)

    run(factory, main())


@pytest.mark.parametrize("factory", loop_factories())
def test_an_api_server_that_cannot_read_the_cores_frames_fails_its_work(tmp_path: Path, factory: Any) -> None:
    """A frame the API server cannot take (a bug) stops its reading: its watcher fails all work at once and
    reports the failure (the server's /ready turns 503), instead of requests waiting for the hang timeout."""
    from engine.core_client import CoreClient, CoreLink

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = CoreClient(CoreLink(0, [], str(tmp_path / "api-0")))
        client._receiver = asyncio.ensure_future(read_frames(client._listener, client._on_frame))
        Sender(str(tmp_path / "api-0"), loop).send(b"not a frame of the protocol")
        failed = asyncio.Event()
        await asyncio.wait_for(client.watch(failed.set, hang_s=3600), 10)
        assert failed.is_set() and client.error is not None and "frames failed" in client.error
        await client.close()

    run(factory, main())
