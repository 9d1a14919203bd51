"""Hardening (issue 18) without models or processes: probes, log escaping, cache bounds, cache salts."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from engine.classifier import ClassResult
from engine.kv_cache import BlockManager, root_hash
from engine.response_cache import BytesLRU, ResponseCache, approx_bytes
from engine.sequence import SamplingParams, Sequence
from models.sources import resolve_spec
from server.middleware import AuthMiddleware, cache_salt
from server.request_id import RequestIdFilter, RequestIdMiddleware, escape_controls
from server.routes import health

pytestmark = pytest.mark.unit


def _probe_app(loaded: object | None, draining: bool = False) -> FastAPI:
    app = FastAPI()
    app.include_router(health.router)
    app.state.runtime = loaded
    app.state.load_error = None
    app.state.admission = types.SimpleNamespace(draining=draining)
    return app


READY = types.SimpleNamespace(ready=True, failure=None)


@pytest.mark.parametrize(
    ("path", "loaded", "draining", "status"),
    [
        ("/health", None, False, 200),
        ("/ready", READY, False, 200),
        ("/ready", None, False, 503),  # loading
        ("/ready", READY, True, 503),  # draining
    ],
)
async def test_head_probes_answer_like_get(path: str, loaded: object | None, draining: bool, status: int) -> None:
    """Load balancers that probe with HEAD get GET's status (not 405), and no body."""
    transport = httpx.ASGITransport(app=_probe_app(loaded, draining))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        get = await client.get(path)
        head = await client.head(path)
    assert get.status_code == head.status_code == status
    assert head.content == b""
    assert head.headers.get("retry-after") == get.headers.get("retry-after")


def _access_app() -> RequestIdMiddleware:
    async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return RequestIdMiddleware(ok)


@pytest.mark.parametrize(
    "path",
    [
        "/x%0D%0A2026-11-30 08:00:00,000 INFO server.access [admin]: GET /admin 200 1.0ms",  # percent-encoded
        "/x%0a%1b[31m%c2%85%e2%80%a8",  # LF, an ANSI escape, NEL, LINE SEPARATOR
    ],
)
async def test_access_log_escapes_control_characters(path: str, caplog: pytest.LogCaptureFixture) -> None:
    """A request path cannot forge access-log lines, even unauthenticated (uvicorn hands the app the
    percent-decoded path, so the CR/LF arrive raw)."""
    transport = httpx.ASGITransport(app=_access_app())
    with caplog.at_level(logging.INFO, logger="server.access"):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get(path)
    (record,) = [r for r in caplog.records if r.name == "server.access"]
    line = record.getMessage()
    assert line.startswith("GET /x\\") and line.endswith("ms")
    assert not any(ch in line for ch in "\r\n\x1b\x85\u2028")


