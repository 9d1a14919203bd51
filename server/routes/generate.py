"""POST /generate: whole or streamed (SSE) text generation; the native wire format over the generation
service (server/services/generation.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.sequence import SamplingParams
from server.errors import APIError, error_body
from server.routes.common import ERRORS, ready_runtime
from server.schemas import GenerateRequest, GenerateResponse, Usage
from server.services import constraints
from server.services.generation import Completion, Events, GenerationService, Timings, sse, token_logprobs

router = APIRouter()


def _grammar(body: GenerateRequest) -> str | None:
    if body.json_schema is not None:
        return constraints.json_schema(body.json_schema, "json_schema")
    if body.regex is not None:
        return constraints.regex(body.regex, "regex")
    if body.choice is not None:
        return constraints.choice(body.choice, "choice")
    return None


def _error_event(code: str, message: str) -> str:
    return "event: error\n" + sse(error_body(code, message))


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    if runtime.llm is None:
        raise APIError(404, "generation is disabled on this server", type="not_found")
    service = GenerationService(request, runtime, runtime.llm)
    if body.messages is not None:
        prompt_ids = await service.encode_chat([m.model_dump() for m in body.messages])
    else:
        assert body.prompt is not None
        (prompt_ids,) = await service.encode_texts([body.prompt], ["prompt"])
    params = SamplingParams(
        max_tokens=service.max_tokens(body.max_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        logprobs=body.top_logprobs if body.logprobs else None,
        grammar=_grammar(body),
        speculative=body.speculative,
    )
    choices = service.fan_out([prompt_ids], 1, lambda _: params)
    tokenizer = runtime.llm.tokenizer

    async def render(events: Events) -> AsyncIterator[str]:
        async for _, chunk in events:
            event: dict[str, object] = {"text": chunk.text}
            if body.logprobs:
                event["logprobs"] = [e.model_dump() for e in token_logprobs(tokenizer, chunk.logprobs or [])]
            if chunk.finish_reason is not None:
                event["finish_reason"] = chunk.finish_reason
                event["usage"] = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}
                if body.timings:
                    event["timings"] = service.timings([chunk]).model_dump()
            yield sse(event)

    def build(done: list[Completion], timings: Timings) -> GenerateResponse:
        (d,) = done
        return GenerateResponse(
            text=d.text,
            finish_reason=d.final.finish_reason,
            usage=Usage(prompt_tokens=d.final.prompt_tokens, completion_tokens=d.final.completion_tokens),
            logprobs=None if d.logprobs is None else token_logprobs(tokenizer, d.logprobs),
            timings=timings if body.timings else None,
        )

    if body.stream:
        return service.stream(choices, render, _error_event)
    return await service.respond(choices, build)
