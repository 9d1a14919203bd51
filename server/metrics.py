"""HTTP-level Prometheus metrics; engine-level ones (batches, queue wait, KV usage) are in engine/metrics.py."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from engine.metrics import LATENCY_BUCKETS

# Routes we label by name; anything else is "other" so scanners cannot blow up label cardinality.
ENDPOINTS = {"/generate", "/classify", "/health", "/ready", "/metrics"}

REQUEST_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Request latency from arrival to the last byte sent",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter("http_requests_total", "Requests by endpoint and status code", ["endpoint", "status"])
IN_FLIGHT = Gauge("http_requests_in_flight", "Requests being served", ["endpoint"])
TTFT = Histogram("llm_time_to_first_token_seconds", "Request arrival to first generated token", buckets=LATENCY_BUCKETS)
ITL = Histogram("llm_inter_token_latency_seconds", "Time between generated tokens", buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("llm_prompt_tokens_total", "Prompt tokens of finished generate requests")
GENERATED_TOKENS = Counter("llm_generated_tokens_total", "Tokens generated")
CLASSIFY_INPUTS = Counter("classify_inputs_total", "Texts classified")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class MetricsMiddleware:
    """Pure ASGI middleware: times each request until its last body chunk, so streamed responses
    count their full duration (a BaseHTTPMiddleware would stop the clock at the headers)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = 500
        done = False

        async def timed_send(message: Message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not done:
                done = True
                REQUEST_LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - start)
                REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()

        IN_FLIGHT.labels(endpoint=endpoint).inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            IN_FLIGHT.labels(endpoint=endpoint).dec()
            if not done:  # client gone or app crashed before the body finished
                REQUEST_LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - start)
                REQUESTS.labels(endpoint=endpoint, status=str(status if status != 500 else 499)).inc()
