"""What to send and how to read the answer: one Scenario per endpoint (``/generate``, ``/classify``,
OpenAI chat and text completions), whole or streamed, built by name with ``make_scenario``.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from load_tests.loadgen.prompts import BUILTIN_PROMPTS, PromptItem, as_messages, as_text
from load_tests.loadgen.sse import SSEEvent, StreamEvent, parse_generate_event, parse_openai_event, usage_tokens

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


class BadResponse(Exception):
    """A 2xx response whose body does not have the expected shape."""


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
    return usage_tokens(data) or 0


def _whole_openai(data: Any) -> int:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BadResponse("expected {'choices': [...], ...}")
    return usage_tokens(data) or 0


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
