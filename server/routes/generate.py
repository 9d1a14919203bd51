"""POST /generate: whole or streamed (SSE) text generation through the continuous-batching engine."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from engine.llm_engine import AsyncLLM, EngineError, GenerationChunk
from engine.sequence import SamplingParams
from server import metrics
from server.errors import APIError, error_body
from server.routes.common import ClientDisconnected, ready_runtime, until_disconnect
from server.schemas import ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 422, 503)}


def encode_prompt(llm: AsyncLLM, body: GenerateRequest) -> list[int]:
    tokenizer = llm.tokenizer
    if body.messages is not None:
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; send 'prompt' instead", field="messages")
        messages = [m.model_dump() for m in body.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(body.prompt).input_ids


async def timed(chunks: AsyncIterator[GenerationChunk], arrival: float) -> AsyncIterator[GenerationChunk]:
    """Observes time to first token, inter-token latency and token counts as chunks pass by."""
    last_time, last_tokens = arrival, 0
    async for chunk in chunks:
        now = time.perf_counter()
        new_tokens = chunk.completion_tokens - last_tokens
        if new_tokens > 0:
            if last_tokens == 0:
                metrics.TTFT.observe(now - arrival)
            else:
                metrics.ITL.observe((now - last_time) / new_tokens)
            metrics.GENERATED_TOKENS.inc(new_tokens)
            last_time, last_tokens = now, chunk.completion_tokens
        if chunk.finish_reason is not None:
            metrics.PROMPT_TOKENS.inc(chunk.prompt_tokens)
        yield chunk


def _sse(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_events(chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            if chunk.finish_reason is None:
                yield _sse({"text": chunk.text})
            else:
                usage = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}
                yield _sse({"text": chunk.text, "finish_reason": chunk.finish_reason, "usage": usage})
    except EngineError as exc:
        yield "event: error\n" + _sse(error_body("engine_error", str(exc)))


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    runtime = ready_runtime(request)
    if runtime.llm is None:
        raise APIError(404, "generation is disabled on this server", type="not_found")
    settings = runtime.settings
    field = "messages" if body.messages is not None else "prompt"
    prompt_ids = encode_prompt(runtime.llm, body)
    if len(prompt_ids) > settings.max_input_tokens:
        raise APIError(
            400,
            f"{field} has {len(prompt_ids)} tokens; the limit is {settings.max_input_tokens} (max_input_tokens)",
            type="input_too_long",
            field=field,
        )
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_new_tokens:
        raise APIError(400, f"max_tokens {max_tokens} exceeds the limit {settings.max_new_tokens}", field="max_tokens")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
    )
    chunks = timed(runtime.llm.generate(prompt_ids, params, uuid.uuid4().hex), arrival)
    if body.stream:
        return StreamingResponse(
            sse_events(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def collect() -> GenerateResponse:
        parts: list[str] = []
        async for chunk in chunks:
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                usage = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}
                return GenerateResponse(text="".join(parts), finish_reason=chunk.finish_reason, usage=usage)
        raise EngineError("generation ended without a finish reason")

    try:
        result = await until_disconnect(request, collect())
    except ClientDisconnected:
        return Response(status_code=499)
    except EngineError as exc:
        raise APIError(500, str(exc), type="engine_error") from exc
    return Response(result.model_dump_json(), media_type="application/json")
