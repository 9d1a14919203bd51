"""Overload, deadlines, limits, fault isolation and access control, on ASGI apps sharing the session's
loaded models (a separately configured app, or a separately built engine where a test breaks it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from engine.batcher import DynamicBatcher
from engine.llm_engine import AsyncLLM, EngineConfig, LLMEngine
from load_tests.flood import flood
from load_tests.loadgen import make_scenario
from load_tests.soak import EXPECTED_OUTCOMES, soak
from server.app import create_app
from server.config import Settings
from server.metrics import REQUESTS
from server.runtime import Runtime

pytestmark = pytest.mark.integration

LONG = {"prompt": "Once upon a time", "max_tokens": 32}  # greedy: runs to max_tokens


@pytest.fixture
async def make_client(settings: Settings, runtime: Runtime) -> AsyncIterator:
    """Builds ASGI clients on apps with overridden settings (and optionally another runtime)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(rt: Runtime | None = None, **overrides: object) -> httpx.AsyncClient:
            app_settings = Settings.model_validate({**settings.model_dump(), **overrides})
            # The routes read limits from the runtime's settings: give it the overridden ones too.
            app = create_app(app_settings, dataclasses.replace(rt or runtime, settings=app_settings))
            await stack.enter_async_context(app.router.lifespan_context(app))
            for _ in range(100):  # the lifespan's bring-up task installs the (already started) runtime
                if getattr(app.state, "runtime", None) is not None:
                    break
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120)
            return await stack.enter_async_context(client)

        yield make


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


async def assert_idle(client: httpx.AsyncClient) -> None:
    """The engine's running batch and KV cache are empty again (the abort reached the engine thread)."""
    for _ in range(200):
        text = (await client.get("/metrics")).text
        if gauge(text, "llm_running_sequences") == 0 and gauge(text, "llm_kv_cache_usage_ratio") == 0:
            break
        await asyncio.sleep(0.02)
    assert gauge(text, "llm_running_sequences") == 0
    assert gauge(text, "llm_kv_cache_usage_ratio") == 0
    assert gauge(text, 'llm_queued_requests{endpoint="generate"}') == 0
    assert 'http_requests_in_flight{endpoint="/generate"} 0.0' in text


# ---------------------------------------------------------------- backpressure