def test_log_filter_escapes_every_message() -> None:
    """Any logged value, client-supplied or not, stays on its line; tracebacks keep theirs."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "prompt: %s", ("a\r\nFAKE line\x00",), None)
    assert RequestIdFilter().filter(record)
    assert record.getMessage() == "prompt: a\\r\\nFAKE line\\x00"
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "%d tokens", (3,), None)
    RequestIdFilter().filter(plain)
    assert plain.args == (3,) and plain.getMessage() == "3 tokens"
    assert escape_controls("tab\there\u2029") == "tab\\there\\u2029"


def test_bytes_lru_bounded_by_bytes_not_entries() -> None:
    """Large distinct keys (issue 18: 900 KB single words) cannot grow a cache past its byte bound."""
    lru: BytesLRU[str, object] = BytesLRU(max_bytes=1_000_000)
    for i in range(100):
        lru.put(f"{i:03d}" + "x" * 100_000, i)
        assert lru.nbytes <= 1_000_000
    assert 5 <= len(lru) < 10
    assert lru.get("099" + "x" * 100_000) == 99 and lru.get("000" + "x" * 100_000) is None
    lru.put("huge", "y" * 2_000_000)  # larger than the bound alone: not kept
    assert "huge" not in lru and lru.nbytes <= 1_000_000


def test_bytes_lru_evicts_least_recently_used_and_counts_replacements() -> None:
    lru: BytesLRU[str, str] = BytesLRU(max_bytes=10_000, size=lambda k, v: len(v))
    lru.put("a", "1" * 4000)
    lru.put("b", "2" * 4000)
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("c", "3" * 4000)
    assert "b" not in lru and "a" in lru and "c" in lru and lru.nbytes == 8000
    lru.put("a", "4" * 1000)  # a replacement frees what the old value held
    assert lru.nbytes == 5000 and len(lru) == 2
    capped: BytesLRU[str, str] = BytesLRU(max_bytes=10_000, max_entries=1, size=lambda k, v: len(v))
    capped.put("a", "1")
    capped.put("b", "2")
    assert list(capped._items) == ["b"]


def test_approx_bytes_counts_nested_values() -> None:
    result = ClassResult("billing", 0.9, [("billing", 0.9), ("x" * 10_000, 0.1)])
    key = ("model", "y" * 50_000, ("billing", "x" * 10_000), False)
    assert approx_bytes(result) > 10_000 and approx_bytes(key) > 60_000


def test_response_cache_bounded_by_bytes() -> None:
    cache: ResponseCache[str, str] = ResponseCache(4096, name="unit", max_bytes=500_000)
    for i in range(400):
        cache.put(f"{i}" + "w" * 20_000, "result")
    assert cache.nbytes <= 500_000 and len(cache) < 30


def _seq(tokens: list[int], salt: str | None) -> Sequence:
    return Sequence(prompt_ids=list(tokens), params=SamplingParams(max_tokens=4, cache_salt=salt))


def _admitted(blocks: BlockManager, s: Sequence) -> int:
    """Admits ``s`` as the scheduler does, then commits its prompt blocks; returns its cached tokens."""
    cached = blocks.match_prefix(s)
    blocks.allocate(s, cached)
    hit = s.num_computed
    s.num_computed = s.num_tokens
    blocks.commit(s)
    return hit


def test_prefix_cache_shared_only_within_a_salt() -> None:
    """Issue 18: cached_tokens told one client whether another's system prompt started with a guess.
    Blocks are shared only between sequences with the same cache salt."""
    blocks = BlockManager(num_blocks=64, block_size=4)
    secret = list(range(100, 117))  # 4 full blocks + 1 token
    assert _admitted(blocks, _seq(secret, "key-a")) == 0
    assert _admitted(blocks, _seq(secret, "key-b")) == 0  # another key learns nothing
    assert _admitted(blocks, _seq(secret, None)) == 0  # nor does an unsalted (shared) request
    assert _admitted(blocks, _seq(secret, "key-a")) == 16  # the same key still reuses its prefix
    assert _admitted(blocks, _seq(secret, None)) == 16  # unsalted requests share among themselves
    assert root_hash(None) != root_hash("") != root_hash("key-a")


async def _salts(app: Any, headers: list[dict[str, str]], path: str = "/generate") -> list[str | None]:
    seen: list[str | None] = []

    async def record(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(cache_salt(Request(scope)))
        assert cache_salt(scope) == seen[-1]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=app(record))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for h in headers:
            assert (await client.get(path, headers=h)).status_code == 200
    return seen


async def test_cache_salt_from_the_authenticated_key() -> None:
    keys = [b"key-a-secret", b"key-b-secret"]
    bearer = [{"Authorization": f"Bearer {k.decode()}"} for k in keys]

    def auth(share: bool = False) -> Any:
        return lambda inner: AuthMiddleware(inner, keys, frozenset({"/health"}), share_prefix_cache=share)

    a1, b, a2 = await _salts(auth(), [bearer[0], bearer[1], bearer[0]])
    assert a1 == a2 and a1 != b and a1 is not None and b is not None
    assert not any(k.decode() in s for k in keys for s in (a1, b))  # a hash, never the key
    assert await _salts(auth(share=True), bearer) == [None, None]  # the operator opted in to sharing
    assert await _salts(auth(), [bearer[0]], path="/health") == [None]  # open path: no key looked at
    assert await _salts(lambda inner: inner, bearer) == [None, None]  # auth off


def test_model_names_and_sources_hold_no_paths(tmp_path: Path) -> None:
    """/info, /v1/models and llm_build_info show ModelSource.name and .description: no filesystem paths,
    yet two models of one name in different places stay apart (the compression cache keys on them)."""
    sources = []
    for parent in ("a", "b"):
        model_dir = tmp_path / parent / "support-model"
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text('{"model_type": "bert"}')
        (tmp_path / parent / "chat.gguf").write_bytes(b"GGUF")
        sources += [
            resolve_spec(str(model_dir), "classify"),
            resolve_spec(str(tmp_path / parent / "chat.gguf"), "generate"),
            resolve_spec(f"dummy:{model_dir}", "generate"),
        ]
    sources += [resolve_spec("default", "generate"), resolve_spec("default", "classify")]
    for source in sources:
        assert source.path is not None
        for text in (source.name, source.description):
            assert str(source.path.parent) not in text and "/" not in text.removeprefix("dummy:"), text
    assert [s.name for s in sources[:3]] == ["support-model", "chat", "dummy:support-model"]
    assert len({s.description for s in sources}) == len(sources)
    assert sources[-2].description.startswith("embedded GGUF file SmolLM2-135M-Instruct (path #")
