"""Through the ASGI app: classification response cache, prefix-cache hits reported in usage and
metrics, request ids in headers and logs; embedding items riding in classification batches."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from engine.classifier import ClassifyItem, ClassResult, Embedding
from engine.response_cache import ResponseCache
from server.request_id import RequestIdFilter
from server.runtime import Runtime


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


@pytest.mark.integration
async def test_repeated_classify_is_answered_from_the_cache(client: httpx.AsyncClient) -> None:
    body = {"inputs": ["my card was charged twice", "cache test: where is my box?"], "labels": ["billing", "delivery"]}
    before = (await client.get("/metrics")).text
    first = (await client.post("/classify", json=body)).json()
    second = (await client.post("/classify", json=body)).json()
    multi = (await client.post("/classify", json={**body, "multi_label": True})).json()  # another key
    after = (await client.get("/metrics")).text
    assert first == second
    assert multi != first
    hits = 'llm_response_cache_hits_total{endpoint="classify"}'
    misses = 'llm_response_cache_misses_total{endpoint="classify"}'
    assert metric(after, hits) - metric(before, hits) == 2
    assert metric(after, misses) - metric(before, misses) == 4


@pytest.mark.unit
def test_response_cache_evicts_least_recently_used() -> None:
    cache: ResponseCache[str, int] = ResponseCache(2, name="unit")
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2
    with pytest.raises(ValueError):
        ResponseCache(0, name="unit")


@pytest.mark.integration
async def test_shared_system_prompt_hits_the_prefix_cache(client: httpx.AsyncClient) -> None:
    system = "You are the support assistant of Example Shop. Be brief, friendly and precise. " * 6
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    before = (await client.get("/metrics")).text
    usages = []
    for question in ("Where is my parcel?", "Can I return shoes?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        r = await client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 2})
        usages.append(r.json()["usage"])
    after = (await client.get("/metrics")).text
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 64 and cached < usages[1]["prompt_tokens"]
    name = "llm_prefix_cache_hit_tokens_total"
    assert metric(after, name) - metric(before, name) >= cached
    assert 0 < metric(after, "llm_prefix_cache_hit_rate") <= 1
    assert metric(after, "llm_prefix_cache_blocks") >= cached // 16


@pytest.mark.integration
async def test_request_id_in_header_and_logs(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="server.access"):
        r = await client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-ID": "log-me-7"})
        bad = await client.post("/generate", json={"prompt": ""})
    assert r.headers["x-request-id"] == "log-me-7"
    lines = {rec.request_id: rec.getMessage() for rec in caplog.records if rec.name == "server.access"}
    assert lines["log-me-7"].startswith("POST /generate 200 ")
    assert lines[bad.headers["x-request-id"]].startswith("POST /generate 422 ")


@pytest.mark.integration
def test_embeddings_share_a_batch_with_classification(runtime: Runtime) -> None:
    classifier = runtime.classifier
    assert classifier is not None
    texts = ["I was charged twice", "Where is my parcel?"]
    mixed = classifier.run(
        [
            ClassifyItem(texts[0], ("billing", "delivery")),
            ClassifyItem(texts[1], embed=True),
            ClassifyItem(texts[0], embed=True),
        ]
    )
    assert isinstance(mixed[0], ClassResult) and mixed[0].label == "billing"
    alone = classifier.embed(texts[1:] + texts[:1]).tolist()
    for result, expected in zip(mixed[1:], alone, strict=True):
        assert isinstance(result, Embedding)
        assert result.vector == pytest.approx(expected, abs=1e-5)
