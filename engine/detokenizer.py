"""Incremental detokenization with stop strings.

Decoding token by token splits multi-byte characters and drops BPE spaces, so each step decodes a
short window of recent tokens and emits only the new, complete text. Text that could be the start of
a stop string is held back until it is clear either way, so a client never sees part of a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.held = ""  # decoded text not yet emitted (a possible stop-string prefix)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Returns (text to emit now, whether a stop string was hit)."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return "", False  # incomplete character: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        text = self.held + full[len(prefix) :]
        if not self.stop:
            self.held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text held back when the sequence ends without a stop string."""
        text, self.held = self.held, ""
        return text
