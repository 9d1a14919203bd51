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
# Few-shot labels: examples per label, and label texts (names used as text, descriptions, examples) per request.
CLS_MAX_LABEL_EXAMPLES = 32
CLS_MAX_LABEL_TEXTS = 256
# The label an out-of-scope message gets (models/classifier_head.py NONE_LABEL).
CLS_NONE_LABEL = "none"
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


def as_texts(value: str | list[str]) -> list[str]:
    """A field that takes one text or a list of them, as a list."""
    return [value] if isinstance(value, str) else value


def one_or_more_texts(value: str | list[str], name: str, most: int | None = None) -> str | list[str]:
    """Validate a field that takes one text or a list of them: 1 to ``most`` texts, none blank."""
    texts = as_texts(value)
    if not texts:
        raise ValueError(f"{name} must not be empty")
    if most is not None and len(texts) > most:
        raise ValueError(f"{name} takes at most {most} texts")
    for text in texts:
        _not_blank(text, name)
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
    speculative: bool | None = Field(
        None, description="speculative decoding for this request; the server's `speculative` setting when omitted"
    )
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


class LabelObject(StrictModel):
    """A label with what describes it: scored by its examples (few-shot) and description, else by its
    description, else by its name."""

    name: Label = Field(description="the label returned")
    description: Label | None = Field(None, description="what the label means, in a sentence")
    examples: list[Label] = Field(
        default_factory=list, max_length=CLS_MAX_LABEL_EXAMPLES, description="example messages of this label"
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="multi_label: the cosine similarity from which this label applies"
    )

    @field_validator("name", "description")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value, "label text")

    @field_validator("examples")
    @classmethod
    def _examples(cls, value: list[str]) -> list[str]:
        for example in value:
            _not_blank(example, "examples")
        return value

    @property
    def texts(self) -> list[str]:
        """The texts the classifier embeds for this label (as engine.classifier.LabelSpec.texts)."""
        texts = [*self.examples, self.description] if self.description else self.examples
        return texts or [self.name]


class ClassifyRequest(StrictModel):
    inputs: str | list[str] = Field(description="one text or a list of texts")
    labels: list[Label | LabelObject] | None = Field(
        None,
        min_length=1,
        max_length=CLS_MAX_LABELS,
        description="candidate labels: a name or short description (zero-shot), or an object with `name`, "
        f"`description` and `examples` (few-shot, at most {CLS_MAX_LABEL_EXAMPLES}); at most "
        f"{CLS_MAX_LABEL_TEXTS} label texts in all, each at most {CLS_MAX_LABEL_CHARS} characters and "
        f"{CLS_MAX_LABEL_TOKENS} tokens; without labels the model's (or trained) head answers",
    )
    multi_label: bool = Field(False, description="score labels independently instead of as one distribution")
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=f"out of scope below it: the answer is {CLS_NONE_LABEL!r}; for labels a cosine similarity, "
        "for a head a probability (default: a trained head's own, chosen on its data)",
    )

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        return one_or_more_texts(value, "inputs")

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str | LabelObject] | None) -> list[str | LabelObject] | None:
        if value is not None:
            names = [label if isinstance(label, str) else label.name for label in value]
            for name in names:
                _not_blank(name, "labels")
            if len(set(names)) != len(names):
                raise ValueError("label names must be unique")
            n_texts = sum(1 if isinstance(label, str) else len(label.texts) for label in value)
            if n_texts > CLS_MAX_LABEL_TEXTS:
                raise ValueError(f"{n_texts} label texts in all; the limit is {CLS_MAX_LABEL_TEXTS}")
        return value

    @model_validator(mode="after")
    def _none_reserved(self) -> ClassifyRequest:
        """With a threshold or multi_label the answer may be the out-of-scope label: no label may be called so."""
        names = [label if isinstance(label, str) else label.name for label in self.labels or ()]
        if (self.threshold is not None or self.multi_label) and CLS_NONE_LABEL in names:
            raise ValueError(f"{CLS_NONE_LABEL!r} is the out-of-scope answer; name the label otherwise")
        return self

    @property
    def texts(self) -> list[str]:
        return as_texts(self.inputs)

    @property
    def label_texts(self) -> list[str]:
        """Every text the labels have the classifier embed, in label order."""
        return [t for label in self.labels or () for t in ([label] if isinstance(label, str) else label.texts)]


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    label: str = Field(description=f"the best label, or {CLS_NONE_LABEL!r} when out of scope")
    score: float
    scores: list[LabelScore]
    labels: list[str] | None = Field(
        None, description="multi_label only: every label that reaches its threshold, best first"
    )


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
