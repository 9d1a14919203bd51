"""engine/frames.py: frames off a ZeroMQ socket reach the callback in order, those that came before reading
started too; an error in the callback stops reading and surfaces; cancelling stops reading and frees the
socket's descriptor for another reader. Real sockets (inproc) on a real event loop."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq
import zmq.asyncio

from engine.frames import read_frames

pytestmark = pytest.mark.integration


class Pair:
    """A PULL socket to read and a blocking PUSH view to send to it, in one context."""

    def __init__(self, name: str) -> None:
        self.context = zmq.asyncio.Context()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.bind(f"inproc://{name}")
        self._push = self.context.socket(zmq.PUSH)  # kept: the view below does not own the socket
        self._push.connect(f"inproc://{name}")
        self.send = zmq.Socket.shadow(self._push.underlying).send

    def close(self) -> None:
        self.context.destroy(linger=0)


class Frames(list[bytes]):
    """The frames a callback got, and an event set at each one: waiting needs no polling."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def append(self, frame: bytes) -> None:
        super().append(frame)
        self.arrived.set()

    async def reach(self, n: int, what: str) -> None:
        """Until ``n`` frames are in (the 5 s bound only turns a hang into a failure)."""
        while len(self) < n:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 5.0)
            except asyncio.TimeoutError:
                raise AssertionError(f"no {what} within 5 s") from None


def test_frames_arrive_in_order_including_those_sent_before_reading_started() -> None:
    async def main() -> list[bytes]:
        sockets = Pair("order")
        push, pull = sockets, sockets.pull
        got = Frames()
        for i in range(3):
            push.send(b"early %d" % i)
        reader = asyncio.ensure_future(read_frames(pull, got.append))
        await got.reach(3, "the early frames")
        for i in range(500):
            push.send(b"%d" % i)
        await got.reach(503, "the later frames")
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sockets.close()
        return list(got)

    got = asyncio.run(main())
    assert got == [b"early 0", b"early 1", b"early 2", *(b"%d" % i for i in range(500))]


def test_an_error_in_the_callback_stops_reading_and_is_raised() -> None:
    async def main() -> list[bytes]:
        sockets = Pair("error")
        push, pull = sockets, sockets.pull
        got: list[bytes] = []

        def handle(frame: bytes) -> None:
            if frame == b"bad":
                raise ValueError("undecodable frame")
            got.append(frame)

        for frame in (b"a", b"bad", b"b"):
            push.send(frame)
        with pytest.raises(ValueError, match="undecodable"):
            await asyncio.wait_for(read_frames(pull, handle), 5.0)
        sockets.close()
        return got

    assert asyncio.run(main()) == [b"a"]


def test_cancelling_stops_reading_and_frees_the_descriptor() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        sockets = Pair("cancel")
        push, pull = sockets, sockets.pull
        first = Frames()
        reader = asyncio.ensure_future(read_frames(pull, first.append))
        push.send(b"1")
        await first.reach(1, "the first frame")
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        push.send(b"2")
        second = [await asyncio.wait_for(pull.recv(), 5.0)]  # zmq.asyncio reads the socket again
        sockets.close()
        return list(first), second

    assert asyncio.run(main()) == ([b"1"], [b"2"])
