"""Generation plumbing shared by /generate and the OpenAI-compatible routes: prompt encoding and
limits, the metrics wrapper around a chunk stream, collecting a whole completion, SSE framing."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from engine.llm_engine import EngineError, GenerationChunk, LLMClient
from server import chat_template, metrics
from server.config import Settings
from server.errors import APIError
from server.schemas import MAX_CHARS_PER_TOKEN

log = logging.getLogger(__name__)
T = TypeVar("T")


# Texts from this many characters are tokenized (and chats rendered) on a worker thread, shorter ones on the
# event loop, where they cost less than the hop; longer ones, encoded on the loop, stall every stream
# and probe the process serves (load_tests/results/tokenize_offload/results.md).
OFF_LOOP_CHARS = 1024
_WORKER = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # one: an API server's share of the host's cores
_worker_copies: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, PreTrainedTokenizerBase] = (
    weakref.WeakKeyDictionary()
)


async def _tokenize(
    tokenizer: PreTrainedTokenizerBase, n_chars: int, work: Callable[[PreTrainedTokenizerBase], T]
) -> T:
    """``work(tokenizer)`` on the loop for short texts, else on the worker thread with a copy of the
    tokenizer of its own: an HF tokenizer sets per-call flags on its Rust backend (split_special_tokens,
    which keeps chat content from forging control tokens), so one instance must never encode on two
    threads at once."""
    if n_chars < OFF_LOOP_CHARS:
        return work(tokenizer)
    own = _worker_copies.get(tokenizer)
    if own is None:
        own = _worker_copies[tokenizer] = copy.deepcopy(tokenizer)
    return await asyncio.get_running_loop().run_in_executor(_WORKER, work, own)


async def encode_chat(
    llm: LLMClient, settings: Settings, messages: list[dict[str, str]], field: str = "messages"
) -> list[int]:
    """Chat turns in the model's own template (with the assistant turn's header); content stays text.
    Their content is bounded in characters (all turns together) before the template is rendered."""
    if not llm.tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; send a plain prompt instead", field=field)
    n_chars = sum(len(m["content"]) for m in messages)
    check_chars(settings, n_chars, field)
    try:
        return await _tokenize(llm.tokenizer, n_chars, lambda tok: chat_template.encode_chat(tok, messages))
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


def check_prompt(settings: Settings, prompt_ids: list[int], field: str) -> None:
    if len(prompt_ids) > settings.max_input_tokens:
        raise APIError(
            400,
            f"{field} has {len(prompt_ids)} tokens; the limit is {settings.max_input_tokens} (max_input_tokens)",
            type="input_too_long",
            field=field,
        )


def log_prompt(settings: Settings, prompt: object, n_tokens: int) -> None:
    """Prompt text reaches the log only with ``log_prompts`` (it may hold personal data); sizes always may."""
    if settings.log_prompts:
        log.info("prompt (%d tokens): %r", n_tokens, prompt)
    else:
        log.debug("prompt of %d tokens", n_tokens)


def resolve_max_tokens(settings: Settings, requested: int | None, field: str = "max_tokens") -> int:
    max_tokens = requested or settings.default_max_tokens
    if max_tokens > settings.max_new_tokens:
        raise APIError(400, f"{field} {max_tokens} exceeds the limit {settings.max_new_tokens}", field=field)
    return max_tokens


async def timed(chunks: AsyncIterator[GenerationChunk], arrival: float) -> AsyncIterator[GenerationChunk]:
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


@dataclass(frozen=True)
class Completion:
    text: str
    final: GenerationChunk  # the last chunk: finish_reason and token counts


async def collect(chunks: AsyncIterator[GenerationChunk]) -> Completion:
    parts: list[str] = []
    async for chunk in chunks:
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            return Completion("".join(parts), chunk)
    raise EngineError("generation ended without a finish reason")


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
