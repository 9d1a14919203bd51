"""Tool calling with the official ``openai`` client against a real server process (both layouts): a
forced call whose arguments validate, the tool's result sent back, a final answer; named and single calls;
the streamed call equals the whole one."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.live

GEN = "SmolLM2-135M-Instruct"
ORDER_STATUS = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{5}$"}},
    "required": ["order_id"],
    "additionalProperties": False,
}
TICKET = {
    "type": "object",
    "properties": {
        "topic": {"enum": ["billing", "shipping", "account"]},
        "summary": {"type": "string", "maxLength": 60},
    },
    "required": ["topic", "summary"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_order_status",
            "description": "Look up the shipping status of an order",
            "parameters": ORDER_STATUS,
        },
    },
    {
        "type": "function",
        "function": {"name": "open_ticket", "description": "Open a support ticket", "parameters": TICKET},
    },
]
SCHEMAS = {"get_order_status": ORDER_STATUS, "open_ticket": TICKET}


@pytest.fixture(scope="module")
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_call_tool_result_and_final_answer(client: openai.OpenAI) -> None:
    """One tool, so that the whole conversation fits the test server's 256-token prompt limit."""
    messages: list = [{"role": "user", "content": "Where is my order 12345?"}]
    r = client.chat.completions.create(
        model=GEN, messages=messages, tools=TOOLS[:1], tool_choice="required", max_tokens=64, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    call = choice.message.tool_calls[0]
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"status": "shipped"})})
    final = client.chat.completions.create(model=GEN, messages=messages, tools=TOOLS[:1], max_tokens=32, temperature=0)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls
    plain = client.chat.completions.create(
        model=GEN, messages=messages, tools=TOOLS[:1], tool_choice="none", max_tokens=16, temperature=0
    )
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_named_and_single_calls(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "I was charged twice for my order, please help."}]
    for seed in range(3):
        r = client.chat.completions.create(
            model=GEN,
            messages=messages,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "open_ticket"}},
            parallel_tool_calls=False,
            max_tokens=64,
            temperature=1.0,
            seed=seed,
        )
        choice = r.choices[0]
        if choice.finish_reason == "length":  # out of tokens inside the summary: nothing to parse
            continue
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "open_ticket"
        jsonschema.validate(json.loads(call.function.arguments), TICKET)


def test_streamed_call_equals_whole(client: openai.OpenAI) -> None:
    request = {
        "model": GEN,
        "messages": [{"role": "user", "content": "Status of order 55555?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 64,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function.name:
                    call["name"] = delta.function.name
                call["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (w.function.name, w.function.arguments) for w in whole
    ]
