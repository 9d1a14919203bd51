"""The generation service: all that /generate and the /v1 routes share, so each route only maps its wire
format onto it. It runs in the API-server process: prompt encoding (long texts off the event loop) and
limits, the fan-out of a request into sequences (prompts × n) and the merging of their outputs, admission,
deadlines and client disconnects, metrics, per-request timings and SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from engine.llm_engine import EngineError, GenerationChunk, LLMClient, RequestShed
from engine.protocol import TokenLogprobs
from engine.sequence import SamplingParams
from server import chat_template, metrics
from server.admission import shed_error
from server.config import Settings
from server.errors import APIError
from server.middleware import cache_salt
from server.request_id import current_request_id
from server.routes.common import (
    DEADLINE_MESSAGE,
    SHUTDOWN_MESSAGE,
    ClientDisconnected,
    DeadlineExceeded,
    StreamCut,
    admission,
    request_deadline,
    until_disconnect,
    within_deadline,
)
from server.runtime import Runtime
from server.schemas import MAX_CHARS_PER_TOKEN, Timings, TokenLogprob, TopLogprob
from server.services.tokenizing import _tokenize

log = logging.getLogger(__name__)
T = TypeVar("T")


async def encode_chat(
    llm: LLMClient,
    settings: Settings,
    messages: list[dict[str, str]],
    field: str = "messages",
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Chat turns in the model's own template (with the assistant turn's header); content stays text.
    Their content (and tool definitions the template renders) is bounded in characters before the template
    is rendered."""
    if not llm.tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; send a plain prompt instead", field=field)
    n_chars = sum(len(m["content"]) for m in messages) + (len(json.dumps(tools)) if tools else 0)
    check_chars(settings, n_chars, field)
    try:
        return await _tokenize(llm.tokenizer, n_chars, lambda tok: chat_template.encode_chat(tok, messages, tools))
    except chat_template.UnsafeContentError as exc:
        raise APIError(400, str(exc), field=exc.field) from exc


async def encode_texts(llm: LLMClient, settings: Settings, prompts: list[str], fields: list[str]) -> list[list[int]]:
    """Plain prompts' tokens (one tokenizer call), every prompt's characters bounded before any is tokenized."""
    for prompt, field in zip(prompts, fields, strict=True):
        check_chars(settings, len(prompt), field)
    return await _tokenize(llm.tokenizer, sum(map(len, prompts)), lambda tok: tok(prompts).input_ids)


def check_chars(settings: Settings, n_chars: int, field: str) -> None:
    """A prompt's size in characters, checked before tokenizing it (or rendering its template): a text far
    over the token limit costs the tokenizer time in proportion to its length only to be refused."""
    max_chars = settings.max_input_tokens * MAX_CHARS_PER_TOKEN
    if n_chars > max_chars:
        raise APIError(
            400,
            f"{field} has {n_chars} characters; the limit is {max_chars} "
            f"({MAX_CHARS_PER_TOKEN} per token of max_input_tokens)",
            type="input_too_long",
            field=field,
        )


@dataclass(frozen=True)
class Choice:
    """One sequence of a request: ``index`` in the response, ``prompt`` the index of its prompt."""

    index: int
    prompt: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Completion:
    choice: Choice
    text: str
    final: GenerationChunk  # the last chunk: finish_reason and token counts
    logprobs: list[tuple[int, TokenLogprobs]] | None  # every token's, when the request asked


