"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/embeddings``, so existing OpenAI clients can point their ``base_url`` here.

Generation goes through the same engine and plumbing as /generate; embeddings through the same
dynamic batching queue as /classify. ``n`` > 1 runs n sequences.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from engine.classifier import ClassifierInputError, ClassifyItem, Embedding
from engine.llm_engine import EngineError, GenerationChunk, LLMClient
from engine.sequence import SamplingParams
from server.config import Settings
from server.errors import UNSUPPORTED, APIError, openai_error_body
from server.generation import (
    Completion,
    check_prompt,
    collect,
    encode_chat,
    encode_texts,
    log_prompt,
    resolve_max_tokens,
    sse,
    timed,
)
from server.middleware import cache_salt
from server.request_id import current_request_id
from server.routes.common import (
    DEADLINE_MESSAGE,
    SHUTDOWN_MESSAGE,
    ClientDisconnected,
    DeadlineExceeded,
    StreamCut,
    admission,
    encoder_inputs,
    on_encoder,
    ready_runtime,
    request_deadline,
    until_disconnect,
    within_deadline,
)
from server.runtime import Runtime
from server.schemas_openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionRequest,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
    PromptTokensDetails,
    SamplingRequest,
    TextCompletion,
    Usage,
)

router = APIRouter(prefix="/v1")

ERRORS = {code: {"model": OpenAIErrorResponse} for code in (400, 401, 404, 413, 429, 503, 504)}
Kind = Literal["chat", "text"]


def _not_found(model: str) -> APIError:
    return APIError(
        404,
        f"the model {model!r} does not exist on this server; GET /v1/models lists the served models",
        field="model",
        code="model_not_found",
    )


def _llm(runtime: Runtime, body: SamplingRequest) -> LLMClient:
    """``model`` is the id /v1/models lists or, as an alias, the spec the server was started with
    (``--gen-model``, e.g. ``default``); responses name the id either way."""
    if runtime.llm is None or body.model not in (runtime.gen_model_id, runtime.settings.gen_model):
        raise _not_found(body.model)
    assert runtime.gen_model_id is not None
    body.model = runtime.gen_model_id
    return runtime.llm


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> ModelList:
    runtime = ready_runtime(request)
    cards = []
    for task, model_id in (("generate", runtime.gen_model_id), ("classify", runtime.cls_model_id)):
        if model_id is not None:
            # runtime.info[task]: source and load time; runtime.reports[task]: the startup compression report.
            details = dict(runtime.info.get(task, {}))
            if task in runtime.reports:
                details["compression"] = runtime.reports[task].model_dump(mode="json")
            cards.append(ModelCard(id=model_id, created=runtime.created, task=task, details=details))
    return ModelList(data=cards)


@dataclass(frozen=True)
class _Choice:
    index: int
    prompt: int  # index into the request's prompts
    prompt_ids: list[int]
    params: SamplingParams


def _choices(body: SamplingRequest, prompts: list[list[int]], max_tokens: int, salt: str | None) -> list[_Choice]:
    """One sequence per (prompt, n); choice i samples with ``seed + i`` so the n choices differ."""
    out = []
    for p, ids in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + index,
                stop=body.stop_strings,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                cache_salt=salt,
            )
            out.append(_Choice(index, p, ids, params))
    return out


def _usage(prompts: list[list[int]], finals: dict[int, GenerationChunk], choices: list[_Choice]) -> Usage:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    firsts = {c.prompt: finals[c.index] for c in reversed(choices)}
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(f.completion_tokens for f in finals.values())
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.cached_tokens for f in firsts.values())),
    )


