"""Read deadlines (issue 18 item 10) without processes, on the virtual clock: a request body not all
received ``body_read_timeout_s`` after its headers gets 408 and the connection is closed; a connection
whose request headers are not complete ``header_read_timeout_s`` after it opened is closed. Both used to
wait for ever (slowloris). Against real server processes and sockets: test_live_read_deadlines.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string
from uvicorn.server import ServerState

from server.asgi import Message, Receive, Scope, Send
from server.draining import header_deadline
from server.errors import install_error_handlers
from server.middleware import BodyLimitMiddleware
from tests.virtual_clock import run_virtual

pytestmark = pytest.mark.unit

BODY_TIMEOUT_S = 7.0
HEADER_TIMEOUT_S = 10.0


def http_scope() -> Scope:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
    return {
        "type": "http",
        "method": "POST",
        "path": "/echo",
        "raw_path": b"/echo",
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("client", 1234),
        "root_path": "",
    }


def json_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    return app


def stalling_receive(first: bytes) -> Receive:
    """A client that sends ``first`` of the body it promised, then nothing."""
    stalled = asyncio.Event()
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        await stalled.wait()
        raise AssertionError("unreachable")

    return receive


def test_a_stalled_body_gets_408_at_the_deadline_and_closes_the_connection() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> float:
        middleware = BodyLimitMiddleware(json_app(), max_bytes=4096, read_timeout_s=BODY_TIMEOUT_S)
        await middleware(http_scope(), stalling_receive(b'{"text": "abc'), send)
        return asyncio.get_running_loop().time()

    assert run_virtual(main()) == pytest.approx(BODY_TIMEOUT_S)
    start = sent[0]
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]  # uvicorn then closes the connection
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "timeout" and error["field"] == "body" and "body_read_timeout_s" in error["message"]


def test_a_body_in_time_passes_and_the_wait_for_a_disconnect_is_not_bounded() -> None:
    events: list[tuple[str, float]] = []

    async def receive() -> Message:
        loop = asyncio.get_running_loop()
        if not events:
            events.append(("body", loop.time()))
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(100.0)  # the client leaves long after the body deadline
        events.append(("disconnect", loop.time()))
        return {"type": "http.disconnect"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"  # a stream's disconnect watch

    async def noop(message: Message) -> None:
        pass

    run_virtual(BodyLimitMiddleware(app, max_bytes=4096, read_timeout_s=BODY_TIMEOUT_S)(http_scope(), receive, noop))
    assert events == [("body", 0.0), ("disconnect", pytest.approx(100.0))]


class Transport(asyncio.Transport):
    """What uvicorn's protocol asks of a TCP transport; records writes and when it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_at: float | None = None
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed_at is not None

    def close(self) -> None:
        if self.closed_at is None:
            self.closed_at = asyncio.get_running_loop().time()

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def connection(http: str) -> tuple[asyncio.Protocol, Transport]:
    config = uvicorn.Config(ok_app, http=http, lifespan="off", timeout_keep_alive=60)
    config.load()
    protocol_class = header_deadline(import_from_string(HTTP_PROTOCOLS[http]), HEADER_TIMEOUT_S)
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_headers_that_trickle_in_are_cut_at_the_deadline(http: str) -> None:
    async def main() -> Transport:
        protocol, transport = connection(http)
        for i in range(5):  # a header line every few seconds: the keep-alive timer never sees an idle gap
            protocol.data_received(b"POST /generate HTTP/1.1\r\n" if i == 0 else f"X-Slow-{i}: 1\r\n".encode())
            await asyncio.sleep(3.0)
        return transport

    transport = run_virtual(main())
    assert transport.closed_at == pytest.approx(HEADER_TIMEOUT_S)


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_complete_headers_disarm_the_deadline_and_the_next_request_gets_a_fresh_one(http: str) -> None:
    async def main() -> Transport:
        protocol, transport = connection(http)
        await asyncio.sleep(9.0)
        protocol.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(5.0)  # past the first deadline: the request was answered, the connection kept
        assert transport.closed_at is None and transport.written.startswith(b"HTTP/1.1 200")
        protocol.data_received(b"GET /health HTTP/1.1\r\n")  # the next request's headers stall
        await asyncio.sleep(30.0)
        return transport

    transport = run_virtual(main())
    assert transport.closed_at == pytest.approx(9.0 + HEADER_TIMEOUT_S)  # the deadline from the response
