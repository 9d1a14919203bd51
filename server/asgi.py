"""ASGI types, the base of the server's pure ASGI middleware, and the one ``send`` wrapper they share
(request ids and the access log, HTTP metrics): they must see a response's status and the moment its
last body chunk went out, which a ``BaseHTTPMiddleware`` would report at the headers for a streamed
response."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HTTPMiddleware(ABC):
    """Pure ASGI middleware (streamed responses pass through untouched) that acts on HTTP requests only:
    other scopes (lifespan) go straight to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request, normally by calling ``self.app``."""


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
