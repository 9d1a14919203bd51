"""Tool calling. A chat template that renders tools itself (one that reads a ``tools`` variable, e.g. Qwen2.5's
or Hermes') gets them that way, and its tool turns with role ``tool``; such templates ask for the same
``<tool_call>`` blocks parsed here. For a template without tool support (the embedded SmolLM2's) the tools go
into the system message in this format (documented in the README):

    You can call functions. To call one, answer with only
    <tool_call>{"name": "<function name>", "arguments": {<its arguments as JSON>}}</tool_call>
    (one such block per call). The functions, as JSON schemas:
    {"name": ..., "description": ..., "parameters": {...}}
    ...

An assistant turn's earlier calls are rendered back as those blocks, and a ``tool`` turn's result as a user
turn ``<tool_response>{result}</tool_response>``. The answer's blocks are parsed into OpenAI ``tool_calls``.
``tool_choice`` ``"required"`` or a named function constrains decoding to such blocks (one, or several with
``parallel_tool_calls``) whose arguments follow the function's parameters schema, so the call always
parses and validates; ``"auto"`` lets the model choose (an answer that starts with a block is a call);
``"none"`` leaves the tools out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.schemas_openai import (
    ChatCompletionRequest,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseToolCall,
    Tool,
)
from server.services import constraints

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
INSTRUCTIONS = (
    "You can call functions. To call one, answer with only\n"
    f'{OPEN}{{"name": "<function name>", "arguments": {{<its arguments as JSON>}}}}{CLOSE}\n'
    "(one such block per call). The functions, as JSON schemas:\n"
)


def active(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and body.tool_choice != "none"


def _offered(body: ChatCompletionRequest) -> list[Tool]:
    tools = body.tools or []
    if isinstance(body.tool_choice, NamedToolChoice):
        return [t for t in tools if t.function.name == body.tool_choice.function.name]
    return tools


def native(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the model's chat template renders tools itself."""
    return "tools" in (tokenizer.chat_template or "")


def definitions(body: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]] | None:
    """The tools for a template that renders them itself (OpenAI's shape, which such templates take)."""
    if not (active(body) and native(tokenizer)):
        return None
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in _offered(body)]


def template_messages(body: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, str]]:
    """Turns for the chat template: ``developer`` is OpenAI's new name for ``system``; earlier calls as
    blocks; tool results as role ``tool`` for a template that knows it, else as a user turn; and, for a
    template without tool support, the tools in the system turn in the format above."""
    own = native(tokenizer)
    turns = []
    for m in body.messages:
        role, text = ("system" if m.role == "developer" else m.role), m.text
        if m.role == "assistant" and m.tool_calls:
            blocks = [_block(c.function.name, c.function.arguments) for c in m.tool_calls]
            text = "\n".join([text, *blocks] if text else blocks)
        elif m.role == "tool" and not own:
            role, text = "user", f"<tool_response>{text}</tool_response>"
        turns.append({"role": role, "content": text})
    if active(body) and not own:
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in _offered(body))
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{INSTRUCTIONS}{described}"}
        else:
            turns.insert(0, {"role": "system", "content": INSTRUCTIONS + described})
    return turns


def _block(name: str, arguments: str) -> str:
    try:
        args: Any = json.loads(arguments)
    except json.JSONDecodeError:
        args = arguments
    return OPEN + json.dumps({"name": name, "arguments": args}) + CLOSE


def grammar(body: ChatCompletionRequest) -> str | None:
    """The constraint for ``required`` and a named function: call blocks whose arguments follow the schema."""
    if not active(body) or body.tool_choice in (None, "auto"):
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in _offered(body)
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    repeat = ' ("\\n" call)*' if body.parallel_tool_calls is not False else ""
    lark = f"start: call{repeat}\ncall: {json.dumps(OPEN)} %json {json.dumps(schema)} {json.dumps(CLOSE)}"
    return constraints.lark(lark, "tools")


@dataclass(frozen=True)
class Parsed:
    content: str | None
    calls: list[ResponseToolCall]


def parse(text: str, body: ChatCompletionRequest) -> Parsed:
    """The answer's call blocks naming an offered function with object arguments; the rest is content
    (None when nothing else is left). Without valid blocks the whole answer is content."""
    names = {t.function.name for t in _offered(body)}
    calls = []
    for match in _BLOCK.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict):
            function = ResponseFunctionCall(name=call["name"], arguments=json.dumps(call["arguments"]))
            calls.append(ResponseToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=function))
    if not calls:
        return Parsed(text, [])
    if body.parallel_tool_calls is False:
        calls = calls[:1]
    rest = _BLOCK.sub("", text).strip()
    return Parsed(rest or None, calls)


class StreamSplitter:
    """Streams an answer's text as content until it is clear that it is a call: text that may still become
    ``<tool_call>`` is held, and an answer that starts with it is kept whole, to be parsed at its end."""

    def __init__(self, body: ChatCompletionRequest) -> None:
        self.body = body
        self.mode = "undecided"  # then "content" or "calls"
        self.held = ""

    def feed(self, text: str) -> str:
        if self.mode == "content":
            return text
        self.held += text
        if self.mode == "calls":
            return ""
        start = self.held.lstrip()
        if start.startswith(OPEN):
            self.mode = "calls"
            return ""
        if OPEN.startswith(start):
            return ""
        self.mode, out, self.held = "content", self.held, ""
        return out

    def finish(self) -> Parsed:
        """What was held: content, calls, or both."""
        held, self.held = self.held, ""
        return parse(held, self.body) if held else Parsed(None, [])
