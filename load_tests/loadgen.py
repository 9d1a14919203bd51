"""Load generator: closed-loop (fixed concurrency) and open-loop (Poisson) traffic over HTTP.

Measures what a user of a streaming LLM API feels (latency, time to first token, inter-token
latency) and what an operator pays for (throughput, errors by status), for our server's
``/generate`` and ``/classify`` and for any OpenAI-compatible server, so peers can be measured
with the same tool.

Python API (one call runs a whole sweep and returns per-level summaries)::

    from load_tests.loadgen import make_scenario, run_sweep_sync
    result = run_sweep_sync("http://127.0.0.1:8000", make_scenario("generate-stream", max_tokens=16),
                            concurrencies=[1, 4], requests=20, duration=30)
    summary = result.levels[0].summary          # LevelSummary: ok, errors, latency_ms["p50"], ...

CLI: ``python -m load_tests.loadgen --help``.

Safety: only loopback targets unless ``allow_remote``; every level is bounded by a request count
*and* a duration, and every request by a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import ipaddress
import itertools
import json
import math
import os
import platform
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

SCHEMA_VERSION = 1

Message = dict[str, str]
PromptItem = str | list[Message]
"""A prompt is either plain text or a chat conversation (list of {"role", "content"})."""

BUILTIN_PROMPTS: tuple[PromptItem, ...] = (
    "How do I reset my password?",
    "My order hasn't arrived yet. It was supposed to be delivered three days ago. What should I do?",
    "Can I change the shipping address on an order I already placed?",
    "I was charged twice for the same purchase. How do I get a refund?",
    "What is your return policy for items bought on sale?",
    "How can I cancel my subscription before the next billing cycle?",
    "The app keeps crashing when I try to upload a photo. Any ideas?",
    "Do you ship internationally, and how long does it take to reach Canada?",
    "I received the wrong size. Can I exchange it for a larger one?",
    "How do I update the credit card on my account?",
    "Is there a student discount available?",
    "My promo code says it's invalid, but it doesn't expire until next month.",
    "Can you explain the difference between the basic and premium plans?",
    "I forgot which email address I used to sign up. How can I find my account?",
    "The package arrived damaged. The box was crushed and the item is broken.",
    "How do I enable two-factor authentication?",
    "Write a short, polite reply to a customer asking when their refund will be processed.",
    "Summarize our refund policy in two sentences for a customer.",
    "Why was my account suspended?",
    "Can I speak to a human agent, please?",
    [
        {"role": "system", "content": "You are a helpful customer-service assistant. Be concise."},
        {"role": "user", "content": "Hi, I'd like to return a pair of shoes I bought last week."},
    ],
    [
        {"role": "user", "content": "My internet has been dropping every evening."},
        {"role": "assistant", "content": "Sorry to hear that. Have you tried restarting your router?"},
        {"role": "user", "content": "Yes, twice. It still disconnects around 8pm."},
    ],
    [
        {"role": "system", "content": "You answer billing questions for a streaming service."},
        {"role": "user", "content": "Why did my monthly bill go up this month?"},
    ],
    [
        {"role": "user", "content": "Where is my order #48213?"},
        {"role": "assistant", "content": "It shipped yesterday and should arrive in 2-3 days."},
        {"role": "user", "content": "Can I get it delivered to my office instead?"},
    ],
)

DEFAULT_LABELS: tuple[str, ...] = (
    "billing",
    "shipping",
    "returns and refunds",
    "account access",
    "technical problem",
    "cancellation",
    "product question",
)

SCENARIO_NAMES: tuple[str, ...] = (
    "generate",
    "generate-stream",
    "classify",
    "openai-chat",
    "openai-chat-stream",
    "openai-completions",
    "openai-completions-stream",
)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Read prompts from a file, so benchmarks can use realistic traffic.

    ``.jsonl``: one JSON value per line: a string, a list of messages, or an object with
    ``"prompt"``, ``"text"`` or ``"messages"``. Anything else: one prompt per non-blank line.
    """
    p = Path(path)
    items: list[PromptItem] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            value = json.loads(line)
            if isinstance(value, dict):
                value = value.get("messages") or value.get("prompt") or value.get("text")
            if isinstance(value, str) and value:
                items.append(value)
            elif isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
                items.append([{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value])
            else:
                raise ValueError(f"{p}:{n}: expected a string, a message list, or prompt/text/messages")
    else:
        items = [line.strip() for line in lines if line.strip()]
    if not items:
        raise ValueError(f"{p}: no prompts")
    return items


def as_messages(item: PromptItem) -> list[Message]:
    """Chat form of a prompt (plain text becomes one user message)."""
    return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)


