"""Request and response models at the HTTP edge. Unknown fields and wrong JSON types are rejected
(``extra="forbid"``, strict types), so a typo never silently falls back to a default."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Texts are bounded in characters as well as tokens: a token limit alone lets one 900 KB "word" (a few
# tokens) through into the caches, and is only checked after tokenizing it. A text may hold at most this
# many characters per token of its limit (natural text averages 3-6; a BERT [UNK] covers a 100+ character
# word): checked before tokenizing, 400 naming the field like the token limit.
MAX_CHARS_PER_TOKEN = 16
# /classify zero-shot labels: each one is encoded like an input (cached afterwards), so their number and
# size are bounded like inputs are. Characters are checked by the schema; tokens by the route
# (server/routes/classify.py). Settings-free for now (server.config is being split).
CLS_MAX_LABELS = 64
CLS_MAX_LABEL_TOKENS = 64
CLS_MAX_LABEL_CHARS = CLS_MAX_LABEL_TOKENS * MAX_CHARS_PER_TOKEN
Label = Annotated[str, StringConstraints(min_length=1, max_length=CLS_MAX_LABEL_CHARS)]


class StrictModel(BaseModel):
    """Request models: unknown fields and loose types are errors; text must be encodable Unicode."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        """JSON may carry lone surrogates (``"\\ud800"``); no tokenizer can encode them, so refuse them here."""
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for text in texts:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("text must be valid Unicode (no lone surrogates)") from None
        return value


def _not_blank(value: str, name: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} must not be empty or whitespace")
    return value


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(StrictModel):
    prompt: str | None = Field(None, description="raw prompt text (no chat template applied)")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="chat turns, rendered with the model's chat template"
    )
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; the server's default when omitted")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8
    )
    stream: bool = Field(False, description="stream Server-Sent Events, one per token chunk")
    logprobs: bool = Field(False, description="each generated token's log-probability")
    top_logprobs: int = Field(0, ge=0, le=20, description="with logprobs: the most likely tokens at each position")
    timings: bool = Field(False, description="a timings object in the response (or the stream's last event)")
    json_schema: dict[str, Any] | None = Field(None, description="the output is JSON valid against this schema")
    regex: str | None = Field(None, min_length=1, max_length=4096, description="the output matches this regex")
    choice: list[Annotated[str, StringConstraints(min_length=1, max_length=1024)]] | None = Field(
        None, min_length=1, max_length=256, description="the output is exactly one of these strings"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value, "prompt")

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is not None and not any(m.content.strip() for m in value):
            raise ValueError("messages must contain some non-empty content")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if sum(x is not None for x in (self.json_schema, self.regex, self.choice)) > 1:
            raise ValueError("give at most one of 'json_schema', 'regex' or 'choice'")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """A generated token (as text), its log-probability under the model, and the most likely alternatives."""

    top_logprobs: list[TopLogprob]


class Timings(BaseModel):
    """Where a request's time went, in milliseconds from its arrival at the API server: waiting to be
    scheduled, until its first token (the prompt's prefill), from then to its last token, and in all;
    ``tokens_per_second``: generated tokens over prefill and decode time. With several choices: from the
    first scheduled, through the first token of any, to the last token of all."""

    queue_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    tokens_per_second: float

    def headers(self) -> dict[str, str]:
        return {
            "X-Queue-Time-Ms": f"{self.queue_ms:.2f}",
            "X-Prefill-Time-Ms": f"{self.prefill_ms:.2f}",
            "X-Decode-Time-Ms": f"{self.decode_ms:.2f}",
            "X-Total-Time-Ms": f"{self.total_ms:.2f}",
            "X-Tokens-Per-Second": f"{self.tokens_per_second:.2f}",
        }


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    logprobs: list[TokenLogprob] | None = Field(
        None, exclude_if=lambda v: v is None, description="present when the request set logprobs"
    )
    timings: Timings | None = Field(
        None, exclude_if=lambda v: v is None, description="present when the request set timings"
    )



class ClassifyRequest(StrictModel):
    inputs: str | list[str] = Field(description="one text or a list of texts")
    labels: list[Label] | None = Field(
        None,
        min_length=1,
        max_length=CLS_MAX_LABELS,
        description=f"candidate labels (zero-shot); may be short descriptions (at most {CLS_MAX_LABEL_CHARS} "
        f"characters and {CLS_MAX_LABEL_TOKENS} tokens each)",
    )
    multi_label: bool = Field(False, description="score labels independently instead of as one distribution")

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("inputs must not be empty")
        for text in texts:
            _not_blank(text, "inputs")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for label in value:
                _not_blank(label, "labels")
            if len(set(value)) != len(value):
                raise ValueError("labels must be unique")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: list[LabelScore]


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
