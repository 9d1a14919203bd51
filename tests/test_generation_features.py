"""Structured output, logprobs and per-request timings through /generate and /v1 on the ASGI app with
the real embedded SmolLM2 (the openai client's tool-calling flow is in tests/test_openai_tools.py)."""

from __future__ import annotations

import copy
import json
import math

import httpx
import jsonschema
import pytest

from server import chat_template
from server.runtime import Runtime
from server.schemas_openai import ChatCompletionRequest
from server.services import tools
from tests.test_constrained_unit import SCHEMAS  # the engine's unit test validates the same ones
from tests.test_generate_api import parse_sse

pytestmark = pytest.mark.integration

GEN = "SmolLM2-135M-Instruct"
TIMING_HEADERS = ("x-queue-time-ms", "x-prefill-time-ms", "x-decode-time-ms", "x-total-time-ms", "x-tokens-per-second")
TIMING_KEYS = {"queue_ms", "prefill_ms", "decode_ms", "total_ms", "tokens_per_second"}


async def test_timings_headers_and_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "Once upon a time", "max_tokens": 6, "timings": True})
    assert r.status_code == 200
    timings = r.json()["timings"]
    assert set(timings) == TIMING_KEYS
    for name in TIMING_HEADERS:
        assert float(r.headers[name]) >= 0
    assert timings["total_ms"] >= timings["prefill_ms"] + timings["decode_ms"] > 0
    assert timings["tokens_per_second"] > 0
    plain = await client.post("/generate", json={"prompt": "Once upon a time", "max_tokens": 6})
    assert "timings" not in plain.json() and "logprobs" not in plain.json()
    assert "x-total-time-ms" in plain.headers
    r = await client.post("/generate", json={"prompt": "Hi", "max_tokens": 4, "stream": True, "timings": True})
    events = parse_sse(r.text)
    assert set(events[-1]["timings"]) == TIMING_KEYS and all("timings" not in e for e in events[:-1])
    r = await client.post(
        "/v1/completions", json={"model": GEN, "prompt": "Hi", "max_tokens": 4, "n": 2, "timings": True}
    )
    assert set(r.json()["timings"]) == TIMING_KEYS and float(r.headers["x-decode-time-ms"]) >= 0


async def test_logprobs_whole_and_streamed_agree(client: httpx.AsyncClient) -> None:
    body = {"prompt": "The sea is", "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    whole = (await client.post("/generate", json=body)).json()
    entries = whole["logprobs"]
    assert len(entries) == whole["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in entries) == whole["text"]
    for e in entries:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        assert math.isclose(e["logprob"], tops[0], abs_tol=1e-4)  # greedy: the sampled token is the likeliest
    streamed = parse_sse((await client.post("/generate", json={**body, "stream": True})).text)
    assert [e for event in streamed for e in event["logprobs"]] == entries

    chat = {"model": GEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
    r = (await client.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2})).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    assert (await client.post("/v1/chat/completions", json=chat)).json()["choices"][0]["logprobs"] is None
    stream = parse_sse(
        (await client.post("/v1/chat/completions", json={**chat, "logprobs": True, "stream": True})).text[
            : -len("data: [DONE]\n\n")
        ]
    )
    streamed_tokens = [c["token"] for e in stream for c in ((e["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed_tokens == [c["token"] for c in content]

    comp = {"model": GEN, "prompt": "The sea is", "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}
    lp = (await client.post("/v1/completions", json=comp)).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"][0] == len("The sea is") and all(len(t) <= 2 for t in lp["top_logprobs"])


async def test_json_schema_outputs_validate(
    client: httpx.AsyncClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n sampled choices per schema (and prompt), every one parses and validates. The model lays JSON out as
    it likes (within bounds): a nested order takes up to ~140 tokens, more than the test server's limit; and 8
    such choices took longer than the default 120 s deadline on a 2-vCPU CPU without AVX-512."""
    update = {"max_new_tokens": 160, "request_timeout_s": 600.0}
    monkeypatch.setattr(runtime, "settings", runtime.settings.model_copy(update=update))
    prompts = ["Describe a customer as JSON.", "Extract the order from: two lamps for Ann Lee, urgent."]
    for schema in SCHEMAS:
        for prompt in prompts:
            body = {
                "model": GEN,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 160,
                "n": 8,
                "temperature": 0.8,
                "seed": 7,
                "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}},
            }
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            for choice in r.json()["choices"]:
                if choice["finish_reason"] == "stop":
                    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            assert sum(c["finish_reason"] == "stop" for c in r.json()["choices"]) >= 4  # the rest ran out of tokens
    r = await client.post(
        "/v1/completions",
        json={"model": GEN, "prompt": "JSON:", "max_tokens": 48, "response_format": {"type": "json_object"}, "n": 4},
    )
    for choice in r.json()["choices"]:
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["text"]), dict)


async def test_generate_regex_choice_and_schema(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"prompt": "Ticket id:", "regex": "[A-Z]{3}-[0-9]{4}", "max_tokens": 20})
    assert r.status_code == 200 and len(r.json()["text"]) == 8 and r.json()["text"][3] == "-"
    options = ["billing", "shipping", "technical support"]
    r = await client.post(
        "/generate",
        json={"prompt": "I was charged twice. Topic:", "choice": options, "max_tokens": 10, "temperature": 1.0},
    )
    assert r.json()["text"] in options and r.json()["finish_reason"] == "stop"
    schema = SCHEMAS[1]
    r = await client.post(
        "/generate",
        json={
            "messages": [{"role": "user", "content": "Classify: my parcel is late"}],
            "json_schema": schema,
            "max_tokens": 64,
            "stream": True,
        },
    )
    events = parse_sse(r.text)
    assert events[-1]["finish_reason"] == "stop"
    jsonschema.validate(json.loads("".join(e["text"] for e in events)), schema)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"prompt": "x", "json_schema": {"type": "frobnicate"}}, "json_schema"),
        ("/generate", {"prompt": "x", "regex": "([a-z]"}, "regex"),
        (
            "/v1/chat/completions",
            {
                "model": GEN,
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 3}}},
            },
            "response_format.json_schema.schema",
        ),
    ],
)
async def test_schema_the_library_cannot_compile_is_400(
    client: httpx.AsyncClient, path: str, body: dict, field: str
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.get("field", error.get("param")) == field


HERMES_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    'Call a tool with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def test_a_template_with_tool_support_renders_the_tools(runtime: Runtime) -> None:
    """A template that reads ``tools`` gets them (and ``tool`` turns) itself; no system-prompt format."""
    assert runtime.llm is not None
    tokenizer = copy.deepcopy(runtime.llm.tokenizer)
    tokenizer.chat_template = HERMES_LIKE
    function = {"name": "get_order_status", "parameters": {"type": "object", "properties": {}}}
    body = ChatCompletionRequest.model_validate(
        {
            "model": GEN,
            "tools": [{"type": "function", "function": function}],
            "messages": [
                {"role": "user", "content": "Where is order 1?"},
                {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
            ],
        }
    )
    ids = chat_template.encode_chat(
        tokenizer, tools.template_messages(body, tokenizer), tools.definitions(body, tokenizer)
    )
    text = tokenizer.decode(ids)
    assert '"name": "get_order_status"' in text and "<tools>" in text
    assert tools.INSTRUCTIONS not in text and "<|im_start|>tool\nshipped" in text