def as_text(item: PromptItem) -> str:
    """Text form of a prompt, for text-only endpoints: the last user message of a conversation."""
    if isinstance(item, str):
        return item
    users = [m["content"] for m in item if m.get("role") == "user"]
    return users[-1] if users else item[-1]["content"]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as numpy's default (``method="linear"``): position ``(n - 1) * q / 100`` in
    the sorted data, interpolated between its neighbours. None for no data (JSON null), so an
    empty level never reports a fake 0 ms.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _stats_ms(values_s: Sequence[float], *, extra: bool = False) -> dict[str, float | None]:
    """p50/p90/p99 (and mean/max when ``extra``) of durations in seconds, as milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    out: dict[str, float | None] = {f"p{q}": _round(percentile(ms, q)) for q in (50, 90, 99)}
    if extra:
        out["mean"] = _round(sum(ms) / len(ms)) if ms else None
        out["max"] = _round(max(ms)) if ms else None
    return out


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# --------------------------------------------------------------------------------------------
# Target safety
# --------------------------------------------------------------------------------------------


class TargetRefused(ValueError):
    """The target URL is not allowed (non-loopback without allow_remote, or not http/https)."""


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals. No DNS: a name could resolve anywhere."""
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_target(url: str, allow_remote: bool = False) -> None:
    """Refuse targets other than this machine's loopback unless explicitly allowed.

    A load generator pointed at someone else's server is a denial-of-service tool; the default
    must be harmless.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"target {url!r} is not an http(s) URL with a host")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise TargetRefused(
            f"refusing non-loopback target host {parts.hostname!r}: load testing a remote server "
            "can disrupt it; pass --allow-remote (allow_remote=True) if you own it"
        )


def resolve_url(base_url: str, path: str) -> str:
    """Join a base URL and an endpoint path, accepting OpenAI-style base URLs ending in ``/v1``."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path


# --------------------------------------------------------------------------------------------
# Server-sent events
# --------------------------------------------------------------------------------------------


@dataclass
class SSEEvent:
    """One dispatched server-sent event."""

    data: str
    event: str = "message"


class SSEDecoder:
    """Incremental SSE decoder (WHATWG rules): lines end in CRLF, LF or CR; blank line dispatches.

    Own line splitting instead of ``httpx.aiter_lines`` because that splits on every Unicode line
    separator (U+2028 ...), which may legally appear unescaped inside a JSON ``data:`` payload.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""

    def feed_line(self, line: str) -> SSEEvent | None:
        """Process one line (without its terminator); return an event when a blank line ends one."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(data="\n".join(self._data), event=self._event or "message")
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Process raw bytes from the wire; return the events they complete."""
        buf = self._buf + chunk
        events: list[SSEEvent] = []
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            c = buf[i]
            if c in (0x0A, 0x0D):  # \n or \r
                if c == 0x0D and i + 1 == n:
                    break  # a trailing CR might be half of CRLF: wait for more bytes
                ev = self.feed_line(buf[start:i].decode("utf-8", errors="replace"))
                if ev is not None:
                    events.append(ev)
                if c == 0x0D and buf[i + 1] == 0x0A:
                    i += 1
                start = i + 1
            i += 1
        self._buf = buf[start:]
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch whatever is pending (tolerates a missing final blank line)."""
        events: list[SSEEvent] = []
        if self._buf:
            ev = self.feed_line(self._buf.decode("utf-8", errors="replace"))
            self._buf = b""
            if ev is not None:
                events.append(ev)
        ev = self.feed_line("")
        if ev is not None:
            events.append(ev)
        return events


@dataclass
class StreamEvent:
    """What a scenario extracts from one SSE event."""

    text: str = ""
    completion_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # the stream is over (our final event, or OpenAI's [DONE])
    error: str | None = None


def _usage_tokens(obj: dict[str, Any]) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    return None


def _error_text(obj: Any) -> str | None:
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    return None


def parse_generate_event(ev: SSEEvent) -> StreamEvent:
    """Parse our ``/generate`` stream: ``{"text"}`` per chunk, last one adds finish_reason/usage."""
    obj = json.loads(ev.data)
    err = _error_text(obj)
    if err is not None or ev.event == "error":
        return StreamEvent(error=err or ev.data, done=True)
    finish = obj.get("finish_reason")
    return StreamEvent(
        text=obj.get("text") or "",
        completion_tokens=_usage_tokens(obj),
        finish_reason=finish,
        done=finish is not None,
    )


