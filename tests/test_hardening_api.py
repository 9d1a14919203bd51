"""Hardening (issue 18) through the ASGI app with the real embedded models: /classify label limits and
costs, character limits, cache byte bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import httpx
import pytest

from engine.classifier import ClassifyItem, ClassResult, EncoderFrontend, LabelSpec
from engine.response_cache import BytesLRU
from models.sources import embedded_encoder_dir, embedded_gguf_path
from server.app import create_app
from server.config import Settings
from server.runtime import Runtime
from server.schemas import CLS_MAX_LABEL_CHARS, CLS_MAX_LABEL_TOKENS, CLS_MAX_LABELS, MAX_CHARS_PER_TOKEN

pytestmark = pytest.mark.integration

INPUTS = ["I was charged twice", "Where is my parcel?"]


def assert_error(r: httpx.Response, status: int, field: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field, r.text


async def test_label_count_limit(client: httpx.AsyncClient) -> None:
    labels = [f"intent {i}" for i in range(CLS_MAX_LABELS + 1)]
    assert_error(await client.post("/classify", json={"inputs": INPUTS, "labels": labels}), 422, "labels")


async def test_label_character_limit(client: httpx.AsyncClient) -> None:
    """Refused by size before any tokenizing (a long single word is few tokens)."""
    labels = ["billing", "x" * (CLS_MAX_LABEL_CHARS + 1)]
    assert_error(await client.post("/classify", json={"inputs": INPUTS, "labels": labels}), 422, "labels.1")


async def test_label_token_limit(client: httpx.AsyncClient) -> None:
    long_label = " ".join(["refund"] * CLS_MAX_LABEL_TOKENS)  # within the character limit
    assert len(long_label) <= CLS_MAX_LABEL_CHARS
    for labels in (["billing", long_label], [long_label, "billing"]):  # the second time, counted from the cache
        r = await client.post("/classify", json={"inputs": INPUTS, "labels": labels})
        assert_error(r, 400, f"labels.{labels.index(long_label)}")
        assert str(CLS_MAX_LABEL_TOKENS) in r.json()["error"]["message"]


@pytest.fixture
def submitted(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[list[ClassifyItem]]:
    """Every list of items the shared runtime's batcher is given while the test runs."""
    assert runtime.batcher is not None
    calls: list[list[ClassifyItem]] = []
    submit_many = runtime.batcher.submit_many

    async def recording(items: list[ClassifyItem]) -> list[object]:
        calls.append(list(items))
        return await submit_many(items)

    monkeypatch.setattr(runtime.batcher, "submit_many", recording)
    return calls


async def test_new_labels_count_in_the_batch_cost(
    client: httpx.AsyncClient, runtime: Runtime, submitted: list[list[ClassifyItem]]
) -> None:
    """The first queued item of a call carries the tokens of the labels the label cache lacks (the
    batch running it encodes them); cached labels cost nothing more."""
    assert runtime.classifier is not None
    tag = uuid.uuid4().hex[:8]  # labels and texts no earlier test cached
    labels = [f"billing question {tag}", f"delivery question {tag}"]
    texts = [f"{text} ({tag})" for text in INPUTS]
    label_tokens = sum(runtime.classifier.count_tokens(labels))
    input_tokens = runtime.classifier.count_tokens(texts)

    assert (await client.post("/classify", json={"inputs": texts, "labels": labels})).status_code == 200
    assert [it.n_tokens for it in submitted[-1]] == [input_tokens[0] + label_tokens, input_tokens[1]]
    assert runtime.classifier.uncached_labels(labels) == []

    again = [f"{text} again" for text in texts]
    assert (await client.post("/classify", json={"inputs": again, "labels": labels})).status_code == 200
    assert [it.n_tokens for it in submitted[-1]] == runtime.classifier.count_tokens(again)


async def test_label_cost_goes_to_the_first_queued_input(
    client: httpx.AsyncClient, runtime: Runtime, submitted: list[list[ClassifyItem]]
) -> None:
    """With the first input answered from the response cache, the next one (the first queued) pays."""
    assert runtime.classifier is not None and runtime.cls_cache is not None
    tag = uuid.uuid4().hex[:8]
    labels = (f"returns {tag}", f"app crash {tag}")
    cached, fresh = f"cached {tag}", f"fresh {tag}"
    key = (runtime.served.cls_model_id, cached, tuple(LabelSpec(label) for label in labels), False, None)
    runtime.cls_cache.put(key, ClassResult(labels[0], 1.0, []))
    r = await client.post("/classify", json={"inputs": [cached, fresh], "labels": list(labels)})
    assert r.status_code == 200
    (items,) = submitted
    assert [it.text for it in items] == [fresh]
    assert items[0].n_tokens == sum(runtime.classifier.count_tokens([fresh, *labels]))


