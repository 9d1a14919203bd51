"""The generation engine: a synchronous step loop on its own thread, with asyncio-facing streams.

Model work never runs on the event loop, so HTTP stays responsive while the batch computes; requests
enter and leave the running batch between any two steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from engine import metrics
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence
from models.llama import Llama

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 16
    max_batched_tokens: int = 4096
    kv_cache_tokens: int = 16384
    block_size: int = 16
    max_model_len: int = 4096
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class GenerationChunk:
    """New text for one request after one engine step; the last chunk carries ``finish_reason``."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class EngineError(RuntimeError):
    """The engine failed while running a batch; the request cannot complete."""


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationChunk | BaseException]

    def emit(self, item: GenerationChunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class LLMEngine:
    def __init__(
        self,
        model: Llama,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype,
        config: EngineConfig,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = min(config.max_model_len, model.args.max_position, config.kv_cache_tokens)
        self.blocks = BlockManager(
            config.kv_cache_tokens // config.block_size + 1, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens)
        self.runner = ModelRunner(model, self.blocks, device, dtype, config.max_num_seqs, self.max_model_len)
        metrics.KV_BYTES.set(self.runner.kv_cache_bytes)
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        # Keyed by sequence, not request id: ids come from clients (X-Request-ID) and may repeat.
        self.requests: dict[Sequence, _Request] = {}

    def add(self, request: _Request) -> None:
        self.requests[request.seq] = request
        self.scheduler.add(request.seq)

    def abort(self, seq: Sequence) -> None:
        if self.requests.pop(seq, None) is not None:
            self.scheduler.finish(seq, "abort")
            log.debug("request %s aborted after %d tokens", seq.request_id, len(seq.output_ids))
            self.update_gauges()  # no step may follow to refresh them (the engine can go idle now)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return
        start = time.perf_counter()
        for seq in seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = start
                metrics.QUEUE_TIME.labels(endpoint="generate").observe(start - seq.arrival_time)
        tokens = self.runner.run(seqs)
        for seq, token in zip(seqs, tokens, strict=True):
            seq.num_computed += seq.num_step_tokens
            seq.num_scheduled = 0
            self.blocks.commit(seq)
            if token is not None:  # None: a prompt chunk, continued in a later prefill step
                seq.output_ids.append(token)
                self._emit(self.requests[seq], token)
        metrics.STEP_TIME.labels(phase="prefill" if is_prefill else "decode").observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels(endpoint="generate").observe(len(seqs))
        self.update_gauges()

    def _emit(self, request: _Request, token: int) -> None:
        seq = request.seq
        reason = None
        if token in self.eos_ids:
            text, reason = request.detok.flush(), "stop"
        else:
            text, hit_stop = request.detok.add(token)
            if hit_stop:
                reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                text, reason = text + request.detok.flush(), "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq]
            log.debug(
                "request %s finished (%s): %d prompt tokens (%d from the prefix cache), %d generated",
                seq.request_id,
                reason,
                len(seq.prompt_ids),
                seq.num_cached_prompt,
                len(seq.output_ids),
            )
        if text or reason:
            request.emit(GenerationChunk(text, reason, len(seq.prompt_ids), len(seq.output_ids), seq.num_cached_prompt))

    def fail_all(self, error: BaseException) -> None:
        for seq, request in list(self.requests.items()):
            self.scheduler.finish(seq, "error")
            # The client sees the error type only: messages can carry paths; the log has them with the id.
            request.emit(
                EngineError(
                    f"generation failed ({type(error).__name__}); see the server log for request {seq.request_id}"
                )
            )
            del self.requests[seq]
            log.warning("request %s failed: %s", seq.request_id, error)
        self.update_gauges()

    def update_gauges(self) -> None:
        metrics.RUNNING.set(len(self.scheduler.running))
        metrics.QUEUED.labels(endpoint="generate").set(len(self.scheduler.waiting))
        metrics.KV_USAGE.set(self.blocks.usage)
        metrics.KV_BLOCKS.labels(state="free").set(self.blocks.num_free)
        metrics.KV_BLOCKS.labels(state="used").set(self.blocks.num_blocks - 1 - self.blocks.num_free)
        metrics.PREFIX_CACHE_BLOCKS.set(self.blocks.num_cached)


class AsyncLLM:
    """Owns the engine thread. All engine state is touched only from that thread; callers talk to it
    through a thread-safe inbox, and results come back through each request's asyncio queue."""

    def __init__(self, engine: LLMEngine, on_error: Callable[[BaseException], None] | None = None) -> None:
        """``on_error`` is called (on the engine thread) when a step fails, e.g. to mark the server unready."""
        self.engine = engine
        self.on_error = on_error
        self.tokenizer = engine.tokenizer
        self._inbox: queue.SimpleQueue[tuple[str, _Request | Sequence | None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._stopping = False
        self.error: BaseException | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            try:
                kind, item = self._inbox.get(timeout=None if not engine.has_work() else 0)
            except queue.Empty:
                kind, item = "", None
            while True:
                if kind == "add":
                    engine.add(item)  # type: ignore[arg-type]
                elif kind == "abort":
                    engine.abort(item)  # type: ignore[arg-type]
                try:
                    kind, item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if self._stopping:
                break
            try:
                engine.step()
            except Exception as exc:  # a failed step must not kill the loop or hang its requests
                log.exception("engine step failed")
                self.error = exc
                if self.on_error is not None:
                    self.on_error(exc)
                engine.fail_all(exc)
        engine.fail_all(RuntimeError("engine stopped"))

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        """Streams chunks for one request; leaving the iteration early (client gone) aborts it."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's limit is {self.max_model_len}")
        seq = Sequence(prompt_ids=list(prompt_ids), params=params, request_id=request_id)
        out: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        request = _Request(seq, IncrementalDetokenizer(self.tokenizer, params.stop), asyncio.get_running_loop(), out)
        self._inbox.put(("add", request))
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", seq))
