"""ASGI types and the one ``send`` wrapper shared by the server's pure ASGI middleware (request ids and
the access log, HTTP metrics): they must see a response's status and the moment its last body chunk
went out, which a ``BaseHTTPMiddleware`` would report at the headers for a streamed response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class WatchedSend:
    """``send`` that records the response's status, appends ``headers`` to its start message, and calls
    ``on_end(status)`` once, after the last body chunk has been sent (``done`` is then True)."""

    def __init__(self, send: Send, on_end: Callable[[int], None], headers: list[tuple[bytes, bytes]] | None = None):
        self._send = send
        self._on_end = on_end
        self._headers = headers or []
        self.status = 0
        self.done = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self._headers:
                message["headers"] = [*message.get("headers", []), *self._headers]
        await self._send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False) and not self.done:
            self.done = True
            self._on_end(self.status)