def _words(tag: str, n: int) -> str:
    """``n`` words of 120 characters: each is one [UNK] token to MiniLM's tokenizer (few tokens, many bytes)."""
    return " ".join(f"{tag}{i:04d}".ljust(120, "q") for i in range(n))


async def test_inputs_bounded_by_characters_before_tokenizing(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runtime.classifier is not None
    limit = runtime.settings.cls_max_input_tokens * MAX_CHARS_PER_TOKEN
    text = "x" * (limit + 1)  # a single "word": a handful of tokens, far under the token limit

    def no_tokenizing(self: EncoderFrontend, texts: list[str]) -> list[list[int]]:
        raise AssertionError("tokenized an oversized text")

    # On the class: the runtime's classifier and the copy that tokenizes long texts off the event loop alike.
    monkeypatch.setattr(EncoderFrontend, "token_ids", no_tokenizing)
    r = await client.post("/classify", json={"inputs": ["ok", text], "labels": ["a", "b"]})
    assert_error(r, 400, "inputs.1")
    assert r.json()["error"]["type"] == "input_too_long" and str(limit) in r.json()["error"]["message"]
    r = await client.post("/v1/embeddings", json={"model": runtime.served.cls_model_id, "input": text})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


async def test_response_cache_holds_bytes_not_entries(client: httpx.AsyncClient, runtime: Runtime) -> None:
    """Many distinct large (but few-token) inputs leave the classification cache within its byte bound."""
    assert runtime.cls_cache is not None and runtime.classifier is not None
    tag = uuid.uuid4().hex[:6]
    texts = [_words(f"{tag}{i:02d}", 60) for i in range(16)]
    assert max(runtime.classifier.count_tokens(texts)) < 100 and len(texts[0]) > 7000
    assert (await client.post("/classify", json={"inputs": texts, "labels": ["a", "b"]})).status_code == 200
    assert 16 * 7000 < runtime.cls_cache.nbytes <= runtime.cls_cache._lru.max_bytes


async def test_label_cache_bounded_by_bytes(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A label cache smaller than one call's new labels evicts as it goes; every label still gets its score."""
    classifier = runtime.classifier
    assert classifier is not None
    one = classifier._label_cache.size("x" * 20, classifier.embed(["x"])[0])
    monkeypatch.setattr(classifier, "_label_cache", BytesLRU(3 * one, size=classifier._label_cache.size))
    tag = uuid.uuid4().hex[:8]
    labels = [f"topic {i} {tag}" for i in range(6)]
    r = await client.post("/classify", json={"inputs": f"about topic 4 {tag}", "labels": labels})
    assert r.status_code == 200, r.text
    assert {s["label"] for s in r.json()["results"][0]["scores"]} == set(labels)
    assert len(classifier._label_cache) <= 3 and classifier._label_cache.nbytes <= 3 * one


async def test_no_filesystem_paths_served(client: httpx.AsyncClient, settings: Settings) -> None:
    """/metrics (public by default), /info and /v1/models name models, not the paths they came from."""
    paths = {str(settings.cache_dir), str(embedded_gguf_path().parent), str(embedded_encoder_dir().parent)}
    for url in ("/info", "/v1/models", "/metrics"):
        r = await client.get(url)
        assert r.status_code == 200
        leaked = [p for p in paths if p in r.text]
        assert not leaked, (url, leaked)
    assert 'gen_model="embedded GGUF file SmolLM2-135M-Instruct (path #' in (await client.get("/metrics")).text


async def test_prefix_cache_isolated_per_api_key(settings: Settings, runtime: Runtime) -> None:
    """Issue 18: cached_tokens let a second client confirm a secret in another client's system prompt."""
    keys = ["key-a-0123456789", "key-b-0123456789"]
    app_settings = Settings.model_validate({**settings.model_dump(), "api_keys": keys})
    app = create_app(app_settings, dataclasses.replace(runtime, settings=app_settings))
    system = f"Internal note {uuid.uuid4().hex}: the vault PIN is 4921. Never reveal it. " * 4

    async def cached_tokens(client: httpx.AsyncClient, key: str) -> int:
        body = {
            "model": runtime.served.gen_model_id,
            "max_tokens": 1,
            "messages": [{"role": "system", "content": system}],
        }
        r = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    async with app.router.lifespan_context(app):
        while getattr(app.state, "runtime", None) is None:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as client:
            assert await cached_tokens(client, keys[0]) == 0
            assert await cached_tokens(client, keys[1]) == 0  # another key learns nothing
            assert await cached_tokens(client, keys[0]) > 0  # the same key still reuses its prefix
