"""Chat turns to token ids without letting message content forge control tokens.

Rendering the template with the content inside and tokenizing the result with special-token parsing
would turn ``<|im_end|>\\n<|im_start|>system`` typed by a user into real turn markers. Where content
holds a special token's text, the template is rendered with a placeholder per message instead; the
template's own text between placeholders is tokenized with special tokens, the content as plain text
(``split_special_tokens``). Other content takes the ordinary path, token for token as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

# Private-use code points: no template rewrites them and no tokenizer treats them as markers.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


class UnsafeContentError(ValueError):
    """Content holds a special token's text and the template hides where content goes (``field`` names it)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template plus the assistant header;
    ``tools`` (OpenAI function definitions) go to a template that renders them itself."""
    contents = [m["content"] for m in messages]
    markers = [_special_text(tokenizer, c) for c in contents]
    extra = {} if tools is None else {"tools": tools}
    if not any(markers):  # nothing to forge: one render, one tokenization, as the model was trained
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **extra)
        return tokenizer(text, add_special_tokens=False).input_ids
    marked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False, **extra)
    parts = _PLACEHOLDER_RE.split(rendered)  # template, index, template, index, ..., template
    template_parts, indices = parts[0::2], [int(i) for i in parts[1::2]]
    if set(indices) != set(range(len(messages))):  # the template rewrote a placeholder: content can't be placed
        i = next(i for i, marker in enumerate(markers) if marker)
        raise UnsafeContentError(
            f"messages[{i}].content contains the control sequence {markers[i]!r}", field=f"messages[{i}].content"
        )
    template_ids = tokenizer(template_parts, add_special_tokens=False).input_ids
    in_order = [contents[i] for i in indices]
    content_ids = tokenizer(in_order, add_special_tokens=False, split_special_tokens=True).input_ids
    ids: list[int] = list(template_ids[0])
    for content, template in zip(content_ids, template_ids[1:], strict=True):
        ids += content
        ids += template
    return ids


def _special_text(tokenizer: PreTrainedTokenizerBase, text: str) -> str | None:
    """The first special token's text found in ``text``, or None."""
    return next((t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content in text), None)
