"""Pure ASGI middleware guarding the edge: request body size and API keys. Pure ASGI (not
BaseHTTPMiddleware) so that streamed responses pass through untouched. Also the prefix-cache salt of
an authenticated request (:func:`cache_salt`)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from fastapi import Request
from starlette.exceptions import HTTPException

from server.asgi import ASGIApp, HTTPMiddleware, Message, Receive, Scope, Send
from server.errors import respond


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class BodyLimitMiddleware(HTTPMiddleware):
    """413 for a body over ``max_bytes``: at once when ``Content-Length`` says so, else as soon as the
    streamed (chunked) body passes the limit, so an oversized upload is never buffered whole. 408 (and
    the connection closed) for a body not all received ``read_timeout_s`` after its headers: a client
    that promises a body and stalls (slowloris) holds a connection and a task for a bounded time only."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    def _too_large(self) -> str:
        return f"request body exceeds {self.max_bytes} bytes (max_body_bytes)"

    def _too_slow(self) -> HTTPException:
        message = f"request body not received within {self.read_timeout_s:g} s (body_read_timeout_s)"
        return HTTPException(408, message, headers={"Connection": "close"})

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = respond(Request(scope), 413, "payload_too_large", self._too_large(), "body")
            await response(scope, receive, send)
            return
        received, complete = 0, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what follows is the wait for a disconnect, unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise self._too_slow() from None  # the app's error handlers shape it
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)


def _digest(token: bytes) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the key lengths are.
    return hashlib.sha256(token).digest()


_SALT = "cache_salt"  # key in the ASGI scope's "state" (Starlette's request.state)


def _salt(digest: bytes) -> str:
    """A one-way name for a key (from its digest, with a purpose prefix): equal keys, equal salts."""
    return hashlib.sha256(b"lowlat prefix-cache salt\0" + digest).hexdigest()


def cache_salt(scope_or_request: Scope | Request) -> str | None:
    """The prefix-cache salt of the request (``SamplingParams.cache_salt``): a hash of its API key, so
    requests share cached prompt blocks only with requests made with the same key; None when auth is
    off, on an open path, or when the operator shares the cache across keys (``AuthMiddleware``'s
    ``share_prefix_cache``)."""
    scope = scope_or_request.scope if isinstance(scope_or_request, Request) else scope_or_request
    return scope.get("state", {}).get(_SALT)


class AuthMiddleware(HTTPMiddleware):
    """Bearer API keys. Every configured key is compared in constant time (``hmac.compare_digest``
    over SHA-256 digests, no early exit); ``open_paths`` (the probes) need no key. An authorized
    request carries its key's prefix-cache salt (:func:`cache_salt`) unless ``share_prefix_cache``."""

    def __init__(
        self, app: ASGIApp, keys: list[bytes], open_paths: frozenset[str], share_prefix_cache: bool = False
    ) -> None:
        super().__init__(app)
        self.digests = [_digest(k) for k in keys]
        self.open_paths = open_paths
        self.share_prefix_cache = share_prefix_cache

    def authorized(self, scope: Scope) -> bytes | None:
        """The digest of the presented key if it is an accepted one, else None."""
        header = _header(scope, b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        presented = _digest(token.strip())
        ok = False
        for digest in self.digests:
            ok |= hmac.compare_digest(presented, digest)
        return presented if ok else None

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        digest = self.authorized(scope)
        if digest is not None:
            if not self.share_prefix_cache:
                scope.setdefault("state", {})[_SALT] = _salt(digest)
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