def parse_openai_event(ev: SSEEvent) -> StreamEvent:
    """Parse an OpenAI chat/completions stream chunk (``delta.content`` or ``text``; ``[DONE]``)."""
    if ev.data.strip() == "[DONE]":
        return StreamEvent(done=True)
    obj = json.loads(ev.data)
    err = _error_text(obj)
    if err is not None or ev.event == "error":
        return StreamEvent(error=err or ev.data, done=True)
    text = ""
    finish = None
    choices = obj.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else None) or choice.get("text") or ""
        finish = choice.get("finish_reason")
    return StreamEvent(text=text, completion_tokens=_usage_tokens(obj), finish_reason=finish)


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


class BadResponse(Exception):
    """A 2xx response whose body does not have the expected shape."""


class StreamError(Exception):
    """The server reported an error inside a stream."""


class IncompleteStream(Exception):
    """The stream ended without a final event (finish_reason / [DONE])."""


@dataclass(frozen=True)
class Scenario:
    """How to build one request and read its response.

    ``make_body`` draws from the level's seeded RNG so a run is reproducible; ``parse_event``
    turns an SSE event into text/usage (streaming scenarios); ``parse_whole`` returns the output
    token count of a whole JSON response and raises BadResponse when its shape is wrong.
    """

    name: str
    path: str
    make_body: Callable[[random.Random], dict[str, Any]]
    stream: bool = False
    parse_event: Callable[[SSEEvent], StreamEvent] | None = None
    parse_whole: Callable[[Any], int] = lambda data: 0
    items_per_request: int = 1
    description: str = ""


def _pick(rng: random.Random, prompts: Sequence[PromptItem]) -> PromptItem:
    return prompts[rng.randrange(len(prompts))]


