"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/embeddings``, so existing OpenAI clients can point their ``base_url`` here.

Generation is OpenAI's wire format over the generation service that /generate uses too
(server/services/generation.py): ``n`` > 1 runs n sequences; ``response_format`` and ``tools`` become
grammars (server/services/constraints.py, tools.py). Embeddings go through the same dynamic batching queue
as /classify.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from transformers import PreTrainedTokenizerBase

from engine.classifier import ClassifierInputError, ClassifyItem, Embedding
from engine.llm_engine import GenerationChunk, LLMClient
from engine.protocol import TokenLogprobs
from engine.sequence import SamplingParams
from server.errors import UNSUPPORTED, APIError, openai_error_body
from server.request_id import current_request_id
from server.routes.common import ClientDisconnected, encoder_inputs, on_encoder, ready_runtime
from server.runtime import Runtime
from server.schemas_openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
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
from server.services import constraints, tools
from server.services.generation import (
    Choice,
    Completion,
    Events,
    GenerationService,
    Timings,
    sse,
    token_logprobs,
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
    if runtime.llm is None or body.model not in (runtime.served.gen_model_id, runtime.settings.gen_model):
        raise _not_found(body.model)
    assert runtime.served.gen_model_id is not None
    body.model = runtime.served.gen_model_id
    return runtime.llm


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> ModelList:
    runtime = ready_runtime(request)
    cards = []
    for task, model_id in (("generate", runtime.served.gen_model_id), ("classify", runtime.served.cls_model_id)):
        if model_id is not None:
            # served.info[task]: source and load time; served.reports[task]: the startup compression report.
            details = dict(runtime.served.info.get(task, {}))
            if task in runtime.served.reports:
                details["compression"] = runtime.served.reports[task].model_dump(mode="json")
            cards.append(ModelCard(id=model_id, created=runtime.created, task=task, details=details))
    return ModelList(data=cards)


def _response_grammar(body: SamplingRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return constraints.json_object("response_format")
    return constraints.json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")


def _sampling(body: SamplingRequest, max_tokens: int, grammar: str | None) -> Callable[[int], SamplingParams]:
    """Choice i samples with ``seed + i`` so the n choices differ."""

    def params(index: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=None if body.seed is None else body.seed + index,
            stop=body.stop_strings,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logprobs=body.logprobs_wanted,
            grammar=grammar,
            speculative=body.speculative,
        )

    return params


def _usage(prompts: list[list[int]], finals: dict[int, GenerationChunk], choices: list[Choice]) -> Usage:
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


def _completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, logprobs: list[tuple[int, TokenLogprobs]], offset: int
) -> CompletionLogprobs:
    """The legacy completions shape; ``text_offset`` counts characters from ``offset`` (the echoed prompt's)."""
    entries = token_logprobs(tokenizer, logprobs)
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets,
    )


