"""ZeroMQ frames handed to a callback on the event loop as they arrive: a reader on the socket's file descriptor
drains every frame waiting, instead of one awaited future per frame (``zmq.asyncio``'s ``recv``: a future, its
bookkeeping and a task wake-up for each), which a lone request paid on both of its hops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
import zmq.asyncio


async def read_frames(sock: zmq.asyncio.Socket, handle: Callable[[bytes], None]) -> None:
    """Calls ``handle`` on this event loop with each frame ``sock`` receives, in order, until cancelled, or until
    ``handle`` raises: reading stops and the error is raised here."""
    loop = asyncio.get_running_loop()
    raw = zmq.Socket.shadow(sock.underlying)
    fd = raw.getsockopt(zmq.FD)
    failed: asyncio.Future[None] = loop.create_future()

    def drain() -> None:
        # The descriptor is edge-triggered: it signals again only once every waiting frame has been taken.
        try:
            while not failed.done() and raw.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                handle(raw.recv(zmq.NOBLOCK))
        except Exception as exc:
            if not failed.done():
                failed.set_exception(exc)

    loop.add_reader(fd, drain)
    try:
        loop.call_soon(drain)  # frames that arrived before the reader signal nothing more
        await failed
    finally:
        loop.remove_reader(fd)