def _sampling(
    rng: random.Random,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float | None,
    stop: Sequence[str] | None,
    request_seed: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if top_p is not None:
        body["top_p"] = top_p
    if stop:
        body["stop"] = list(stop)
    if request_seed:
        body["seed"] = rng.randrange(2**31)
    return body


def _whole_generate(data: Any) -> int:
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise BadResponse("expected {'text': str, ...}")
    return _usage_tokens(data) or 0


def _whole_openai(data: Any) -> int:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BadResponse("expected {'choices': [...], ...}")
    return _usage_tokens(data) or 0


def generate_scenario(
    *,
    stream: bool = False,
    prompts: Sequence[PromptItem] = BUILTIN_PROMPTS,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    stop: Sequence[str] | None = None,
    request_seed: bool = False,
    use_messages: bool = False,
) -> Scenario:
    """Our ``POST /generate`` (prompt or messages), whole or streamed."""
    prompts = tuple(prompts)

    def make_body(rng: random.Random) -> dict[str, Any]:
        item = _pick(rng, prompts)
        body: dict[str, Any] = (
            {"messages": as_messages(item)} if use_messages or not isinstance(item, str) else {"prompt": item}
        )
        body.update(
            _sampling(
                rng,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stop,
                request_seed=request_seed,
            )
        )
        if top_k is not None:
            body["top_k"] = top_k
        body["stream"] = stream
        return body

    return Scenario(
        name="generate-stream" if stream else "generate",
        path="/generate",
        make_body=make_body,
        stream=stream,
        parse_event=parse_generate_event if stream else None,
        parse_whole=_whole_generate,
        description=f"POST /generate max_tokens={max_tokens} temperature={temperature}",
    )


def classify_scenario(
    *,
    prompts: Sequence[PromptItem] = BUILTIN_PROMPTS,
    labels: Sequence[str] | None = DEFAULT_LABELS,
    multi_label: bool = False,
    batch_size: int = 1,
) -> Scenario:
    """Our ``POST /classify``; ``batch_size`` > 1 sends a list of inputs per request."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    texts = tuple(as_text(p) for p in prompts)

    def make_body(rng: random.Random) -> dict[str, Any]:
        picked = [texts[rng.randrange(len(texts))] for _ in range(batch_size)]
        body: dict[str, Any] = {
            "inputs": picked[0] if batch_size == 1 else picked,
            "multi_label": multi_label,
        }
        if labels:
            body["labels"] = list(labels)
        return body

    def parse_whole(data: Any) -> int:
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise BadResponse("expected {'results': [...]}")
        return 0

    return Scenario(
        name="classify",
        path="/classify",
        make_body=make_body,
        parse_whole=parse_whole,
        items_per_request=batch_size,
        description=f"POST /classify batch_size={batch_size} labels={len(labels or ())}",
    )


def _openai_scenario(
    name: str,
    path: str,
    prompt_field: Callable[[random.Random], dict[str, Any]],
    *,
    stream: bool,
    model: str,
    max_tokens: int,
    temperature: float,
    top_p: float | None,
    stop: Sequence[str] | None,
    request_seed: bool,
    stream_usage: bool,
) -> Scenario:
    """The parts chat and text completions share: sampling fields, streaming options, response parsing."""

    def make_body(rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, **prompt_field(rng)}
        sampling = _sampling(
            rng, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, request_seed=request_seed
        )
        body.update(sampling)
        body["stream"] = stream
        if stream and stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    return Scenario(
        name=f"{name}-stream" if stream else name,
        path=path,
        make_body=make_body,
        stream=stream,
        parse_event=parse_openai_event if stream else None,
        parse_whole=_whole_openai,
        description=f"POST {path} model={model} max_tokens={max_tokens}",
    )


def openai_chat_scenario(
    *,
    stream: bool = False,
    model: str = "default",
    prompts: Sequence[PromptItem] = BUILTIN_PROMPTS,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    stop: Sequence[str] | None = None,
    request_seed: bool = False,
    stream_usage: bool = True,
) -> Scenario:
    """``POST /v1/chat/completions`` on any OpenAI-compatible server (ours or a peer)."""
    prompts = tuple(prompts)
    return _openai_scenario(
        "openai-chat",
        "/v1/chat/completions",
        lambda rng: {"messages": as_messages(_pick(rng, prompts))},
        stream=stream,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        request_seed=request_seed,
        stream_usage=stream_usage,
    )


def openai_completions_scenario(
    *,
    stream: bool = False,
    model: str = "default",
    prompts: Sequence[PromptItem] = BUILTIN_PROMPTS,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    stop: Sequence[str] | None = None,
    request_seed: bool = False,
    stream_usage: bool = True,
) -> Scenario:
    """``POST /v1/completions`` (legacy text completions) on any OpenAI-compatible server."""
    texts = tuple(as_text(p) for p in prompts)
    return _openai_scenario(
        "openai-completions",
        "/v1/completions",
        lambda rng: {"prompt": texts[rng.randrange(len(texts))]},
        stream=stream,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        request_seed=request_seed,
        stream_usage=stream_usage,
    )


def make_scenario(name: str, **options: Any) -> Scenario:
    """Build a scenario by name (see SCENARIO_NAMES); options go to its factory.

    Options a scenario does not use are ignored, so the CLI can pass one option set to any name.
    """
    factories: dict[str, tuple[Callable[..., Scenario], dict[str, Any]]] = {
        "generate": (generate_scenario, {"stream": False}),
        "generate-stream": (generate_scenario, {"stream": True}),
        "classify": (classify_scenario, {}),
        "openai-chat": (openai_chat_scenario, {"stream": False}),
        "openai-chat-stream": (openai_chat_scenario, {"stream": True}),
        "openai-completions": (openai_completions_scenario, {"stream": False}),
        "openai-completions-stream": (openai_completions_scenario, {"stream": True}),
    }
    if name not in factories:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIO_NAMES)}")
    factory, fixed = factories[name]
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    kwargs.update(fixed)
    return factory(**kwargs)


# --------------------------------------------------------------------------------------------
# Records and summaries
# --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request. Times are seconds; ``start``/``end`` are relative to the level's start.

    ``status`` is the HTTP status code, or ``"error:<ExceptionName>"`` when no usable response
    came back (connection error, timeout, malformed body, error inside a stream).
    """

    index: int
    start: float
    end: float
    latency: float
    status: int | str
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    items: int = 1
    error: str | None = None
    retry_after: str | None = None  # the Retry-After header of a refusal

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300


@dataclass
class LevelSummary:
    """Aggregates for one load level. Latency/TTFT/ITL/TPOT in ms, over successful requests only
    (a fast 429 is not a fast answer); errors keyed by status code or ``error:<Exception>``."""

    mode: str  # "closed" | "open"
    concurrency: int | None
    rate: float | None
    requests: int  # requests sent (excludes dropped_by_client)
    ok: int
    errors: dict[str, int]
    dropped_by_client: int
    duration_s: float
    throughput_rps: float  # successful requests / s
    output_tokens_per_s: float
    items_per_s: float  # successful inputs / s (classification batches count each input)
    mean_output_tokens: float | None
    latency_ms: dict[str, float | None]
    ttft_ms: dict[str, float | None] | None = None
    itl_ms: dict[str, float | None] | None = None
    tpot_ms: dict[str, float | None] | None = None
    ttft_samples_ms: list[float] | None = None  # kept so reports can draw TTFT histograms

    @property
    def level(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level
        return d


def summarize(
    records: Sequence[RequestRecord],
    *,
    mode: str,
    concurrency: int | None,
    rate: float | None,
    duration_s: float,
    dropped_by_client: int = 0,
    streaming: bool = False,
) -> LevelSummary:
    """Reduce per-request records to the numbers a report shows."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    dur = max(duration_s, 1e-9)
    tokens = sum(r.output_tokens for r in ok)
    summary = LevelSummary(
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        requests=len(records),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        dropped_by_client=dropped_by_client,
        duration_s=round(duration_s, 6),
        throughput_rps=round(len(ok) / dur, 4),
        output_tokens_per_s=round(tokens / dur, 3),
        items_per_s=round(sum(r.items for r in ok) / dur, 3),
        mean_output_tokens=round(tokens / len(ok), 3) if ok else None,
        latency_ms=_stats_ms([r.latency for r in ok], extra=True),
    )
    if streaming:
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        gaps = [g for r in ok for g in r.itl]
        tpots = [sum(r.itl) / (r.output_tokens - 1) for r in ok if r.itl and r.output_tokens > 1]
        summary.ttft_ms = _stats_ms(ttfts)
        summary.itl_ms = _stats_ms(gaps)
        summary.tpot_ms = _stats_ms(tpots)
        summary.ttft_samples_ms = [round(t * 1000.0, 3) for t in ttfts]
    return summary


@dataclass
class LevelResult:
    """One load level: its records plus the summary computed from them."""

    summary: LevelSummary
    records: list[RequestRecord]
    started_at: str  # ISO-8601 UTC wall time

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        d = self.summary.to_dict()
        d["started_at"] = self.started_at
        if raw:
            d["records"] = [asdict(r) for r in self.records]
        return d


@dataclass
class SweepResult:
    """A sweep: configuration, environment and one LevelResult per level, in run order."""

    config: dict[str, Any]
    environment: dict[str, Any]
    levels: list[LevelResult]

    @property
    def summaries(self) -> list[LevelSummary]:
        return [lv.summary for lv in self.levels]

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        """The ``results.json`` document."""
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "environment": self.environment,
            "levels": [lv.to_dict(raw=raw) for lv in self.levels],
        }


def environment_info(target: str) -> dict[str, Any]:
    """Where and when a result was measured, so numbers are never compared blind."""
    return {
        "target": target,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "argv": list(sys.argv),
    }


# --------------------------------------------------------------------------------------------
# Sending requests
# --------------------------------------------------------------------------------------------


def _short(body: bytes, limit: int = 300) -> str:
    return body[:limit].decode("utf-8", errors="replace")


async def _events(resp: httpx.Response) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder()
    async for chunk in resp.aiter_bytes():
        for ev in decoder.feed(chunk):
            yield ev
    for ev in decoder.flush():
        yield ev


async def _exchange(
    client: httpx.AsyncClient,
    scenario: Scenario,
    url: str,
    body: dict[str, Any],
    rec: RequestRecord,
    t_start: float,
) -> None:
    """Do one HTTP exchange, filling ``rec``'s status, tokens and streaming times."""
    if not scenario.stream:
        resp = await client.post(url, json=body)
        rec.status = resp.status_code
        if not rec.ok:
            rec.error, rec.retry_after = _short(resp.content), resp.headers.get("retry-after")
            return
        rec.output_tokens = scenario.parse_whole(resp.json())
        return
    assert scenario.parse_event is not None
    async with client.stream("POST", url, json=body) as resp:
        rec.status = resp.status_code
        if not rec.ok:
            rec.error, rec.retry_after = _short(await resp.aread()), resp.headers.get("retry-after")
            return
        chunk_times: list[float] = []
        usage_tokens: int | None = None
        finished = False
        async for ev in _events(resp):
            now = time.perf_counter()
            se = scenario.parse_event(ev)
            if se.error is not None:
                raise StreamError(se.error)
            if se.text:
                chunk_times.append(now)
            if se.completion_tokens is not None:
                usage_tokens = se.completion_tokens
            finished = finished or se.done or se.finish_reason is not None
            if se.done:
                break
        if not finished:
            raise IncompleteStream("stream ended without finish_reason or [DONE]")
        if chunk_times:
            rec.ttft = chunk_times[0] - t_start
            rec.itl = [b - a for a, b in itertools.pairwise(chunk_times)]
        rec.output_tokens = usage_tokens if usage_tokens is not None else len(chunk_times)


async def send_request(
    client: httpx.AsyncClient,
    scenario: Scenario,
    url: str,
    body: dict[str, Any],
    *,
    index: int = 0,
    timeout: float = 60.0,
    t0: float | None = None,
) -> RequestRecord:
    """Send one request and measure it; never raises for server or network failures.

    ``timeout`` bounds the whole exchange (a slow trickle of tokens cannot hold a worker forever).
    """
    t_start = time.perf_counter()
    base = t_start if t0 is None else t0
    rec = RequestRecord(index=index, start=t_start - base, end=0.0, latency=0.0, status="error:NotSent")
    rec.items = scenario.items_per_request
    try:
        await asyncio.wait_for(_exchange(client, scenario, url, body, rec, t_start), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        rec.status, rec.error = "error:TimeoutError", f"no complete response within {timeout:g}s"
        rec.ttft, rec.itl = None, []
    except Exception as exc:  # any failure is a measured outcome, not a crash of the generator
        rec.status, rec.error = f"error:{type(exc).__name__}", str(exc)[:300]
        rec.ttft, rec.itl = None, []
    t_end = time.perf_counter()
    rec.end = t_end - base
    rec.latency = t_end - t_start
    return rec


# --------------------------------------------------------------------------------------------
# Load levels
# --------------------------------------------------------------------------------------------


def arrival_offsets(rate: float, n: int, seed: int) -> list[float]:
    """First ``n`` arrival times (s) of a Poisson process at ``rate``/s: exponential gaps, seeded."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = random.Random(f"arrivals:{seed}")
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def run_level(
    client: httpx.AsyncClient | Sequence[httpx.AsyncClient],
    scenario: Scenario,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    requests: int,
    duration: float,
    seed: int = 0,
    timeout: float = 60.0,
    max_in_flight: int = 256,
    progress: Callable[[int], Any] | None = None,
    allow_remote: bool = False,
) -> LevelResult:
    """Run one load level against ``client.base_url`` and return records and summary.

    Exactly one of ``concurrency`` (closed loop: that many workers, each sending its next request
    when the previous one finishes) or ``rate`` (open loop: Poisson arrivals, independent of
    responses, at most ``max_in_flight`` outstanding; arrivals over the cap are counted as
    ``dropped_by_client`` and not sent). No request starts after ``duration`` seconds or beyond
    ``requests`` (arrivals, for open loop); requests in flight then finish, each within
    ``timeout``. So a level lasts at most about ``duration + timeout``.

    ``client`` may be several clients to the same target: worker (closed loop) or request (open loop)
    ``i`` uses ``client[i % len]``. See :func:`make_clients` for why.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    if requests < 1 or duration <= 0 or timeout <= 0:
        raise ValueError("requests, duration and timeout must be positive")
    clients = [client] if isinstance(client, httpx.AsyncClient) else list(client)
    base_url = str(clients[0].base_url)
    check_target(base_url, allow_remote)
    url = resolve_url(base_url, scenario.path)
    body_rng = random.Random(seed)
    records: list[RequestRecord] = []
    started_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    t0 = time.perf_counter()
    deadline = t0 + duration
    tick = progress or (lambda n: None)

    async def one(index: int, body: dict[str, Any], client: httpx.AsyncClient) -> None:
        rec = await send_request(client, scenario, url, body, index=index, timeout=timeout, t0=t0)
        records.append(rec)
        tick(1)

    dropped = 0
    if concurrency is not None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        issued = 0

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                index = issued
                issued += 1
                await one(index, scenario.make_body(body_rng), client)

        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
        mode = "closed"
    else:
        assert rate is not None
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        in_flight: set[asyncio.Task[None]] = set()
        tasks: list[asyncio.Task[None]] = []
        for index, offset in enumerate(arrival_offsets(rate, requests, seed)):
            if offset >= duration:
                break
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() >= deadline:
                break
            body = scenario.make_body(body_rng)  # drawn even when dropped: same bodies per index
            if len(in_flight) >= max_in_flight:
                dropped += 1
                tick(1)
                continue
            task = asyncio.create_task(one(index, body, clients[index % len(clients)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tasks.append(task)
        await asyncio.gather(*tasks)
        mode = "open"
    elapsed = time.perf_counter() - t0
    records.sort(key=lambda r: r.index)
    summary = summarize(
        records,
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        duration_s=elapsed,
        dropped_by_client=dropped,
        streaming=scenario.stream,
    )
    return LevelResult(summary=summary, records=records, started_at=started_at)


CONNECTIONS_PER_CLIENT = 8


def make_clients(
    base_url: str,
    concurrency: int,
    *,
    timeout: float = 60.0,
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[httpx.AsyncClient]:
    """One client per CONNECTIONS_PER_CLIENT requests in flight (workers and requests round-robin over them).

    One AsyncClient with many connections costs more CPU per request as connections grow: on 2 cores,
    GET /health through one client ran 1,250 req/s at 4 in flight but 180 req/s at 64, while a raw-socket
    client got ~3,200 req/s from the same server at 1 to 256 and one client per 8 workers ~1,100. The load
    generator, not the server, was then what a high-concurrency run measured.
    """
    count = max(1, -(-concurrency // CONNECTIONS_PER_CLIENT))
    # Each may still open ``concurrency`` connections, so an uneven open-loop spread never waits for one.
    return [
        make_client(base_url, timeout=timeout, max_connections=concurrency, headers=headers, transport=transport)
        for _ in range(count)
    ]


def make_client(
    base_url: str,
    *,
    timeout: float = 60.0,
    max_connections: int = 256,
    headers: dict[str, str] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient whose pool is large enough that requests never queue inside the client
    (pool waits would be counted as server latency)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout),
        limits=limits,
        headers=headers,
        transport=transport,
        trust_env=False,  # never route load through a proxy from the environment
    )


async def run_sweep(
    base_url: str,
    scenario: Scenario,
    *,
    concurrencies: Sequence[int] | None = None,
    rates: Sequence[float] | None = None,
    requests: int = 100,
    duration: float = 60.0,
    seed: int = 0,
    timeout: float = 60.0,
    max_in_flight: int = 256,
    warmup: int = 0,
    allow_remote: bool = False,
    headers: dict[str, str] | None = None,
    progress: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    label: str | None = None,
) -> SweepResult:
    """Run levels one after another (each ``concurrencies`` value, or each ``rates`` value).

    ``warmup`` requests are sent one at a time before the first level and not recorded (first
    requests pay for lazy initialisation). ``transport`` lets tests substitute an in-process one.
    """
    check_target(base_url, allow_remote)
    if (concurrencies is None) == (rates is None):
        raise ValueError("give exactly one of concurrencies or rates")
    levels: list[tuple[int | None, float | None]] = (
        [(int(c), None) for c in concurrencies]
        if concurrencies is not None
        else [(None, float(r)) for r in rates or ()]
    )
    if not levels:
        raise ValueError("no levels to run")
    cap = max([c for c, _ in levels if c is not None] + [max_in_flight if rates else 1])
    config = {
        "label": label,
        "scenario": scenario.name,
        "scenario_description": scenario.description,
        "path": scenario.path,
        "stream": scenario.stream,
        "mode": "closed" if concurrencies is not None else "open",
        "concurrencies": list(concurrencies) if concurrencies is not None else None,
        "rates": list(rates) if rates is not None else None,
        "requests_per_level": requests,
        "duration_per_level_s": duration,
        "timeout_s": timeout,
        "max_in_flight": max_in_flight,
        "seed": seed,
        "warmup": warmup,
    }
    result = SweepResult(config=config, environment=environment_info(base_url), levels=[])
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(c)
            for c in make_clients(base_url, cap, timeout=timeout, headers=headers, transport=transport)
        ]
        client = clients[0]
        if warmup > 0:
            url = resolve_url(base_url, scenario.path)
            rng = random.Random(f"warmup:{seed}")
            for i in range(warmup):
                await send_request(client, scenario, url, scenario.make_body(rng), index=i, timeout=timeout)
        for concurrency, rate in levels:
            bar = _progress_bar(requests, scenario.name, concurrency, rate) if progress else None
            try:
                level = await run_level(
                    clients,
                    scenario,
                    concurrency=concurrency,
                    rate=rate,
                    requests=requests,
                    duration=duration,
                    seed=seed,
                    timeout=timeout,
                    max_in_flight=max_in_flight,
                    progress=bar.update if bar is not None else None,
                    allow_remote=allow_remote,
                )
            finally:
                if bar is not None:
                    bar.close()
            result.levels.append(level)
    return result


def run_sweep_sync(base_url: str, scenario: Scenario, **kwargs: Any) -> SweepResult:
    """Blocking ``run_sweep`` for tests and scripts outside an event loop."""
    return asyncio.run(run_sweep(base_url, scenario, **kwargs))


def _progress_bar(total: int, name: str, concurrency: int | None, rate: float | None) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience, not a dependency
        return None
    level = f"c={concurrency}" if concurrency is not None else f"rate={rate:g}/s"
    return tqdm(total=total, desc=f"{name} {level}", unit="req", file=sys.stderr, leave=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    vals = [int(v) for v in text.split(",") if v.strip()]
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,4,16")
    return vals


def _float_list(text: str) -> list[float]:
    vals = [float(v) for v in text.split(",") if v.strip()]
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError("expected positive numbers, e.g. 5,10,20")
    return vals


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("expected 'Name: value'")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.loadgen",
        description="Load generator for the inference server and OpenAI-compatible peers. "
        "Closed loop (--concurrency) or open loop with Poisson arrivals (--rate); comma lists sweep.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="target base URL (may end in /v1)")
    p.add_argument("--scenario", default="generate-stream", choices=SCENARIO_NAMES)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, help="closed loop: workers, e.g. 1,4,16")
    load.add_argument("--rate", type=_float_list, help="open loop: Poisson arrivals/s, e.g. 5,10,20")
    p.add_argument("--requests", type=int, default=100, help="max requests per level")
    p.add_argument("--duration", type=float, default=60.0, help="max seconds per level")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--max-in-flight", type=int, default=256, help="open-loop cap on outstanding requests")
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests before the first level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-file", type=Path, help="prompts: .jsonl or one per line")
    p.add_argument("--label", help="name of this run in reports (e.g. ours, peer-x)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, help="/generate only")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--request-seed", action="store_true", help="send a seeded per-request 'seed'")
    gen.add_argument("--use-messages", action="store_true", help="/generate: send prompts as messages")
    gen.add_argument("--model", default="default", help="OpenAI 'model' field")
    gen.add_argument("--no-stream-usage", action="store_true", help="OpenAI streams: omit stream_options.include_usage")
    cls = p.add_argument_group("classification")
    cls.add_argument("--labels", help="comma-separated labels (default: built-in intents)")
    cls.add_argument("--no-labels", action="store_true", help="send no labels")
    cls.add_argument("--multi-label", action="store_true")
    cls.add_argument("--batch-size", type=int, default=1, help="inputs per /classify request")
    p.add_argument("--header", type=_header, action="append", default=[], help="'Name: value' (repeatable)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target you own")
    p.add_argument("--out", type=Path, help="write results.json, results.md and PNG plots here")
    p.add_argument("--raw", action="store_true", help="include per-request records in results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Exit 0 on a completed run, 1 if no request succeeded, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        check_target(args.url, args.allow_remote)
    except TargetRefused as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    if args.requests < 1 or args.duration <= 0 or args.timeout <= 0:
        print("loadgen: --requests, --duration and --timeout must be positive", file=sys.stderr)
        return 2
    prompts = load_prompts(args.prompts_file) if args.prompts_file else BUILTIN_PROMPTS
    labels: Sequence[str] | None = DEFAULT_LABELS
    if args.no_labels:
        labels = ()
    elif args.labels:
        labels = [lb.strip() for lb in args.labels.split(",") if lb.strip()]
    scenario = make_scenario(
        args.scenario,
        prompts=prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        request_seed=args.request_seed,
        use_messages=args.use_messages,
        model=args.model,
        stream_usage=not args.no_stream_usage,
        labels=labels,
        multi_label=args.multi_label,
        batch_size=args.batch_size,
    )
    concurrencies = args.concurrency if args.rate is None else None
    if concurrencies is None and args.rate is None:
        concurrencies = [1]
    result = run_sweep_sync(
        args.url,
        scenario,
        concurrencies=concurrencies,
        rates=args.rate,
        requests=args.requests,
        duration=args.duration,
        seed=args.seed,
        timeout=args.timeout,
        max_in_flight=args.max_in_flight,
        warmup=args.warmup,
        allow_remote=args.allow_remote,
        headers=dict(args.header) or None,
        progress=not args.no_progress,
        label=args.label,
    )
    from load_tests import report

    print(report.markdown_report(result.to_dict()))
    if args.out is not None:
        written = report.write_report(result, args.out, raw=args.raw)
        for path in written.values():
            print(f"wrote {path}", file=sys.stderr)
    if not any(s.ok for s in result.summaries):
        print("loadgen: no request succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