class _Serve:
    """One /v1 generation request: its choices over the service, whole or as OpenAI's stream of chunks."""

    def __init__(
        self,
        service: GenerationService,
        kind: Kind,
        body: ChatCompletionRequest | CompletionRequest,
        prompts: list[list[int]],
        echoes: list[str],
        max_tokens: int,
        grammar: str | None,
    ) -> None:
        self.service, self.kind, self.body, self.prompts, self.echoes = service, kind, body, prompts, echoes
        self.tokenizer = service.llm.tokenizer
        self.rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{current_request_id()}"
        self.tooling = isinstance(body, ChatCompletionRequest) and tools.active(body)
        self.choices = service.fan_out(prompts, body.n, _sampling(body, max_tokens, grammar))

    async def respond(self) -> Response:
        if self.body.stream:
            return self.service.stream(self.choices, self._events, self._error_event)
        return await self.service.respond(self.choices, self._build)

    @staticmethod
    def _error_event(code: str, message: str) -> str:
        return sse(openai_error_body("server_error", message, code=code))

    def _build(self, done: list[Completion], timings: Timings) -> ChatCompletion | TextCompletion:
        finals = {d.choice.index: d.final for d in done}
        common = {
            "id": self.rid,
            "created": int(time.time()),
            "model": self.body.model,
            "usage": _usage(self.prompts, finals, self.choices),
            "timings": timings if self.body.timings else None,
        }
        if self.kind == "text":
            choices = []
            for d in done:
                echo = self.echoes[d.choice.prompt]
                lp = None if d.logprobs is None else _completion_logprobs(self.tokenizer, d.logprobs, len(echo))
                choice = CompletionChoice(
                    index=d.choice.index, text=echo + d.text, finish_reason=d.final.finish_reason, logprobs=lp
                )
                choices.append(choice)
            return TextCompletion(choices=choices, **common)
        chat_choices = []
        for d in done:
            message, reason = AssistantMessage(content=d.text), d.final.finish_reason
            if self.tooling:
                assert isinstance(self.body, ChatCompletionRequest)
                parsed = tools.parse(d.text, self.body)
                if parsed.calls:
                    message, reason = AssistantMessage(content=parsed.content, tool_calls=parsed.calls), "tool_calls"
            lp = None if d.logprobs is None else ChatLogprobs(content=token_logprobs(self.tokenizer, d.logprobs))
            chat_choices.append(ChatChoice(index=d.choice.index, message=message, finish_reason=reason, logprobs=lp))
        return ChatCompletion(choices=chat_choices, **common)

    def _chunk(
        self,
        index: int,
        text: str | None,
        reason: str | None,
        logprobs: list[tuple[int, TokenLogprobs]] | None = None,
        delta: dict[str, object] | None = None,
    ) -> dict[str, object]:
        choice: dict[str, object]
        if self.kind == "chat":
            if delta is None:
                delta = {} if text is None else {"content": text}
            lp = (
                None
                if logprobs is None
                else {"content": [e.model_dump() for e in token_logprobs(self.tokenizer, logprobs)]}
            )
            choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": lp}
            payload: dict[str, object] = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created}
        else:
            lp = None if logprobs is None else _completion_logprobs(self.tokenizer, logprobs, 0).model_dump()
            choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": lp}
            payload = {"id": self.rid, "object": "text_completion", "created": self.created}
        payload.update(model=self.body.model, choices=[choice])
        if self.body.include_usage:
            payload["usage"] = None
        return payload

    async def _events(self, events: Events) -> AsyncIterator[str]:
        self.created = int(time.time())
        body = self.body
        finals: dict[int, GenerationChunk] = {}
        for c in self.choices:  # OpenAI opens each choice with the role (chat) or the echoed prompt (text)
            if self.kind == "chat":
                yield sse(self._chunk(c.index, None, None, delta={"role": "assistant", "content": ""}))
            elif self.echoes[c.prompt]:
                yield sse(self._chunk(c.index, self.echoes[c.prompt], None))
        splitters = {c.index: tools.StreamSplitter(body) for c in self.choices} if self.tooling else {}  # type: ignore[arg-type]
        async for choice, chunk in events:
            i, text, reason = choice.index, chunk.text, chunk.finish_reason
            if self.tooling:
                splitter = splitters[i]
                text = splitter.feed(text)
                if reason is not None:
                    parsed = splitter.finish()
                    text += parsed.content or ""
                    if parsed.calls:
                        if text:
                            yield sse(self._chunk(i, text, None))
                            text = ""
                        for k, call in enumerate(parsed.calls):  # as OpenAI streams a call: name, then arguments
                            function = {"name": call.function.name, "arguments": ""}
                            opening = {"index": k, "id": call.id, "type": "function", "function": function}
                            yield sse(self._chunk(i, None, None, delta={"tool_calls": [opening]}))
                            arguments = {"index": k, "function": {"arguments": call.function.arguments}}
                            yield sse(self._chunk(i, None, None, delta={"tool_calls": [arguments]}))
                        reason = "tool_calls"
            if reason is None and not text and not chunk.logprobs:
                continue  # held back: it may be the start of a tool call
            if reason is not None:
                finals[i] = chunk
            payload = self._chunk(i, text if text or reason is None else None, reason, chunk.logprobs)
            if reason is not None and body.timings:
                payload["timings"] = self.service.timings([chunk]).model_dump()
            yield sse(payload)
        if body.include_usage:
            usage = _usage(self.prompts, finals, self.choices).model_dump()
            object_ = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            last = {"id": self.rid, "object": object_, "created": self.created, "model": body.model}
            yield sse({**last, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    service = GenerationService(request, runtime, _llm(runtime, body))
    tokenizer = service.llm.tokenizer
    prompt_ids = await service.encode_chat(
        tools.template_messages(body, tokenizer), tools=tools.definitions(body, tokenizer)
    )
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = service.max_tokens(body.max_completion_tokens or body.max_tokens, field)
    tool_grammar, format_grammar = tools.grammar(body), _response_grammar(body)
    if tool_grammar is not None and format_grammar is not None:
        raise APIError(400, "response_format cannot apply to a forced tool call", field="response_format")
    serve = _Serve(service, "chat", body, [prompt_ids], [""], max_tokens, tool_grammar or format_grammar)
    return await serve.respond()


@router.post("/completions", response_model=TextCompletion, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    service = GenerationService(request, runtime, _llm(runtime, body))
    fields = ["prompt"] if isinstance(body.prompt, str) else [f"prompt.{i}" for i in range(len(body.prompts))]
    prompts = await service.encode_texts(body.prompts, fields)
    max_tokens = service.max_tokens(body.max_tokens)
    echoes = body.prompts if body.echo else [""] * len(prompts)
    serve = _Serve(service, "text", body, prompts, echoes, max_tokens, _response_grammar(body))
    return await serve.respond()


@router.post("/embeddings", response_model=EmbeddingList, responses=ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    served = (runtime.served.cls_model_id, runtime.settings.cls_model)  # id or, as an alias, the --cls-model spec
    if runtime.classifier is None or runtime.batcher is None or body.model not in served:
        raise _not_found(body.model)
    dim = runtime.classifier.embedding_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(400, f"dimensions: this model only produces {dim}", field="dimensions", code=UNSUPPORTED)
    ids, _ = await encoder_inputs(runtime, body.texts, "input", single=isinstance(body.input, str))
    items = [ClassifyItem(t, n_tokens=len(r), embed=True, ids=tuple(r)) for t, r in zip(body.texts, ids, strict=True)]
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
    n_tokens = sum(it.n_tokens for it in items)
    usage = EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)
    result_list = EmbeddingList(data=data, model=served[0] or body.model, usage=usage)
    return Response(result_list.model_dump_json(), media_type="application/json")
