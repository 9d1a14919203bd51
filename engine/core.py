"""An engine core: the models of one device behind a Unix socket, with no HTTP in its process.

API servers connect to the core's one listening path and send commands; the core connects to each API
server's own listening path and sends results (engine/frames.py). Generation runs on the engine thread
(:class:`EngineLoop`), which sends one frame per step per API server on connections of its own;
classification runs through the dynamic batcher on this process's event loop, between and beside generation
steps on the same device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from engine.batcher import BatcherClosed, BatcherFull, DynamicBatcher
from engine.classifier import ClassifierInputError, ClassifyItem, ClassResult, Embedding
from engine.frames import Sender, listen, read_frames
from engine.llm_engine import EngineLoop, LLMEngine
from engine.protocol import (
    API_STRIDE,
    Abort,
    AddRequest,
    CancelClassify,
    ClassifyReplies,
    ClassifyRequest,
    ClassifyResults,
    Command,
    Commands,
    Hello,
    Ready,
    StepOutputs,
    decode_to_core,
    encode,
    pack_result,
)

log = logging.getLogger(__name__)

Batcher = DynamicBatcher[ClassifyItem, ClassResult | Embedding | ClassifierInputError]
Replies = dict[int, Sender]  # API server index -> the connection its replies go to


class EngineCore:
    def __init__(
        self,
        index: int,
        address: str,
        engine: LLMEngine | None,
        batcher: Batcher | None,
        details: bytes,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.index = index
        self.address = address
        self.batcher = batcher
        self.details = details
        self.loop = EngineLoop(engine, self._publish_step, on_error) if engine is not None else None
        # The engine thread's own connections, one per API server, made with its Hello (before any of its requests)
        self._step_senders: dict[int, Sender] = {}
        self._waiting: dict[int, list[asyncio.Future[Any]]] = {}  # a classification request's items, by key
        self._replies: dict[int, list[ClassifyResults]] = {}  # per API server, sent once per loop turn

    async def serve(self) -> None:
        """Until the process is stopped (the supervisor's SIGTERM, once the API servers have drained)."""
        loop = asyncio.get_running_loop()
        listener = listen(self.address)
        replies: Replies = {}
        if self.loop is not None:
            self.loop.start()
            self.loop.engine.start_compiling()  # with background compiling (CPU): after the loop serves
        if self.batcher is not None:
            self.batcher.start()
        log.info("engine core %d serving on %s", self.index, self.address)

        def on_frame(frame: bytes) -> None:
            message = decode_to_core(frame)
            if isinstance(message, Commands):
                self._take(message.items, replies)
            elif isinstance(message, Hello):
                try:  # it listens already, unless it died since: then the server is going down anyway
                    sender, steps = Sender(message.address, loop), Sender(message.address, loop)
                except OSError as exc:
                    log.warning("API server %d is gone before its Ready (%s)", message.api_index, exc)
                    return
                replies[message.api_index], self._step_senders[message.api_index] = sender, steps
                sender.send(encode(Ready(self.index, os.getpid(), self.details)))

        try:
            await read_frames(listener, on_frame)
        finally:
            for futures in self._waiting.values():
                for future in futures:
                    future.cancel()
            if self.batcher is not None:
                await self.batcher.stop(drain=False)
            if self.loop is not None:
                await asyncio.to_thread(self.loop.stop)
            for sender in [*replies.values(), *self._step_senders.values()]:
                sender.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    def _take(self, items: list[Command], replies: Replies) -> None:
        generation = [item for item in items if isinstance(item, AddRequest | Abort)]
        if generation:
            assert self.loop is not None
            self.loop.submit(generation)
        for item in items:
            if isinstance(item, ClassifyRequest):
                self._classify(item, replies)
            elif isinstance(item, CancelClassify):
                for future in self._waiting.pop(item.key, ()):
                    future.cancel()

    def _classify(self, request: ClassifyRequest, replies: Replies) -> None:
        """Queues a request's items; its reply goes out from its items' callbacks (no task per request: at
        thousands of requests a second the core's event loop is the shared resource): the results once the
        last one is done, or at the first item that fails, whose siblings are then dropped (as in process)."""
        key = request.key
        try:
            assert self.batcher is not None
            futures = self.batcher.enqueue_many(request.items)
        except BatcherFull as exc:
            self._reply(ClassifyResults(key, [], refused=f"full: {exc}"), replies)
            return
        except BatcherClosed:
            self._reply(ClassifyResults(key, [], refused="closed"), replies)
            return
        except Exception as exc:  # this request's alone: the core serves on
            log.exception("classification request %d could not be queued", key)
            self._reply(ClassifyResults(key, [], refused=f"failed: {exc!r}"), replies)
            return
        if not futures:
            self._reply(ClassifyResults(key, []), replies)
            return
        self._waiting[key] = futures
        left = [len(futures)]

        def done(future: asyncio.Future[Any]) -> None:
            if key not in self._waiting:  # cancelled by its API server, or answered already
                return
            error = BatcherClosed("stopping") if future.cancelled() else future.exception()
            if error is not None:
                del self._waiting[key]
                for sibling in futures:
                    sibling.cancel()
                self._reply(_failure(key, error), replies)
                return
            left[0] -= 1
            if left[0] == 0:
                del self._waiting[key]
                self._reply(ClassifyResults(key, [pack_result(f.result()) for f in futures]), replies)

        for future in futures:
            future.add_done_callback(done)

    def _reply(self, reply: ClassifyResults, replies: Replies) -> None:
        api = reply.key % API_STRIDE
        pending = self._replies.setdefault(api, [])
        pending.append(reply)
        if len(pending) == 1:  # the requests one batch finished wake together: one frame for all of them
            asyncio.get_running_loop().call_soon(self._send_replies, api, replies[api])

    def _send_replies(self, api: int, sender: Sender) -> None:
        sender.send(encode(ClassifyReplies(self._replies.pop(api), core=self.index)))

    def _publish_step(self, step: StepOutputs) -> None:
        """On the engine thread: one frame per API server that has outputs in this step, written by this thread
        (no hand-off to the event loop on a step's way out; a sender never blocks it, see :class:`Sender`)."""
        by_api: dict[int, list] = {}
        for out in step.outputs:
            by_api.setdefault(out.key % API_STRIDE, []).append(out)
        for api, outputs in by_api.items():
            frame = encode(StepOutputs(outputs, step.running, step.waiting, step.error, self.index))
            self._step_senders[api].send(frame)


def _failure(key: int, error: BaseException) -> ClassifyResults:
    """The reply for a request one of whose items failed: an input the classifier refuses travels as that
    item's error (the API server answers 400 naming the field), a stopping core as "closed" (503), anything
    else as "failed" (500)."""
    if isinstance(error, ClassifierInputError):
        return ClassifyResults(key, [pack_result(error)])
    if isinstance(error, BatcherClosed):
        return ClassifyResults(key, [], refused="closed")
    return ClassifyResults(key, [], refused=f"failed: {error!r}")
