"""Speculative decoding through the API with the embedded SmolLM2 (float, where greedy output must be identical
with and without it): /generate whole and streamed, /v1/chat/completions, the per-request field, /metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from engine import metrics
from engine.llm_engine import AsyncLLM
from engine.speculative import SpeedGate
from server.config import Settings
from server.runtime import Runtime
from tests.conftest import TEST_SETTINGS, own_runtime_client

pytestmark = pytest.mark.integration

# Answers that quote their context: what prompt lookup is for.
ARTICLE = (
    "Returns. You can return most items within 30 days of delivery for a full refund. Items must be unused and in "
    "their original packaging. Sale items can be returned within 14 days and are refunded as store credit."
)
QUOTE = f"Article: {ARTICLE}\n\nQuote the sentence of the article about sale items, word for word."


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 40, **extra}


class OpenGate(SpeedGate):
    """A speed gate that never closes."""

    def observe(self, speculative: bool, tokens: int, rows: int, seconds: float) -> None:
        pass


@pytest.fixture(scope="module")
async def spec_client(cache_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The float model with n-gram speculation on by default (requests may turn it off)."""
    settings = Settings(
        cache_dir=cache_dir,
        gen_quantize="none",
        gen_prune=0.0,
        enable_classify=False,
        speculative="ngram",
        **TEST_SETTINGS,
    )

    def open_gates(rt: Runtime) -> None:
        # The speed gates measure wall time, which a loaded machine distorts; these tests are about the API.
        assert isinstance(rt.llm, AsyncLLM)
        rt.llm.engine.speculator.gates = {1 << i: OpenGate() for i in range(8)}

    async with own_runtime_client(settings, open_gates) as c:
        yield c


async def test_greedy_text_identical_with_and_without(spec_client: httpx.AsyncClient) -> None:
    before = metrics.SPEC_ACCEPTED._value.get()
    prompts = [QUOTE, "Repeat after me three times: the parcel is on its way.", "Write one sentence about the sea."]
    for prompt in prompts:
        on = await spec_client.post("/generate", json=chat(prompt))
        off = await spec_client.post("/generate", json=chat(prompt, speculative=False))
        assert on.status_code == off.status_code == 200, on.text
        assert on.json()["text"] == off.json()["text"]
        assert on.json()["usage"] == off.json()["usage"]
    assert metrics.SPEC_ACCEPTED._value.get() > before  # drafts were accepted, not just proposed


async def test_stream_carries_several_tokens_per_event(spec_client: httpx.AsyncClient) -> None:
    whole = (await spec_client.post("/generate", json=chat(QUOTE, speculative=False))).json()
    r = await spec_client.post("/generate", json=chat(QUOTE, stream=True))
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert "".join(e["text"] for e in events) == whole["text"]
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert len(events) < whole["usage"]["completion_tokens"]  # accepted drafts arrive together


async def test_openai_route_and_metrics(spec_client: httpx.AsyncClient) -> None:
    models = (await spec_client.get("/v1/models")).json()["data"]
    model = next(m["id"] for m in models if m["task"] == "generate")
    body = {"model": model, "messages": [{"role": "user", "content": QUOTE}], "max_tokens": 30, "temperature": 0}
    on = await spec_client.post("/v1/chat/completions", json={**body, "speculative": True})
    off = await spec_client.post("/v1/chat/completions", json={**body, "speculative": False})
    assert on.status_code == off.status_code == 200, on.text
    assert on.json()["choices"][0]["message"] == off.json()["choices"][0]["message"]
    text = (await spec_client.get("/metrics")).text
    assert "llm_spec_proposed_tokens_total" in text and "llm_spec_accepted_tokens_total" in text


async def test_speculative_must_be_a_boolean(spec_client: httpx.AsyncClient) -> None:
    r = await spec_client.post("/generate", json=chat(QUOTE, speculative="yes"))
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "speculative"
