"""Generation admission by size (issue 18 item 2) and prompt character bounds (item 4) through the routes
with the real model: a request whose own sequences or tokens exceed what the server ever admits gets 400
naming the limit (it used to be let in whole when the server was idle, and then held every slot); the
session's settings admit 80 sequences (max_num_seqs 16 + max_queued_requests 64) and 16,384 tokens
(twice kv_cache_tokens)."""

from __future__ import annotations

import httpx
import pytest

from server.runtime import Runtime

pytestmark = pytest.mark.integration


async def test_too_many_sequences_in_one_request_is_400(client: httpx.AsyncClient) -> None:
    body = {"model": "default", "prompt": ["Once upon a time"] * 16, "n": 16, "max_tokens": 1}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and error["code"] == "request_too_large"
    assert "256 generation sequences" in error["message"] and "at most 80" in error["message"]
    assert "max_num_seqs + max_queued_requests" in error["message"]


async def test_too_many_tokens_in_one_request_is_400(client: httpx.AsyncClient) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 24  # about 240 tokens
    body = {"model": "default", "prompt": [long_prompt] * 4, "n": 16, "max_tokens": 64}  # 64 x ~300 tokens
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and "(max_admitted_tokens)" in error["message"]
    assert "at most 16384" in error["message"]


# Issue 18 item 4: prompts bounded by characters before tokenizing (16 per token of max_input_tokens, 256
# in the session's settings: 4,096 characters), like classification inputs.
OVER = "a" * (256 * 16 + 1)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"prompt": OVER}, "prompt"),
        (
            "/generate",
            {"messages": [{"role": "user", "content": OVER[:3000]}, {"role": "user", "content": OVER[:1097]}]},
            "messages",
        ),
        ("/v1/completions", {"model": "default", "prompt": ["hi", OVER]}, "prompt.1"),
        ("/v1/completions", {"model": "default", "prompt": OVER}, "prompt"),
        ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": OVER}]}, "messages"),
    ],
)
async def test_prompts_over_the_character_bound_are_refused_before_tokenizing(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch, path: str, body: dict, field: str
) -> None:
    assert runtime.llm is not None
    calls: list[object] = []
    tokenizer = runtime.llm.tokenizer
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or 1 / 0)
    monkeypatch.setattr(type(tokenizer), "apply_chat_template", lambda self, *a, **k: calls.append(a) or 1 / 0)
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.get("field", error.get("param")) == field
    assert "4097 characters" in error["message"] and "max_input_tokens" in error["message"]
    assert calls == []  # neither tokenized nor rendered
