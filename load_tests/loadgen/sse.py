"""Server-sent events: an incremental decoder and the two stream formats measured (ours, OpenAI's)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class SSEEvent:
    """One dispatched server-sent event."""

    data: str
    event: str = "message"


class SSEDecoder:
    """Incremental SSE decoder (WHATWG rules): lines end in CRLF, LF or CR; blank line dispatches.

    Own line splitting instead of ``httpx.aiter_lines`` because that splits on every Unicode line
    separator (U+2028 ...), which may legally appear unescaped inside a JSON ``data:`` payload.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""

    def feed_line(self, line: str) -> SSEEvent | None:
        """Process one line (without its terminator); return an event when a blank line ends one."""
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(data="\n".join(self._data), event=self._event or "message")
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Process raw bytes from the wire; return the events they complete."""
        buf = self._buf + chunk
        events: list[SSEEvent] = []
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            c = buf[i]
            if c in (0x0A, 0x0D):  # \n or \r
                if c == 0x0D and i + 1 == n:
                    break  # a trailing CR might be half of CRLF: wait for more bytes
                ev = self.feed_line(buf[start:i].decode("utf-8", errors="replace"))
                if ev is not None:
                    events.append(ev)
                if c == 0x0D and buf[i + 1] == 0x0A:
                    i += 1
                start = i + 1
            i += 1
        self._buf = buf[start:]
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: dispatch whatever is pending (tolerates a missing final blank line)."""
        events: list[SSEEvent] = []
        if self._buf:
            ev = self.feed_line(self._buf.decode("utf-8", errors="replace"))
            self._buf = b""
            if ev is not None:
                events.append(ev)
        ev = self.feed_line("")
        if ev is not None:
            events.append(ev)
        return events


@dataclass
class StreamEvent:
    """What a scenario extracts from one SSE event."""

    text: str = ""
    completion_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False  # the stream is over (our final event, or OpenAI's [DONE])
    error: str | None = None


def usage_tokens(obj: dict[str, Any]) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    return None


def error_text(obj: Any) -> str | None:
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    return None


def parse_generate_event(ev: SSEEvent) -> StreamEvent:
    """Parse our ``/generate`` stream: ``{"text"}`` per chunk, last one adds finish_reason/usage."""
    obj = json.loads(ev.data)
    err = error_text(obj)
    if err is not None or ev.event == "error":
        return StreamEvent(error=err or ev.data, done=True)
    finish = obj.get("finish_reason")
    return StreamEvent(
        text=obj.get("text") or "",
        completion_tokens=usage_tokens(obj),
        finish_reason=finish,
        done=finish is not None,
    )


def parse_openai_event(ev: SSEEvent) -> StreamEvent:
    """Parse an OpenAI chat/completions stream chunk (``delta.content`` or ``text``; ``[DONE]``)."""
    if ev.data.strip() == "[DONE]":
        return StreamEvent(done=True)
    obj = json.loads(ev.data)
    err = error_text(obj)
    if err is not None or ev.event == "error":
        return StreamEvent(error=err or ev.data, done=True)
    text = ""
    finish = None
    choices = obj.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else None) or choice.get("text") or ""
        finish = choice.get("finish_reason")
    return StreamEvent(text=text, completion_tokens=usage_tokens(obj), finish_reason=finish)
