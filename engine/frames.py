"""Frames between API servers and engine cores: length-prefixed messages over AF_UNIX stream sockets.

Each side listens on a path (:func:`listen`, read by :func:`read_frames`) and writes to the other's through
connections of its own (:class:`Sender`). A plain Unix socket wakes the reading process straight from the
writer's ``send``; ZeroMQ's ipc sockets, used here before, pass every message through an I/O thread on each
side, two thread wake-ups more per hop (measured: load_tests/results/serve/c1_local/README.md, Session 3).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")  # a frame's length in bytes, before the frame


def listen(path: str) -> socket.socket:
    """A Unix socket listening on ``path`` (a new file: its directory is the server's run directory). Bound at
    once, so that peers told of ``path`` can connect before :func:`read_frames` starts accepting."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


class _Reader(asyncio.Protocol):
    """One accepted connection: cuts what arrives into frames and hands over every complete one at once."""

    def __init__(
        self, handle: Callable[[bytes], None], failed: asyncio.Future[None], open_: set[asyncio.BaseTransport]
    ) -> None:
        self._handle = handle
        self._failed = failed
        self._open = open_
        self._partial = bytearray()  # the start of a frame whose end has not arrived (grown in place)
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._open.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self._transport is not None
        self._open.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        buffer: bytes | bytearray = data
        if self._partial:
            self._partial += data
            buffer = self._partial
        start, end = 0, len(buffer)
        while end - start >= HEADER.size and not self._failed.done():
            (size,) = HEADER.unpack_from(buffer, start)
            if end - start - HEADER.size < size:
                break
            start += HEADER.size + size
            try:
                self._handle(bytes(buffer[start - size : start]))
            except Exception as exc:
                self._failed.set_exception(exc)
        if buffer is self._partial:
            del self._partial[:start]
        else:
            self._partial += data[start:]


async def read_frames(listener: socket.socket, handle: Callable[[bytes], None]) -> None:
    """Accepts connections on ``listener`` (a socket from :func:`listen`; this takes it over) and calls ``handle``
    on this event loop with each frame they bring, each connection's in order, every frame that came in one
    read before the loop does anything else; until cancelled, or until ``handle`` raises: reading stops and the
    error is raised here. Either way the listener and its connections are closed."""
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()
    open_: set[asyncio.BaseTransport] = set()
    server = await loop.create_unix_server(lambda: _Reader(handle, failed, open_), sock=listener)
    try:
        await failed
    finally:
        server.close()
        for transport in list(open_):
            transport.close()


class Sender:
    """A connection to a peer's listening path, writing frames from one thread at a time without ever blocking it
    (the engine thread's steps, or an event loop's commands and replies): straight into the socket while the
    kernel's buffer has room, the rest kept in order and written by ``loop`` when the socket takes more, so a slow
    reader delays its own frames only and none is dropped (the socket's peer gone: frames go nowhere)."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        """Connects at once: raises ``FileNotFoundError`` or ``ConnectionRefusedError`` while nothing listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.path = path
        self.closed = False  # by close(), or the peer went away
        self._sock = sock
        self._loop = loop
        self._lock = threading.Lock()  # the sending thread's and the loop's writes, when the socket was full
        self._backlog = bytearray()

    def send(self, frame: bytes) -> None:
        """Writes ``frame`` now where the socket takes it, else queues it behind what waits; frames waiting are
        written here too where the socket has room again, not only when the loop gets to them."""
        data = HEADER.pack(len(frame)) + frame
        with self._lock:
            if self.closed:
                return
            if self._backlog:
                self._backlog += data
                self._write_backlog()
                return  # the loop's writer, still registered, unregisters once nothing waits
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._gone(exc)
                return
            if sent < len(data):
                self._backlog += data[sent:]
                self._loop.call_soon_threadsafe(self._watch)

    def _watch(self) -> None:
        with self._lock:
            if self._backlog and not self.closed:
                self._loop.add_writer(self._sock, self._flush)

    def _flush(self) -> None:
        with self._lock:
            if not self.closed:  # else the peer went away while frames waited (found by a send on another thread)
                self._write_backlog()
            if not self._backlog:
                self._loop.remove_writer(self._sock)

    def _write_backlog(self) -> None:
        """Writes what waits as far as the socket takes it (with the lock held)."""
        try:
            del self._backlog[: self._sock.send(self._backlog)]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._gone(exc)

    def _gone(self, exc: OSError) -> None:
        log.info("the peer at %s closed its connection (%s): frames to it are dropped", self.path, exc)
        self.closed = True
        self._backlog.clear()

    def close(self) -> None:
        """On ``loop``'s thread, once no other thread sends any more."""
        with self._lock:
            self.closed = True
            self._backlog.clear()
            self._loop.remove_writer(self._sock)
            self._sock.close()
