"""The engine core's classification path without processes: requests queue in the batcher and are answered
from their items' callbacks, one frame per API server per loop turn; cancelled requests get no answer;
a full queue, a stopping batcher and a failed batch each get their refusal, an input the classifier refuses
its error (the API server's 400)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from engine.batcher import DynamicBatcher
from engine.classifier import ClassifierInputError, ClassifyItem, ClassResult
from engine.core import EngineCore
from engine.protocol import API_STRIDE, CancelClassify, ClassifyReplies, ClassifyRequest, ItemError, decode_from_core
from server.config import Settings
from server.runtime import Engines

pytestmark = pytest.mark.unit


class Socket:
    """Stands in for the core's connection to an API server (an engine/frames.py Sender): keeps what it sends."""

    def __init__(self) -> None:
        self.frames: list[ClassifyReplies] = []

    def send(self, frame: bytes) -> None:
        message = decode_from_core(frame)
        assert isinstance(message, ClassifyReplies)
        self.frames.append(message)


def item(text: str) -> ClassifyItem:
    return ClassifyItem(text, None, False, len(text))


def labelled(batch: list[ClassifyItem]) -> list[ClassResult | BaseException]:
    if any(it.text == "boom" for it in batch):
        raise RuntimeError("device lost")
    return [
        ClassifierInputError("no such label", field="labels")
        if it.text == "bad"
        else ClassResult(label=it.text.upper(), score=1.0, scores=[(it.text.upper(), 1.0)])
        for it in batch
    ]


def core_with(batcher: DynamicBatcher) -> tuple[EngineCore, dict[int, Socket]]:
    core = EngineCore(0, "/nonexistent/core-0", None, batcher, b"")
    return core, {0: Socket(), 1: Socket()}


async def settle(batcher: DynamicBatcher) -> None:
    """Until the batcher has run what was queued and the callbacks and reply frames have gone out."""

    async def idle() -> None:
        for _ in range(50):
            await asyncio.sleep(0)
        while batcher.queued or batcher._running:
            await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0)

    await asyncio.wait_for(idle(), timeout=30)


def test_requests_are_answered_in_one_frame_per_api_server() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(labelled, max_batch_size=8, max_wait_ms=0)
        batcher.start()
        core, sockets = core_with(batcher)
        # key % API_STRIDE names the API server: a and b are API server 0's, c is API server 1's
        key_a, key_b, key_c = 0 * API_STRIDE + 0, 1 * API_STRIDE + 0, 0 * API_STRIDE + 1
        core._take(
            [
                ClassifyRequest(key_a, [item("a"), item("b")]),
                ClassifyRequest(key_b, [item("c")]),
                ClassifyRequest(key_c, [item("d")]),
            ],
            sockets,  # type: ignore[arg-type]
        )
        await settle(batcher)
        await batcher.stop()
        assert len(sockets[0].frames) == 1 and len(sockets[1].frames) == 1
        answers = {r.key: [res.label for res in r.results] for r in sockets[0].frames[0].items}
        assert answers == {key_a: ["A", "B"], key_b: ["C"]}
        assert [res.label for res in sockets[1].frames[0].items[0].results] == ["D"]
        assert not core._waiting

    asyncio.run(scenario())


def test_a_cancelled_request_gets_no_answer_and_leaves_the_queue() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(labelled, max_batch_size=8, max_wait_ms=0)
        batcher.start()
        core, sockets = core_with(batcher)
        core._take([ClassifyRequest(0, [item("x"), item("y")])], sockets)  # type: ignore[arg-type]
        core._take([CancelClassify(0)], sockets)  # type: ignore[arg-type]
        assert not core._waiting
        await settle(batcher)
        await batcher.stop()
        assert sockets[0].frames == []
        assert batcher.queued == 0

    asyncio.run(scenario())


def test_refusals_full_closed_and_failed() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(labelled, max_batch_size=2, max_wait_ms=0, max_queued=2)
        batcher.start()
        core, sockets = core_with(batcher)
        core._take(
            [ClassifyRequest(0, [item("a"), item("b")]), ClassifyRequest(API_STRIDE, [item("c")])],
            sockets,  # type: ignore[arg-type]
        )
        await settle(batcher)
        core._take([ClassifyRequest(2 * API_STRIDE, [item("boom")])], sockets)  # type: ignore[arg-type]
        await settle(batcher)
        await batcher.stop()
        core._take([ClassifyRequest(3 * API_STRIDE, [item("late")])], sockets)  # type: ignore[arg-type]
        await settle(batcher)
        refusals = {r.key: r.refused for frame in sockets[0].frames for r in frame.items}
        assert refusals[0] is None
        assert refusals[API_STRIDE] is not None and refusals[API_STRIDE].startswith("full")
        assert refusals[2 * API_STRIDE] is not None and refusals[2 * API_STRIDE].startswith("failed")
        assert "device lost" in refusals[2 * API_STRIDE]
        assert refusals[3 * API_STRIDE] == "closed"

    asyncio.run(scenario())


def test_an_input_the_classifier_refuses_comes_back_as_its_error_and_stops_its_siblings() -> None:
    async def scenario() -> None:
        batcher = DynamicBatcher(labelled, max_batch_size=1, max_wait_ms=0)  # one item per batch
        batcher.start()
        core, sockets = core_with(batcher)
        core._take([ClassifyRequest(0, [item("bad"), item("x"), item("y")])], sockets)  # type: ignore[arg-type]
        await settle(batcher)
        await batcher.stop()
        (frame,) = sockets[0].frames
        (reply,) = frame.items
        assert reply.refused is None and reply.results == [ItemError("no such label", "labels")]
        assert batcher.queued == 0 and not core._waiting  # x and y were dropped, not run

    asyncio.run(scenario())


def test_a_request_that_cannot_be_queued_is_refused_and_the_core_serves_on() -> None:
    async def scenario() -> None:
        def cost(it: ClassifyItem) -> int:
            if it.text == "odd":
                raise ValueError("unsized")
            return 1

        batcher = DynamicBatcher(labelled, max_batch_size=8, max_wait_ms=0, cost=cost)
        batcher.start()
        core, sockets = core_with(batcher)
        core._take([ClassifyRequest(0, [item("odd")]), ClassifyRequest(API_STRIDE, [item("ok")])], sockets)  # type: ignore[arg-type]
        await settle(batcher)
        await batcher.stop()
        replies = {r.key: r for frame in sockets[0].frames for r in frame.items}
        assert replies[0].refused is not None and "unsized" in replies[0].refused
        assert [res.label for res in replies[API_STRIDE].results] == ["OK"]

    asyncio.run(scenario())


def test_an_engine_cores_batcher_runs_a_lone_batch_on_its_loop_only_where_the_encoder_is_on_cuda() -> None:
    for device, core, inline in [("cuda", True, 1), ("cpu", True, 0), ("cuda", False, 0)]:
        classifier = SimpleNamespace(device=torch.device(device), run=labelled)
        built = Engines(settings=Settings(), served=None, classifier=classifier)  # type: ignore[arg-type]
        assert built.batcher(core=core).inline_items == inline, (device, core)
