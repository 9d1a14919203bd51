"""POST /generate: whole or streamed (SSE) text generation through the continuous-batching engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.llm_engine import EngineError, GenerationChunk
from engine.sequence import SamplingParams
from server.errors import APIError, error_body
from server.generation import (
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
    ERRORS,
    SHUTDOWN_MESSAGE,
    ClientDisconnected,
    DeadlineExceeded,
    StreamCut,
    admission,
    ready_runtime,
    request_deadline,
    until_disconnect,
    within_deadline,
)
from server.schemas import GenerateRequest, GenerateResponse

router = APIRouter()


async def sse_events(chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[str]:
    """Headers are already sent when a stream fails, so failures end it with an ``error`` event."""
    try:
        async for chunk in chunks:
            if chunk.finish_reason is None:
                yield sse({"text": chunk.text})
            else:
                usage = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}
                yield sse({"text": chunk.text, "finish_reason": chunk.finish_reason, "usage": usage})
    except EngineError as exc:
        yield "event: error\n" + sse(error_body("engine_error", str(exc)))
    except DeadlineExceeded:
        yield "event: error\n" + sse(error_body("timeout", DEADLINE_MESSAGE))
    except StreamCut:
        yield "event: error\n" + sse(error_body("shutting_down", SHUTDOWN_MESSAGE))


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    runtime = ready_runtime(request)
    if runtime.llm is None:
        raise APIError(404, "generation is disabled on this server", type="not_found")
    settings = runtime.settings
    deadline = request_deadline(request, settings.request_timeout_s)
    if body.messages is not None:
        field = "messages"
        prompt_ids = await encode_chat(runtime.llm, settings, [m.model_dump() for m in body.messages])
    else:
        assert body.prompt is not None
        field, (prompt_ids,) = "prompt", await encode_texts(runtime.llm, settings, [body.prompt], ["prompt"])
    check_prompt(settings, prompt_ids, field)
    max_tokens = resolve_max_tokens(settings, body.max_tokens)
    # Admitted by its size: the prompt and what it may generate (the KV cache it may come to hold).
    gates = admission(request)
    with gates.generation([len(prompt_ids) + max_tokens], body.stream) as ticket:
        log_prompt(settings, body.prompt if body.prompt is not None else body.messages, len(prompt_ids))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(body.stop),
            cache_salt=cache_salt(request),
        )
        chunks = timed(runtime.llm.generate(prompt_ids, params, current_request_id(), body.stream), arrival)
        if body.stream:
            return ticket.stream(
                sse_events(within_deadline(chunks, deadline, gates.cutoff())),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            done = await until_disconnect(request, collect(chunks), deadline, gates.cutoff())
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineError as exc:
            raise APIError(500, str(exc), type="engine_error") from exc
    final = done.final
    usage = {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens}
    result = GenerateResponse(text=done.text, finish_reason=final.finish_reason, usage=usage)
    return Response(result.model_dump_json(), media_type="application/json")
