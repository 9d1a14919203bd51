"""Pure ASGI middleware guarding the edge: request body size and API keys. Pure ASGI (not
BaseHTTPMiddleware) so that streamed responses pass through untouched."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException

from server.errors import respond

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once when ``Content-Length`` says so, else as soon as the
    streamed (chunked) body passes the limit, so an oversized upload is never buffered whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"request body exceeds {self.max_bytes} bytes (max_body_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = respond(Request(scope), 413, "payload_too_large", self._too_large(), "body")
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())  # the app's error handlers shape it
            return message

        await self.app(scope, limited, send)


def _digest(token: bytes) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the key lengths are.
    return hashlib.sha256(token).digest()


class AuthMiddleware:
    """Bearer API keys. Every configured key is compared in constant time (``hmac.compare_digest``
    over SHA-256 digests, no early exit); ``open_paths`` (the probes) need no key."""

    def __init__(self, app: ASGIApp, keys: list[bytes], open_paths: frozenset[str]) -> None:
        self.app = app
        self.digests = [_digest(k) for k in keys]
        self.open_paths = open_paths

    def authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return False
        presented = _digest(token.strip())
        ok = False
        for digest in self.digests:
            ok |= hmac.compare_digest(presented, digest)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        response = respond(
            Request(scope),
            401,
            "unauthorized",
            "a valid API key is required: 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="lowlat-server"'},
        )
        await response(scope, receive, send)
