"""The generation engine: a synchronous step loop on its own thread (in the server's process or in an
engine-core process), and the asyncio-facing client that turns its token ids into text streams.

Model work never runs on the event loop, so HTTP stays responsive while the batch computes; requests
enter and leave the running batch between any two steps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from engine import metrics
from engine.constraints import Grammars
from engine.cuda_graphs import DecodeConfig
from engine.deadlines import StepRates, admissible, unreachable
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import BlockManager
from engine.model_runner import ModelRunner
from engine.protocol import API_STRIDE, Abort, AddRequest, StepOutputs, TokenLogprobs, TokenOutput
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence
from engine.speculative import DraftModel, Method, Speculator
from engine.tp import StepFanout
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
    compile_decode: bool = False  # decode steps as torch.compile graphs (engine/cuda_graphs.py)
    compile_background: bool = False  # with compile_decode: compiled after start (start_compiling), eager until then
    # Speculative decoding (engine/speculative.py): "ngram" or "draft" speculate for requests that do not say
    # otherwise; "none" only for those that ask (with n-gram lookup, or the draft model when there is one).
    speculative: Literal["none", "ngram", "draft"] = "none"
    speculative_tokens: int = 4  # draft tokens proposed per row and step, at most

    def kv_blocks(self) -> BlockManager:
        """The KV cache's blocks, laid out alike on every tensor-parallel rank."""
        return BlockManager(self.kv_cache_tokens // self.block_size + 1, self.block_size, self.enable_prefix_caching)

    def decode(self, model: Llama) -> DecodeConfig:
        """The decode steps of ``model``'s runner, alike on every tensor-parallel rank (rank 0's runner has the
        ``fanout`` to the others, theirs ``sample=False``)."""
        return DecodeConfig(
            self.max_num_seqs,
            max_model_len(model, self),
            self.compile_decode,
            self.compile_background,
            verify_width=1 + self.speculative_tokens,
            capture_verify=self.speculative != "none",
        )


@dataclass(frozen=True)
class Timeline:
    """When (perf_counter, this process's clock) a request's sequence was first scheduled, produced its first
    token and finished."""

    scheduled: float
    first_token: float
    finished: float


@dataclass(frozen=True)
class GenerationChunk:
    """New text for one request after one engine step; the last chunk carries ``finish_reason``."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    first_token_time: float | None = None  # perf_counter of the first token, on a whole (not streamed) result
    # (token id, its log-probabilities) for each token behind this chunk's text, when the request asked
    logprobs: list[tuple[int, TokenLogprobs]] | None = None
    timeline: Timeline | None = None  # on the last chunk


class EngineError(RuntimeError):
    """The engine failed while running a batch; the request cannot complete."""


SHED_MESSAGE = (
    "server overloaded: the work queued ahead of this request would not let it finish before its deadline; "
    "retry later, or with a smaller max_tokens or a longer deadline"
)


class RequestShed(Exception):
    """The engine refused a waiting request that could no longer finish before its deadline (overload:
    the work queued ahead of it would take too long; engine/deadlines.py). Nothing of it was computed."""


def max_model_len(model: Llama, config: EngineConfig) -> int:
    return min(config.max_model_len, model.args.max_position, config.kv_cache_tokens)


class LLMEngine:
    """Scheduler, KV cache and model runner: one step at a time, token ids in and out. Text (detokenization
    and stop strings) is the API server's business, so this can run in a process of its own."""

    def __init__(
        self,
        model: Llama,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        dtype: torch.dtype,
        config: EngineConfig,
        fanout: StepFanout | None = None,
        draft: Llama | None = None,
    ) -> None:
        """``fanout``: under tensor parallelism, this is rank 0 and the other ranks follow its steps.
        ``draft``: a smaller model of the same tokenizer proposing speculative tokens."""
        self.tokenizer = tokenizer
        self.config = config
        self.runner = ModelRunner(model, config.kv_blocks(), device, dtype, config.decode(model), fanout)
        self.blocks = self.runner.blocks
        self.max_model_len = max_model_len(model, config)
        self.speculator = self._speculator(model, draft, device, dtype)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens)
        metrics.KV_BYTES.set(self.runner.kv_cache_bytes)
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        # Keyed by the API server's request key, not the request id: ids come from clients and may repeat.
        self.requests: dict[int, Sequence] = {}
        self.grammars = Grammars(tokenizer, model.args.vocab_size)
        self.rates = StepRates()  # measured speed: what cannot meet its deadline is not started
        self.clock: Callable[[], float] = time.perf_counter  # of deadlines and step times (tests fake it)
        self.scheduler.admit = lambda seq, own: admissible(
            seq, self.scheduler.running, self.rates, self.clock(), self.scheduler.max_batched_tokens, own
        )

    def _speculator(self, model: Llama, draft: Llama | None, device: torch.device, dtype: torch.dtype) -> Speculator:
        config, proposer = self.config, None
        if draft is not None:
            if draft.args.vocab_size != model.args.vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary ({draft.args.vocab_size}) differs from the model's "
                    f"({model.args.vocab_size}): it needs the same tokenizer"
                )
            if draft.args.max_position < self.max_model_len:
                raise ValueError(
                    f"the draft model's positions ({draft.args.max_position}) are fewer than the model length "
                    f"served ({self.max_model_len})"
                )
            # Its catch-ups after each verification are as wide as a verification: captured at startup.
            width = 1 + config.speculative_tokens
            decode = DecodeConfig(config.max_num_seqs, self.max_model_len, verify_width=width, capture_verify=True)
            runner = ModelRunner(draft, self.blocks, device, dtype, decode)
            proposer = DraftModel(runner)
        elif config.speculative == "draft":
            raise ValueError("speculative 'draft' needs a draft model")
        method: Method = "draft" if proposer is not None else "ngram"
        default_on = config.speculative != "none"
        decode = self.runner.decode
        # With compiled steps a width first asked for mid-serving would compile then (a minute or more).
        opt_in = default_on or not decode.compiled
        padded = 1 + config.speculative_tokens if decode.fixed_width else 0
        return Speculator(method, config.speculative_tokens, default_on, self.max_model_len, proposer, opt_in, padded)

    def start_compiling(self) -> None:
        """With background compiling: starts compiling the decode steps (engine/cuda_graphs.py); call it once
        serving has started. Steps run eagerly until each bucket's graph exists; each bucket's load into this
        process waits a while for a moment with nothing to step."""
        self.runner.decode.start_compiling(idle=lambda: not self.has_work())

    def stop_compiling(self) -> None:
        """Ends background compiling's compiler process, if one runs (the engine is stopping)."""
        self.runner.decode.stop_compiling()

    def add(self, request: AddRequest) -> None:
        seq = Sequence(prompt_ids=request.prompt_ids, params=request.params, request_id=request.request_id)
        seq.key = request.key
        if request.timeout_s is not None:
            seq.deadline = self.clock() + request.timeout_s
        if request.params.grammar is not None:
            seq.constraint = self.grammars.constraint(request.params.grammar)
        self.requests[request.key] = seq
        self.scheduler.add(seq)

    def abort(self, key: int) -> None:
        seq = self.requests.pop(key, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")
            log.debug("request %s aborted after %d tokens", seq.request_id, len(seq.output_ids))
            self.update_gauges()  # no step may follow to refresh them (the engine can go idle now)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenOutput]:
        entered = time.perf_counter()  # the step's time includes shedding and scheduling (admission)
        shed = self._shed()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            if shed:
                self.update_gauges()
            return shed
        start = time.perf_counter()
        for seq in seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = start
                metrics.QUEUE_TIME.labels(endpoint="generate").observe(start - seq.arrival_time)
        began = self.clock()
        if not is_prefill:  # proposing counts in the step's time: a draft model's forwards are part of its cost
            ks = self.speculator.plan(seqs)
            if any(ks):
                self.speculator.propose(seqs, self.scheduler.reserve_drafts(seqs, ks))
        computed, context = sum(s.num_step_tokens for s in seqs), sum(s.num_tokens for s in seqs)
        speculative = any(s.draft_ids for s in seqs)
        if speculative:
            produced = self.runner.run_speculative(seqs)
        else:
            produced = [[] if t is None else [t] for t in self.runner.run(seqs)]
        seconds = self.clock() - began
        if is_prefill:
            self.rates.observe_prefill(computed, seconds)
        else:
            self.rates.observe_decode(context, seconds)
            self.speculator.timed(len(seqs), speculative, sum(map(len, produced)), seconds)
        if speculative:
            self.speculator.observe([(s, len(t) - 1) for s, t in zip(seqs, produced, strict=True) if s.draft_ids])
        outputs = shed
        for seq, tokens in zip(seqs, produced, strict=True):
            advance = seq.num_step_tokens  # positions whose K/V this step wrote
            if not tokens and seq.num_computed + advance == seq.num_tokens:
                # A constrained row's token put off (engine/constraints.py), in a decode step or a prompt's last
                # chunk: its last position is computed again next step, as a decode step.
                advance -= 1
                metrics.GRAMMAR_PUT_OFF.inc()
            if seq.draft_ids:  # the last token and the accepted drafts: the rest is overwritten later
                advance = len(tokens)
            seq.num_scheduled, seq.draft_ids = 0, []
            reason = None
            for token in tokens:  # none (a prompt chunk), one, or several (accepted drafts)
                seq.output_ids.append(token)
                reason = self._finish_reason(seq, token)
                outputs.append(self._output(seq, token, reason))
                if reason is not None:  # tokens past a stop or a limit are dropped
                    break
            seq.num_computed = min(seq.num_computed + advance, seq.num_tokens)
            self.blocks.commit(seq)
            if reason is not None:
                self._finish(seq, reason)
        metrics.STEP_TIME.labels(phase="prefill" if is_prefill else "decode").observe(time.perf_counter() - entered)
        metrics.BATCH_SIZE.labels(endpoint="generate").observe(len(seqs))
        self.update_gauges()
        return outputs

    def _shed(self) -> list[TokenOutput]:
        """Refuses the waiting requests that can no longer finish before their deadlines."""
        waiting = self.scheduler.waiting
        if not waiting or all(seq.deadline is None for seq in waiting):
            return []
        block_size = self.blocks.block_size
        late = unreachable(
            self.scheduler.running,
            waiting,
            self.rates,
            self.clock(),
            self.scheduler.max_batched_tokens,
            lambda seq: seq.num_tokens - len(self.blocks.match_prefix(seq)) * block_size,
        )
        for seq in late:
            self.scheduler.finish(seq, "shed")
            del self.requests[seq.key]
            metrics.SHED.inc()
            log.info("request %s shed: it could not finish before its deadline", seq.request_id)
        return [TokenOutput(seq.key, None, "shed", len(seq.prompt_ids), 0) for seq in late]

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.eos_ids:
            return "stop"
        if len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        del self.requests[seq.key]
        log.debug(
            "request %s finished (%s): %d prompt tokens (%d from the prefix cache), %d generated",
            seq.request_id,
            reason,
            len(seq.prompt_ids),
            seq.num_cached_prompt,
            len(seq.output_ids),
        )

    def _output(self, seq: Sequence, token: int, reason: str | None) -> TokenOutput:
        scheduled_ago = None
        if len(seq.output_ids) == 1 and seq.first_scheduled_time is not None:
            scheduled_ago = time.perf_counter() - seq.first_scheduled_time
        return TokenOutput(
            seq.key, token, reason, len(seq.prompt_ids), seq.num_cached_prompt, seq.logprobs, scheduled_ago
        )

    def fail_all(self, error: BaseException) -> list[TokenOutput]:
        outputs = []
        for key, seq in list(self.requests.items()):
            self.scheduler.finish(seq, "error")
            outputs.append(TokenOutput(key, None, "error", len(seq.prompt_ids), seq.num_cached_prompt))
            log.warning("request %s failed: %s", seq.request_id, error)
        self.requests.clear()
        self.update_gauges()
        return outputs

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

    def update_gauges(self) -> None:
        metrics.RUNNING.set(len(self.scheduler.running))
        metrics.QUEUED.labels(endpoint="generate").set(len(self.scheduler.waiting))
        metrics.KV_USAGE.set(self.blocks.usage)
        metrics.KV_BLOCKS.labels(state="free").set(self.blocks.num_free)
        metrics.KV_BLOCKS.labels(state="used").set(self.blocks.num_blocks - 1 - self.blocks.num_free)
        metrics.PREFIX_CACHE_BLOCKS.set(self.blocks.num_cached)


class EngineLoop:
    """Owns the engine thread: all engine state is touched only there. Commands arrive through a
    thread-safe inbox; each step's outputs leave through ``publish`` in one call (to the event loop of
    this process, or to the API servers' sockets in an engine-core process)."""

    def __init__(
        self,
        engine: LLMEngine,
        publish: Callable[[StepOutputs], None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``on_error`` is called (on the engine thread) when a step fails, e.g. to mark the server unready."""
        self.engine = engine
        self.publish = publish
        self.on_error = on_error
        self._inbox: queue.SimpleQueue[list[AddRequest | Abort] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._stopping = False
        self.error: BaseException | None = None

    def submit(self, commands: list[AddRequest | Abort]) -> None:
        """Commands given together are taken in together, before the next step."""
        self._inbox.put(commands)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.engine.stop_compiling()
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stopping:
            try:
                commands = self._inbox.get(timeout=None if not engine.has_work() else 0)
            except queue.Empty:
                commands = None
            while True:
                for command in commands or ():
                    if isinstance(command, AddRequest):
                        engine.add(command)
                    else:
                        engine.abort(command.key)
                try:
                    commands = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if self._stopping:
                break
            try:
                outputs = engine.step()
            except Exception as exc:  # a failed step must not kill the loop or hang its requests
                log.exception("engine step failed")
                self.error = exc
                if self.on_error is not None:
                    self.on_error(exc)
                self._publish(engine.fail_all(exc), f"generation failed ({type(exc).__name__})")
                continue
            if outputs:
                self._publish(outputs)
        self._publish(engine.fail_all(RuntimeError("engine stopped")), "generation engine stopped")

    def _publish(self, outputs: list[TokenOutput], error: str | None = None) -> None:
        if outputs:
            self.publish(StepOutputs(outputs, *self.engine.load(), error))


@dataclass(eq=False)
class _Request:
    detok: IncrementalDetokenizer
    out: asyncio.Queue[GenerationChunk | BaseException]
    request_id: str
    whole: bool  # only the finished result is wanted (one chunk); else a chunk per step with new text
    logprobs: list[tuple[int, TokenLogprobs]] | None  # not yet sent; None: not asked for
    text: list[str] = field(default_factory=list)  # not yet sent
    tokens: int = 0
    first_token_time: float | None = None
    scheduled_time: float | None = None


class LLMClient:
    """The asyncio face of an engine, local or in another process: sends commands through ``send`` and
    turns each step's token ids (``on_step``, called on the event loop) into text chunks per request,
    detokenizing and matching stop strings here, next to HTTP, and away from the engine's loop."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_model_len: int,
        send: Callable[[AddRequest | Abort], None],
        key_offset: int = 0,
    ) -> None:
        """``key_offset`` (this API server's index) tags keys so that a core serving several API servers
        can route outputs back (``key % API_STRIDE``)."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.send = send
        self._keys = itertools.count(key_offset, API_STRIDE)
        self.requests: dict[int, _Request] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None  # set when the engine is gone for good

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        stream: bool = True,
        deadline: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Streams chunks for one request; leaving the iteration early (client gone) aborts it. With
        ``stream=False`` the one chunk is the whole text (no wake-up of the caller per token). With a
        ``deadline`` (event-loop time) the engine sheds the request while it waits if it can no longer
        finish by then: :class:`RequestShed` is raised."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's limit is {self.max_model_len}")
        if self.error is not None:
            raise EngineError(self.error)
        self.loop = asyncio.get_running_loop()  # where on_step must run
        key = next(self._keys)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        request = _Request(detok, asyncio.Queue(), request_id, not stream, None if params.logprobs is None else [])
        self.requests[key] = request
        timeout_s = None if deadline is None else deadline - self.loop.time()
        self.send(AddRequest(key, list(prompt_ids), params, request_id, timeout_s))
        try:
            while True:
                item = await request.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if self.requests.pop(key, None) is not None:  # still running in the engine
                self.send(Abort(key))

    def on_step(self, step: StepOutputs) -> None:
        """A step may carry several tokens of one request (speculative decoding): a streamed request gets
        one chunk per step with all of their text, a finished one its last chunk at once."""
        streamed: dict[int, tuple[_Request, TokenOutput]] = {}  # streams with new text, not finished
        now = time.perf_counter()
        for out in step.outputs:
            request = self.requests.get(out.key)
            if request is None:  # aborted here; the core learns of it after this step
                continue
            if out.finish_reason == "error":
                del self.requests[out.key]
                request.out.put_nowait(self._failure(step.error or "generation failed", request))
                continue
            if out.finish_reason == "shed":
                del self.requests[out.key]
                request.out.put_nowait(RequestShed(SHED_MESSAGE))
                continue
            request.tokens += 1
            if request.tokens == 1:
                request.first_token_time = now
            if out.scheduled_ago is not None:
                request.scheduled_time = now - out.scheduled_ago
            reason = out.finish_reason
            if reason == "stop":  # end of sequence: the token itself is not text
                text = request.detok.flush()
            else:
                assert out.token is not None
                if request.logprobs is not None and out.logprobs is not None:
                    request.logprobs.append((out.token, out.logprobs))
                text, hit_stop = request.detok.add(out.token)
                if hit_stop:
                    reason = "stop"
                    self.send(Abort(out.key))
                elif reason == "length":
                    text += request.detok.flush()
            request.text.append(text)
            if reason is None:
                if not request.whole:
                    streamed[out.key] = (request, out)
                continue
            del self.requests[out.key]
            streamed.pop(out.key, None)
            self._emit(request, out, reason, now)
        for request, out in streamed.values():
            self._emit(request, out, None, now)

    def _emit(self, request: _Request, out: TokenOutput, reason: str | None, now: float) -> None:
        """The request's text since its last chunk (for a whole result: all of it) as a chunk, if any."""
        text = "".join(request.text)
        request.text.clear()
        if not (text or reason):
            return
        first = request.first_token_time if request.whole else None
        logprobs = request.logprobs
        if logprobs is not None:
            request.logprobs = []
        timeline = None
        if reason is not None:
            first_token = request.first_token_time or now
            timeline = Timeline(request.scheduled_time or first_token, first_token, now)
        chunk = GenerationChunk(
            text, reason, out.prompt_tokens, request.tokens, out.cached_tokens, first, logprobs, timeline
        )
        request.out.put_nowait(chunk)

    def fail_all(self, message: str) -> None:
        """The engine is gone: every request in flight and every later one fails with ``message``."""
        self.error = message
        requests, self.requests = self.requests, {}
        for request in requests.values():
            request.out.put_nowait(self._failure(message, request))

    @staticmethod
    def _failure(message: str, request: _Request) -> EngineError:
        # The client sees the error type only: messages can carry paths; the log has them with the id.
        return EngineError(f"{message}; see the server log for request {request.request_id}")


class AsyncLLM(LLMClient):
    """An engine on a thread of this process; its steps reach the event loop as one callback each."""

    def __init__(self, engine: LLMEngine, on_error: Callable[[BaseException], None] | None = None) -> None:
        """``on_error`` is called (on the engine thread) when a step fails, e.g. to mark the server unready."""
        super().__init__(engine.tokenizer, engine.max_model_len, self._submit)
        self.engine = engine
        self._on_error = on_error
        self._thread = EngineLoop(engine, self._publish, self._failed)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._thread.stop(timeout)

    def _submit(self, command: AddRequest | Abort) -> None:
        self._thread.submit([command])

    def _publish(self, step: StepOutputs) -> None:
        assert self.loop is not None  # a step has outputs only after a generate() call
        self.loop.call_soon_threadsafe(self.on_step, step)

    def _failed(self, exc: BaseException) -> None:
        self.error = f"generation engine failed ({type(exc).__name__})"
        if self._on_error is not None:
            self._on_error(exc)