async def test_generate_queue_bound_gives_429(make_client) -> None:
    c = await make_client(max_num_seqs=2, max_queued_requests=1)  # 3 admitted at most
    responses = await asyncio.gather(*(c.post("/generate", json=LONG) for _ in range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [429] * 5
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in responses if r.status_code == 200)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert "max_queued_requests" in refused.json()["error"]["message"]
    assert (await c.post("/generate", json={"prompt": "hi", "max_tokens": 2})).status_code == 200  # slots freed
    await assert_idle(c)


async def test_concurrent_streams_bound_gives_429(make_client) -> None:
    c = await make_client(max_concurrent_streams=1)
    stream = {**LONG, "stream": True}
    first, second = await asyncio.gather(c.post("/generate", json=stream), c.post("/generate", json=stream))
    assert sorted([first.status_code, second.status_code]) == [200, 429]
    refused = first if first.status_code == 429 else second
    assert "max_concurrent_streams" in refused.json()["error"]["message"]
    assert (await c.post("/generate", json={**stream, "max_tokens": 2})).status_code == 200


async def test_classify_queue_bound_gives_429(make_client, runtime: Runtime) -> None:
    assert runtime.classifier is not None
    # A batcher of its own that holds items 300 ms, so the first call is still queued when the second comes.
    batcher = DynamicBatcher(runtime.classifier.run, max_wait_ms=300, max_queued=3, cost=lambda i: i.n_tokens)
    rt = dataclasses.replace(runtime, llm=None, batcher=batcher, cls_cache=None)
    c = await make_client(rt)
    body = {"inputs": ["refund please", "where is my parcel"], "labels": ["billing", "shipping"]}
    first, second = await asyncio.gather(c.post("/classify", json=body), c.post("/classify", json=body))
    assert sorted([first.status_code, second.status_code]) == [200, 429]
    refused = first if first.status_code == 429 else second
    assert refused.headers["Retry-After"] == "1"
    assert "cls_max_queued_inputs" in refused.json()["error"]["message"]
    await batcher.stop()


async def test_openai_routes_share_the_bounds(make_client) -> None:
    c = await make_client(max_num_seqs=2, max_queued_requests=1)  # 3 sequences admitted at most
    chat = {"model": "default", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32}
    r = await c.post("/v1/chat/completions", json={**chat, "n": 4})  # never admissible, even alone
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert "at most 3" in r.json()["error"]["message"]
    responses = await asyncio.gather(
        c.post("/v1/chat/completions", json={**chat, "n": 2}),
        c.post("/v1/completions", json={"model": "default", "prompt": "Once upon a time", "max_tokens": 32, "n": 2}),
        c.post("/generate", json=LONG),
    )
    assert sorted(r.status_code for r in responses).count(429) >= 1
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    if refused.request.url.path.startswith("/v1/"):
        assert refused.json()["error"]["code"] == "overloaded"  # OpenAI's error shape under /v1
    slow = {"model": "default", "prompt": "Once upon a time", "max_tokens": 64}
    r = await c.post("/v1/completions", json=slow, headers={"X-Request-Timeout": "0.05"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    r = await c.post("/v1/completions", json={**slow, "stream": True}, headers={"X-Request-Timeout": "0.3"})
    assert r.status_code == 200 and '"code": "timeout"' in r.text
    await assert_idle(c)


async def test_small_flood_every_request_answered(make_client) -> None:
    """The flood benchmark in miniature: far past capacity, every request is answered 200 or 429."""
    c = await make_client(max_num_seqs=4, max_queued_requests=4)
    scenario = make_scenario("generate", max_tokens=8)
    result = await flood(c, scenario, rate=200, requests=60, timeout=60)
    assert result.sent == 60
    assert result.statuses.get("200", 0) + result.statuses.get("429", 0) == 60, result.statuses
    assert result.statuses.get("200", 0) >= 8 and result.statuses.get("429", 0) > 0
    assert result.failures == 0 and result.refusals_without_retry_after == 0
    assert not result.leftover_gauges and result.passed
    await assert_idle(c)


async def test_short_soak_has_only_expected_outcomes(make_client) -> None:
    """The soak benchmark in miniature (memory growth is judged by the benchmark run, not here)."""
    c = await make_client()
    result = await soak(c, duration=3, warmup=0, concurrency=3, max_tokens=4, sample_every=0.5)
    assert len(result.samples) >= 3 and all(s.rss_bytes for s in result.samples)
    assert sum(n for statuses in result.requests.values() for n in statuses.values()) >= 6
    for kind, statuses in result.requests.items():
        assert set(statuses) <= EXPECTED_OUTCOMES[kind], (kind, statuses)
    assert not result.leftover_gauges


# ---------------------------------------------------------------- deadlines


async def test_deadline_gives_504_and_frees_the_slot(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={**LONG, "max_tokens": 64}, headers={"X-Request-Timeout": "0.05"})
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout"
    await assert_idle(client)


async def test_deadline_ends_a_stream_with_an_error_event(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate", json={**LONG, "max_tokens": 64, "stream": True}, headers={"X-Request-Timeout": "0.3"}
    )
    assert r.status_code == 200  # headers went out before the deadline
    assert "event: error" in r.text
    error = json.loads(r.text.rsplit("data: ", 1)[1])
    assert error["error"]["type"] == "timeout"
    await assert_idle(client)


async def test_server_side_timeout_setting(make_client) -> None:
    c = await make_client(request_timeout_s=0.05)
    assert (await c.post("/generate", json={**LONG, "max_tokens": 64})).status_code == 504
    # The header can only shorten the server's deadline, never extend it.
    r = await c.post("/generate", json={**LONG, "max_tokens": 64}, headers={"X-Request-Timeout": "100"})
    assert r.status_code == 504
    await assert_idle(c)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
async def test_bad_timeout_header(client: httpx.AsyncClient, value: str) -> None:
    r = await client.post("/generate", json={"prompt": "hi"}, headers={"X-Request-Timeout": value})
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "X-Request-Timeout"


# ---------------------------------------------------------------- limits


async def test_body_size_limit(make_client) -> None:
    c = await make_client(max_body_bytes=2048)
    big = {"prompt": "x" * 4000}
    r = await c.post("/generate", json=big)
    assert r.status_code == 413
    assert r.json()["error"] == {
        "type": "payload_too_large",
        "message": "request body exceeds 2048 bytes (max_body_bytes)",
        "field": "body",
    }

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams in
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 512):
            yield payload[i : i + 512]

    r = await c.post("/generate", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "payload_too_large"
    assert (await c.post("/generate", json={"prompt": "hi", "max_tokens": 2})).status_code == 200


# ---------------------------------------------------------------- fault isolation


async def test_one_failing_request_fails_alone(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.services import generation

    client = await make_client()
    real = generation.encode_texts

    async def exploding(llm, settings, prompts, fields):  # an unexpected bug hit by one particular request
        if prompts == ["explode"]:
            raise RuntimeError("boom in /srv/secret/module.py")
        return await real(llm, settings, prompts, fields)

    monkeypatch.setattr(generation, "encode_texts", exploding)
    errors_before = REQUESTS.labels(endpoint="/generate", status="500")._value.get()
    ok, bad = await asyncio.gather(
        client.post("/generate", json={"prompt": "Hello", "max_tokens": 4}),
        client.post("/generate", json={"prompt": "explode"}),
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert bad.status_code == 500
    assert bad.json() == {"error": {"type": "internal_error", "message": "internal server error", "field": None}}
    assert "boom" not in bad.text and "/srv" not in bad.text and "Traceback" not in bad.text
    assert REQUESTS.labels(endpoint="/generate", status="500")._value.get() == errors_before + 1
    assert (await client.get("/ready")).status_code == 200


async def test_engine_failure_turns_ready_503(
    make_client, runtime: Runtime, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert runtime.llm is not None
    shared = runtime.llm.engine
    # An engine of its own (own KV cache and thread) over the session's model weights.
    config = EngineConfig(max_num_seqs=4, kv_cache_tokens=1024, max_model_len=512)
    engine = LLMEngine(shared.runner.model, shared.tokenizer, shared.runner.device, shared.runner.k_cache.dtype, config)
    rt = Runtime(settings=settings, device=runtime.device, served=runtime.served, llm=AsyncLLM(engine))
    await rt.start()
    try:
        c = await make_client(rt)
        assert (await c.get("/ready")).status_code == 200

        def broken(seqs):
            raise RuntimeError("CUDA error at /opt/secret/kernel.cu:42")

        engine.runner.run = broken  # the next step raises inside the engine thread
        with caplog.at_level(logging.WARNING, logger="engine.llm_engine"):
            whole, streamed = await asyncio.gather(
                c.post("/generate", json={"prompt": "Hello", "max_tokens": 4}),
                c.post("/generate", json={"prompt": "Hello", "max_tokens": 4, "stream": True}),
            )
        assert whole.status_code == 500
        error = whole.json()["error"]
        assert error["type"] == "engine_error"
        assert "/opt" not in whole.text and "CUDA" not in whole.text
        request_id = error["message"].rsplit(" ", 1)[1]
        assert f"request {request_id} failed: CUDA error" in caplog.text  # details logged with the request id
        assert "event: error" in streamed.text and "engine_error" in streamed.text
        ready = await c.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "/opt" not in ready.text
        refused = await c.post("/generate", json={"prompt": "Hello"})
        assert refused.status_code == 503 and "Retry-After" in refused.headers
    finally:
        await asyncio.to_thread(rt.llm.stop)  # not rt.stop(): that would mark the whole process unready


# ---------------------------------------------------------------- access control


async def test_api_keys(make_client, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# one key per line\nfile-key\n\n")
    c = await make_client(api_keys=["k-one", "k-two"], api_keys_file=key_file)
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "k-one"},
        {"Authorization": "Basic k-one"},
    ):
        r = await c.post("/generate", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["error"]["type"] == "unauthorized"
    for key in ("k-one", "k-two", "file-key"):
        assert (await c.post("/generate", json=body, headers={"Authorization": f"Bearer {key}"})).status_code == 200
    assert (await c.get("/openapi.json")).status_code == 401
    v1 = await c.post("/v1/completions", json={"model": "default", "prompt": "hi"})
    assert v1.status_code == 401 and v1.json()["error"]["code"] == "unauthorized"  # OpenAI shape under /v1
    for probe in ("/health", "/ready", "/metrics"):
        assert (await c.get(probe)).status_code == 200
    closed = await make_client(api_keys=["k-one"], public_probes=False)
    assert (await closed.get("/ready")).status_code == 401
    assert (await closed.get("/ready", headers={"Authorization": "Bearer k-one"})).status_code == 200


async def test_cors_off_by_default_and_configurable(make_client) -> None:
    origin = {"Origin": "https://shop.example"}
    plain = await make_client()
    assert "access-control-allow-origin" not in (await plain.get("/health", headers=origin)).headers
    c = await make_client(cors_origins=["https://shop.example"], api_keys=["k"])
    preflight = await c.options(
        "/generate",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200  # answered by CORS before auth
    assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
    r = await c.post(
        "/generate", json={"prompt": "hi", "max_tokens": 2}, headers={**origin, "Authorization": "Bearer k"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://shop.example"
    other = await c.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_prompts_logged_only_when_enabled(make_client, caplog: pytest.LogCaptureFixture) -> None:
    secret = "my card number is 4111"
    quiet = await make_client()
    with caplog.at_level(logging.DEBUG, logger="server"):
        await quiet.post("/generate", json={"prompt": secret, "max_tokens": 2})
    assert secret not in caplog.text
    caplog.clear()
    loud = await make_client(log_prompts=True)
    with caplog.at_level(logging.INFO, logger="server"):
        await loud.post("/generate", json={"prompt": secret, "max_tokens": 2})
    assert secret in caplog.text