async def _merged(streams: Sequence[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Interleaves the choices' chunk streams as they arrive; leaving early cancels (aborts) them all."""
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
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _collect_all(streams: Sequence[AsyncIterator[GenerationChunk]]) -> list[Completion]:
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _chunk_payload(
    kind: Kind, rid: str, created: int, model: str, index: int, text: str | None, reason: str | None, usage: bool
) -> dict[str, object]:
    if kind == "chat":
        delta: dict[str, str] = {} if text is None else {"content": text}
        choice: dict[str, object] = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        payload: dict[str, object] = {"id": rid, "object": "chat.completion.chunk", "created": created}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        payload = {"id": rid, "object": "text_completion", "created": created}
    payload.update(model=model, choices=[choice])
    if usage:
        payload["usage"] = None
    return payload


async def _stream_events(
    kind: Kind,
    body: SamplingRequest,
    prompts: list[list[int]],
    echoes: list[str],
    choices: list[_Choice],
    streams: list[AsyncIterator[GenerationChunk]],
    rid: str,
) -> AsyncIterator[str]:
    created, model, with_usage = int(time.time()), body.model, body.include_usage
    finals: dict[int, GenerationChunk] = {}
    try:
        for c in choices:  # OpenAI opens each choice with the role (chat) or the echoed prompt (text)
            if kind == "chat":
                first = _chunk_payload(kind, rid, created, model, c.index, "", None, with_usage)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}  # type: ignore[index]
                yield sse(first)
            elif echoes[c.prompt]:
                yield sse(_chunk_payload(kind, rid, created, model, c.index, echoes[c.prompt], None, with_usage))
        # aclosing: when the client goes away mid-stream, closing this generator must abort every choice.
        async with contextlib.aclosing(_merged(streams)) as merged:
            async for i, chunk in merged:
                if chunk.finish_reason is not None:
                    finals[choices[i].index] = chunk
                text = chunk.text if chunk.text or chunk.finish_reason is None else None
                yield sse(
                    _chunk_payload(kind, rid, created, model, choices[i].index, text, chunk.finish_reason, with_usage)
                )
    except EngineError as exc:
        yield sse(openai_error_body("server_error", str(exc), code="engine_error"))
        return
    except DeadlineExceeded:
        yield sse(openai_error_body("server_error", DEADLINE_MESSAGE, code="timeout"))
        return
    except StreamCut:
        yield sse(openai_error_body("server_error", SHUTDOWN_MESSAGE, code="shutting_down"))
        return
    if with_usage:
        usage = _usage(prompts, finals, choices).model_dump()
        object_ = "chat.completion.chunk" if kind == "chat" else "text_completion"
        yield sse({"id": rid, "object": object_, "created": created, "model": model, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _serve(
    request: Request,
    settings: Settings,
    llm: LLMClient,
    kind: Kind,
    body: SamplingRequest,
    prompts: list[list[int]],
    echoes: list[str],
    max_tokens: int,
) -> Response:
    arrival = time.perf_counter()
    request_id = current_request_id()
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"
    choices = _choices(body, prompts, max_tokens, cache_salt(request))
    deadline = request_deadline(request, settings.request_timeout_s)
    sizes = [len(c.prompt_ids) + c.params.max_tokens for c in choices]  # the KV cache each may come to hold
    gates = admission(request)
    with gates.generation(sizes, body.stream, field="n") as ticket:
        streams = [
            timed(
                llm.generate(
                    c.prompt_ids,
                    c.params,
                    request_id if len(choices) == 1 else f"{request_id}-{c.index}",
                    body.stream,
                ),
                arrival,
            )
            for c in choices
        ]
        if body.stream:
            streams = [within_deadline(s, deadline, gates.cutoff()) for s in streams]
            events = _stream_events(kind, body, prompts, echoes, choices, streams, rid)
            return ticket.stream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = await until_disconnect(request, _collect_all(streams), deadline, gates.cutoff())
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineError as exc:
            raise APIError(500, str(exc), type="engine_error") from exc
    finals = {c.index: d.final for c, d in zip(choices, done, strict=True)}
    usage = _usage(prompts, finals, choices)
    result: BaseModel
    if kind == "chat":
        result = ChatCompletion(
            id=rid,
            created=int(time.time()),
            model=body.model,
            usage=usage,
            choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=d.text), finish_reason=d.final.finish_reason)
                for c, d in zip(choices, done, strict=True)
            ],
        )
    else:
        result = TextCompletion(
            id=rid,
            created=int(time.time()),
            model=body.model,
            usage=usage,
            choices=[
                CompletionChoice(index=c.index, text=echoes[c.prompt] + d.text, finish_reason=d.final.finish_reason)
                for c, d in zip(choices, done, strict=True)
            ],
        )
    return Response(result.model_dump_json(), media_type="application/json")


@router.post("/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    llm = _llm(runtime, body)
    messages = body.template_messages()
    prompt_ids = await encode_chat(llm, runtime.settings, messages)
    check_prompt(runtime.settings, prompt_ids, "messages")
    log_prompt(runtime.settings, messages, len(prompt_ids))
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(runtime.settings, body.max_completion_tokens or body.max_tokens, field)
    return await _serve(request, runtime.settings, llm, "chat", body, [prompt_ids], [""], max_tokens)


@router.post("/completions", response_model=TextCompletion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    llm = _llm(runtime, body)
    fields = ["prompt"] if isinstance(body.prompt, str) else [f"prompt.{i}" for i in range(len(body.prompts))]
    prompts = await encode_texts(llm, runtime.settings, body.prompts, fields)
    for ids, field in zip(prompts, fields, strict=True):
        check_prompt(runtime.settings, ids, field)
    log_prompt(runtime.settings, body.prompts, sum(len(ids) for ids in prompts))
    max_tokens = resolve_max_tokens(runtime.settings, body.max_tokens)
    echoes = body.prompts if body.echo else [""] * len(prompts)
    return await _serve(request, runtime.settings, llm, "text", body, prompts, echoes, max_tokens)


@router.post("/embeddings", response_model=EmbeddingList, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    served = (runtime.cls_model_id, runtime.settings.cls_model)  # id or, as an alias, the --cls-model spec
    if runtime.classifier is None or runtime.batcher is None or body.model not in served:
        raise _not_found(body.model)
    dim = runtime.classifier.embedding_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(400, f"dimensions: this model only produces {dim}", field="dimensions", code=UNSUPPORTED)
    n_tokens, _ = encoder_inputs(runtime, body.texts, "input", single=isinstance(body.input, str))
    items = [ClassifyItem(text, n_tokens=n, embed=True) for text, n in zip(body.texts, n_tokens, strict=True)]
    batcher = runtime.batcher
    try:
        results = await on_encoder(request, runtime, len(items), lambda: batcher.submit_many(items))
    except ClientDisconnected:
        return Response(status_code=499)
    except ClassifierInputError as exc:
        raise APIError(400, str(exc), field="input") from exc
    data = []
    for i, result in enumerate(results):
        assert isinstance(result, Embedding)
        vector: list[float] | str = result.vector
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI encodes it
            vector = base64.b64encode(struct.pack(f"<{len(result.vector)}f", *result.vector)).decode()
        data.append(EmbeddingData(index=i, embedding=vector))
    usage = EmbeddingUsage(prompt_tokens=sum(n_tokens), total_tokens=sum(n_tokens))
    result_list = EmbeddingList(data=data, model=served[0] or body.model, usage=usage)
    return Response(result_list.model_dump_json(), media_type="application/json")