def token_logprobs(tokenizer: PreTrainedTokenizerBase, logprobs: list[tuple[int, TokenLogprobs]]) -> list[TokenLogprob]:
    """Token ids and their log-probabilities as text entries (OpenAI's chat shape; /generate uses it too)."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    entries = []
    for token_id, lp in logprobs:
        alternatives = [top(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]
        entries.append(TokenLogprob(**top(token_id, lp.logprob).model_dump(), top_logprobs=alternatives))
    return entries


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


Events = AsyncIterator[tuple[Choice, GenerationChunk]]
# A route's SSE rendering of the merged chunks of its choices, and its error event (code, message): a failure
# after the headers went out ends the stream with that event.
Render = Callable[[Events], AsyncIterator[str]]
ErrorEvent = Callable[[str, str], str]


class GenerationService:
    """One generation request: made when the route starts, so its deadline and arrival count from there."""

    def __init__(self, request: Request, runtime: Runtime, llm: LLMClient) -> None:
        self.arrival = time.perf_counter()
        self.request = request
        self.settings = runtime.settings
        self.llm = llm
        self.deadline = request_deadline(request, self.settings.request_timeout_s)

    # ------------------------------------------------------------------ prompts and limits

    async def encode_chat(
        self, messages: list[dict[str, str]], field: str = "messages", tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        ids = await encode_chat(self.llm, self.settings, messages, field, tools)
        self._check_tokens(ids, field)
        self._log_prompt(messages, len(ids))
        return ids

    async def encode_texts(self, prompts: list[str], fields: list[str]) -> list[list[int]]:
        encoded = await encode_texts(self.llm, self.settings, prompts, fields)
        for ids, field in zip(encoded, fields, strict=True):
            self._check_tokens(ids, field)
        self._log_prompt(prompts[0] if len(prompts) == 1 else prompts, sum(map(len, encoded)))
        return encoded

    def max_tokens(self, requested: int | None, field: str = "max_tokens") -> int:
        max_tokens = requested or self.settings.default_max_tokens
        if max_tokens > self.settings.max_new_tokens:
            raise APIError(400, f"{field} {max_tokens} exceeds the limit {self.settings.max_new_tokens}", field=field)
        return max_tokens

    def _check_tokens(self, prompt_ids: list[int], field: str) -> None:
        limit = self.settings.max_input_tokens
        if len(prompt_ids) > limit:
            raise APIError(
                400,
                f"{field} has {len(prompt_ids)} tokens; the limit is {limit} (max_input_tokens)",
                type="input_too_long",
                field=field,
            )

    def _log_prompt(self, prompt: object, n_tokens: int) -> None:
        """Prompt text reaches the log only with ``log_prompts`` (it may hold personal data); sizes always may."""
        if self.settings.log_prompts:
            log.info("prompt (%d tokens): %r", n_tokens, prompt)
        else:
            log.debug("prompt of %d tokens", n_tokens)

    # ------------------------------------------------------------------ running

    def fan_out(self, prompts: list[list[int]], n: int, params: Callable[[int], SamplingParams]) -> list[Choice]:
        """One sequence per (prompt, n), choice ``p * n + j``; ``params(index)`` gives its sampling settings
        (the routes seed choice i with ``seed + i`` so the n choices differ). Every sequence carries the
        client's prefix-cache salt."""
        salt = cache_salt(self.request)
        choices = []
        for p, ids in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                choices.append(Choice(index, p, ids, dataclasses.replace(params(index), cache_salt=salt)))
        return choices

    async def respond(self, choices: list[Choice], build: Callable[[list[Completion], Timings], BaseModel]) -> Response:
        """Runs every choice to its end and answers ``build``'s body as JSON, with the timing headers; 499
        when the client went away first (the sequences are aborted)."""
        gates = admission(self.request)
        with gates.generation(self._sizes(choices), False):
            work = _collect_all(choices, self._start(choices, False))
            try:
                done = await until_disconnect(self.request, work, self.deadline, gates.cutoff())
            except ClientDisconnected:
                return Response(status_code=499)
            except EngineError as exc:
                raise APIError(500, str(exc), type="engine_error") from exc
            except RequestShed as exc:
                raise shed_error(exc) from exc
        timings = self.timings([c.final for c in done])
        body = build(done, timings)
        return Response(body.model_dump_json(), media_type="application/json", headers=timings.headers())

    def stream(self, choices: list[Choice], render: Render, error_event: ErrorEvent) -> Response:
        """Streams ``render``'s events over the choices' merged chunks as Server-Sent Events, under the
        request's deadline and the shutdown cut; a client that goes away aborts every choice."""
        gates = admission(self.request)
        with gates.generation(self._sizes(choices), True) as ticket:
            streams = [within_deadline(s, self.deadline, gates.cutoff()) for s in self._start(choices, True)]
            events = _guarded(render, _merged(choices, streams), error_event)
            return ticket.stream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def timings(self, finals: Sequence[GenerationChunk]) -> Timings:
        now = time.perf_counter()
        lines = [f.timeline for f in finals if f.timeline is not None]
        tokens = sum(f.completion_tokens for f in finals)
        if not lines:
            total = (now - self.arrival) * 1e3
            return Timings(queue_ms=0, prefill_ms=0, decode_ms=0, total_ms=total, tokens_per_second=0)
        scheduled = min(t.scheduled for t in lines)
        first = min(t.first_token for t in lines)
        finished = max(t.finished for t in lines)
        busy = max(finished - scheduled, 0.0)
        return Timings(
            queue_ms=round(max(scheduled - self.arrival, 0.0) * 1e3, 3),
            prefill_ms=round(max(first - scheduled, 0.0) * 1e3, 3),
            decode_ms=round(max(finished - first, 0.0) * 1e3, 3),
            total_ms=round((now - self.arrival) * 1e3, 3),
            tokens_per_second=round(tokens / busy, 2) if busy > 0 else 0.0,
        )

    def _sizes(self, choices: list[Choice]) -> list[int]:
        """The KV cache each sequence may come to hold: what admission counts."""
        return [len(c.prompt_ids) + c.params.max_tokens for c in choices]

    def _start(self, choices: list[Choice], stream: bool) -> list[AsyncIterator[GenerationChunk]]:
        request_id = current_request_id()
        return [
            _timed(
                self.llm.generate(
                    c.prompt_ids,
                    c.params,
                    request_id if len(choices) == 1 else f"{request_id}-{c.index}",
                    stream,
                    self.deadline,
                ),
                self.arrival,
            )
            for c in choices
        ]


