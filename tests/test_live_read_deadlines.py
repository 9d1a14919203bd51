"""Read deadlines against real server processes and raw sockets, in both layouts (issue 18 item 10): a
client that promised a body and stalls gets 408 and a closed connection, one whose headers trickle in or
never come is disconnected; each within its deadline (here 1 s) rather than never."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import LAYOUTS, server_process

pytestmark = pytest.mark.live

TIMEOUT_S = 1.0


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(request: pytest.FixtureRequest, cache_dir: Path) -> Iterator[tuple[str, int]]:
    args = (*LAYOUTS[request.param], "--no-enable-classify")
    with server_process(cache_dir, *args, header_read_timeout_s=TIMEOUT_S, body_read_timeout_s=TIMEOUT_S) as (_, url):
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        yield parts.hostname, parts.port


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, received = time.monotonic(), b""
    sock.settimeout(30)
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - start


def test_a_stalled_body_gets_408_and_the_connection_closed(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as sock:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head + b'{"prompt": "hel')  # 15 of the 1,000 bytes promised
        received, took = until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"body_read_timeout_s" in received
    assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + 5


@pytest.mark.parametrize("sent", [b"", b"POST /generate HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half the headers"])
def test_a_connection_without_complete_headers_is_closed(server: tuple[str, int], sent: bytes) -> None:
    with socket.create_connection(server) as sock:
        sock.sendall(sent)
        received, took = until_closed(sock)
    assert received == b"" and took < TIMEOUT_S + 5
