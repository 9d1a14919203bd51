"""Tool calls in the documented system-prompt format: rendering, parsing, the streaming split, and the
grammar that forces a valid call (walked with llguidance, no model)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import llguidance
import llguidance.hf
import pytest

from server.errors import APIError
from server.schemas_openai import ChatCompletionRequest
from server.services import constraints, tools
from tests.test_constrained_unit import byte_tokenizer

pytestmark = pytest.mark.unit

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}}


PLAIN = SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
NATIVE = SimpleNamespace(
    chat_template="{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{% endfor %}"
)


def request(**extra: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], **extra}
    return ChatCompletionRequest.model_validate(body)


def test_tools_go_into_the_system_turn_and_results_come_back_as_text() -> None:
    body = request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        ]
    )
    turns = tools.template_messages(body, PLAIN)
    assert turns[0]["role"] == "system" and turns[0]["content"].startswith("Be brief.\n\n" + tools.INSTRUCTIONS)
    assert '"name": "weather"' in turns[0]["content"] and '"name": "time"' in turns[0]["content"]
    assert turns[2] == {
        "role": "assistant",
        "content": '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>',
    }
    assert turns[3] == {"role": "user", "content": "<tool_response>rain</tool_response>"}
    assert "tool_call" not in tools.template_messages(request(tool_choice="none"), PLAIN)[0]["content"]
    assert tools.definitions(body, PLAIN) is None
    native = tools.template_messages(body, NATIVE)  # the template renders the tools and tool turns itself
    assert native[0] == {"role": "system", "content": "Be brief."}
    assert native[3] == {"role": "tool", "content": "rain"}
    assert [d["function"]["name"] for d in tools.definitions(body, NATIVE) or []] == ["weather", "time"]


def test_parse_calls_and_content() -> None:
    body = request()
    text = (
        'Sure.<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "time", "arguments": {}}</tool_call>'
    )
    parsed = tools.parse(text, body)
    assert parsed.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.calls] == [
        ("weather", {"city": "Oslo"}),
        ("time", {}),
    ]
    assert len(tools.parse(text, request(parallel_tool_calls=False)).calls) == 1
    for not_a_call in ("just text", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>{bad"):
        assert tools.parse(not_a_call, body) == tools.Parsed(not_a_call, [])


def test_stream_splitter_holds_only_what_may_be_a_call() -> None:
    content = tools.StreamSplitter(request())
    assert content.feed(" <tool") == ""  # may still become a call
    assert content.feed("box> is") == " <toolbox> is"
    assert content.feed(" here") == " here"
    call = tools.StreamSplitter(request())
    pieces = ["<tool_", 'call>{"name": "time", ', '"arguments": {}}</tool_call>']
    assert [call.feed(p) for p in pieces] == ["", "", ""]
    parsed = call.finish()
    assert parsed.content is None and parsed.calls[0].function.name == "time"


def matches(grammar: str, text: str) -> bool:
    """Whether ``text`` is a complete match of ``grammar``, walked token by token over a byte-level vocabulary."""
    tokenizer = byte_tokenizer()
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar)
    for token in tokenizer(text).input_ids:
        if not matcher.consume_token(token):
            return False
    return matcher.is_accepting()


def test_forced_call_grammar_names_the_offered_functions() -> None:
    assert tools.grammar(request()) is None  # auto: free text
    assert tools.grammar(request(tool_choice="none")) is None
    required = tools.grammar(request(tool_choice="required"))
    assert required is not None and '"weather"' in required and '"time"' in required and '("\\n" call)*' in required
    assert matches(required, '<tool_call>{"name":"weather","arguments":{"city":"Oslo"}}</tool_call>')
    two = '<tool_call>{"name":"time","arguments":{}}</tool_call>\n<tool_call>{"name":"time","arguments":{}}</tool_call>'
    assert matches(required, two)
    assert not matches(required, '<tool_call>{"name":"weather","arguments":{}}</tool_call>')  # city is required
    assert not matches(required, "It is sunny.")
    single = {"tool_choice": {"type": "function", "function": {"name": "time"}}, "parallel_tool_calls": False}
    named = tools.grammar(request(**single))
    assert named is not None
    assert matches(named, '<tool_call>{"name":"time","arguments":{}}</tool_call>')
    assert not matches(named, two) and not matches(
        named, '<tool_call>{"name":"weather","arguments":{"city":"x"}}</tool_call>'
    )


def test_unknown_named_tool_is_refused() -> None:
    with pytest.raises(ValueError, match="not in tools"):
        request(tool_choice={"type": "function", "function": {"name": "other"}})


def test_uncompilable_grammar_names_the_field() -> None:
    with pytest.raises(APIError) as info:
        constraints.json_schema(
            {"type": "object", "properties": {"a": {"type": "string", "format": "nonsense"}}}, "f.s"
        )
    assert info.value.status == 400 and info.value.field == "f.s"
    with pytest.raises(APIError) as info:
        constraints.regex("(", "regex")
    assert info.value.field == "regex"