async def _timed(chunks: AsyncIterator[GenerationChunk], arrival: float) -> AsyncIterator[GenerationChunk]:
    """Observes time to first token, inter-token latency and token counts as chunks pass by (a whole
    result's one chunk says when its first token came)."""
    last_time, last_tokens = arrival, 0
    async for chunk in chunks:
        now = time.perf_counter()
        new_tokens = chunk.completion_tokens - last_tokens
        if new_tokens > 0:
            if last_tokens == 0:
                first = chunk.first_token_time or now
                metrics.TTFT.observe(first - arrival)
                if new_tokens > 1 and chunk.first_token_time is not None:
                    metrics.ITL.observe((now - first) / (new_tokens - 1))
            else:
                metrics.ITL.observe((now - last_time) / new_tokens)
            metrics.GENERATED_TOKENS.inc(new_tokens)
            last_time, last_tokens = now, chunk.completion_tokens
        if chunk.finish_reason is not None:
            metrics.PROMPT_TOKENS.inc(chunk.prompt_tokens)
        yield chunk


async def _collect(choice: Choice, chunks: AsyncIterator[GenerationChunk]) -> Completion:
    parts: list[str] = []
    logprobs: list[tuple[int, TokenLogprobs]] | None = None if choice.params.logprobs is None else []
    async for chunk in chunks:
        parts.append(chunk.text)
        if logprobs is not None and chunk.logprobs:
            logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            return Completion(choice, "".join(parts), chunk, logprobs)
    raise EngineError("generation ended without a finish reason")


async def _collect_all(choices: list[Choice], streams: list[AsyncIterator[GenerationChunk]]) -> list[Completion]:
    tasks = [asyncio.ensure_future(_collect(c, s)) for c, s in zip(choices, streams, strict=True)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _merged(choices: list[Choice], streams: list[AsyncIterator[GenerationChunk]]) -> Events:
    """Interleaves the choices' chunk streams as they arrive; leaving early cancels (aborts) them all."""
    if len(streams) == 1:  # no queue hop for the common case
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for chunk in only:
                yield choices[0], chunk
        return
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((i, chunk))
            queue.put_nowait((i, None))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield choices[i], item
    finally:
        for task in tasks:
            task.cancel()


async def _guarded(render: Render, events: Events, error_event: ErrorEvent) -> AsyncIterator[str]:
    """Headers are already sent when a stream fails, so a failure ends it with the route's error event.
    aclosing: when the client goes away mid-stream, closing this generator aborts every choice."""
    async with contextlib.aclosing(events), contextlib.aclosing(render(events)) as rendered:  # type: ignore[type-var]
        try:
            async for event in rendered:
                yield event
        except EngineError as exc:
            yield error_event("engine_error", str(exc))
        except RequestShed as exc:
            yield error_event("overloaded", str(exc))
        except DeadlineExceeded:
            yield error_event("timeout", DEADLINE_MESSAGE)
        except StreamCut:
            yield error_event("shutting_down", SHUTDOWN_MESSAGE)
