"""A response's head leaves with what follows it in the same event-loop turn (server/draining.py
``head_joined``): a whole response is one write to the connection, not uvicorn's two (head, then body);
a streamed response's head goes out at the end of the turn that wrote it; nothing is reordered or lost,
on either of uvicorn's HTTP protocols, over keep-alive and at a close."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn.server import ServerState

from server.asgi import ASGIApp, Receive, Scope, Send
from server.draining import head_joined, header_deadline
from tests.virtual_clock import run_virtual

pytestmark = pytest.mark.unit


class Transport(asyncio.Transport):
    """What uvicorn's protocol asks of a TCP transport; records each write and the close."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:  # type: ignore[override]
        assert not self.closed, "written after the close"
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def connection(http: str, app: ASGIApp) -> tuple[asyncio.Protocol, Transport]:
    config = uvicorn.Config(app, http=http, lifespan="off", timeout_keep_alive=60)
    config.load()
    protocol_class = header_deadline(head_joined(import_from_string(HTTP_PROTOCOLS[http])), 10.0)
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def whole(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"7")]})
    await send({"type": "http.response.body", "body": scope["path"].encode()[:7].ljust(7, b".")})


async def settle() -> None:
    for _ in range(20):  # the request's task and the end-of-turn release
        await asyncio.sleep(0)


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_whole_response_is_one_write_and_each_keep_alive_response_too(http: str) -> None:
    async def main() -> Transport:
        protocol, transport = connection(http, whole)
        protocol.data_received(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        protocol.data_received(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        return transport

    transport = run_virtual(main())
    responses = [w for w in transport.writes if w]
    assert len(responses) == 2 and not transport.closed
    assert responses[0].startswith(b"HTTP/1.1 200") and responses[0].endswith(b"\r\n\r\n/first.")
    assert responses[1].startswith(b"HTTP/1.1 200") and responses[1].endswith(b"\r\n\r\n/second")


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_streamed_head_leaves_at_the_end_of_its_turn_and_chunks_as_they_come(http: str) -> None:
    go_on = asyncio.Event()
    heads_alone: list[bool] = []

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await go_on.wait()
        heads_alone.append(len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\n"))
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    async def main() -> None:
        nonlocal transport
        protocol, transport = connection(http, stream)
        protocol.data_received(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        go_on.set()
        await settle()

    transport = Transport()
    run_virtual(main())
    assert heads_alone == [True]  # written before the first chunk, not held for it
    joined = b"".join(transport.writes)
    assert joined.startswith(b"HTTP/1.1 200") and b"one" in joined and joined.index(b"one") < joined.index(b"two")


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_held_head_is_written_before_the_connection_closes(http: str) -> None:
    async def head_only(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> Transport:
        protocol, transport = connection(http, head_only)
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await settle()
        return transport

    transport = run_virtual(main())
    assert transport.closed and b"".join(transport.writes).startswith(b"HTTP/1.1 204")
