"""OpenAI wire format for the ``/v1`` routes (chat completions, completions, models, embeddings).

Requests are strict like ours (unknown fields are rejected), with one courtesy: OpenAI parameters we
parse but cannot honour (logit_bias, audio, ...) are accepted at their neutral value (``null``, ``false``,
``[]``) that some clients always send, and rejected with ``code: unsupported_parameter`` otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.errors import UNSUPPORTED
from server.schemas import StrictModel, Timings, TokenLogprob, as_texts, one_or_more_texts

StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]
# Names the server echoes (model, in a 404) or ignores (user, name): bounded so they cannot carry bulk.
MAX_NAME_CHARS = 256


def _unsupported(*neutral: object) -> Any:
    def check(value: object) -> object:
        if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
            raise PydanticCustomError(UNSUPPORTED, "not supported by this server")
        return value

    return Annotated[Any, AfterValidator(check), Field(None, description="not supported; accepted only when neutral")]


class StreamOptions(StrictModel):
    include_usage: bool = False


class TextFormat(StrictModel):
    type: Literal["text"]


class JsonObjectFormat(StrictModel):
    type: Literal["json_object"]


class JsonSchemaSpec(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class SamplingRequest(StrictModel):
    """Fields shared by chat completions and completions."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="an id from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate; the server's default when omitted")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding (OpenAI's default is 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="choices to generate, each its own sequence")
    stop: StopString | list[StopString] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="reproducible sampling; choice i uses seed + i")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(
        None, max_length=MAX_NAME_CHARS, description="end-user id; accepted for compatibility, not used"
    )
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    timings: bool = Field(False, description="extension: a timings object in the response (or last stream chunk)")
    speculative: bool | None = Field(
        None, description="extension: speculative decoding for this request; the server's setting when omitted"
    )
    logit_bias: _unsupported({}) = None
    service_tier: _unsupported("auto", "default") = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop strings")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(description="the arguments as a JSON text")


class ToolCall(StrictModel):
    id: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="text, or text parts (other part types are not supported); null on a tool-calling turn"
    )
    name: str | None = Field(None, max_length=MAX_NAME_CHARS, description="accepted for compatibility, not used")
    tool_calls: list[ToolCall] | None = Field(None, max_length=64, description="an assistant turn's calls")
    tool_call_id: str | None = Field(None, max_length=MAX_NAME_CHARS, description="the call a tool turn answers")
    refusal: str | None = Field(None, description="accepted for compatibility, not used")

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionSpec(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(StrictModel):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(None, description="each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the most likely alternatives")
    tools: list[Tool] | None = Field(None, max_length=64, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="whether one answer may hold several calls")
    functions: _unsupported([]) = None
    function_call: _unsupported("none") = None
    modalities: _unsupported(["text"]) = None
    audio: _unsupported() = None
    prediction: _unsupported() = None
    reasoning_effort: _unsupported() = None
    web_search_options: _unsupported() = None
    store: _unsupported(False) = None
    metadata: _unsupported() = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text.strip() for m in value):
            raise ValueError("messages must contain some non-empty content")
        return value

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] = Field(description="a prompt or a list of prompts (token-id prompts are not supported)")
    echo: bool = Field(False, description="prepend the prompt to the completion text")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of each token and this many alternatives"
    )
    suffix: _unsupported() = None
    best_of: _unsupported(1) = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        return one_or_more_texts(value, "prompt", most=16)

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str]:
        return as_texts(self.prompt)


class EmbeddingRequest(StrictModel):
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    input: str | list[str] = Field(description="a text or a list of texts (token-id inputs are not supported)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own dimension is supported")
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[str]) -> str | list[str]:
        return one_or_more_texts(value, "input")

    @property
    def texts(self) -> list[str]:
        return as_texts(self.input)


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class Completions(BaseModel):
    """What a chat completion and a text completion both hold."""

    id: str
    created: int
    model: str
    usage: Usage
    system_fingerprint: None = None
    timings: Timings | None = Field(
        None, exclude_if=lambda v: v is None, description="extension: present when the request set timings"
    )


class ChatCompletion(Completions):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class TextCompletion(Completions):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lowlat-server"
    task: Literal["generate", "classify"] = Field(description="extension: which routes serve it")
    details: dict[str, Any] = Field(
        default_factory=dict, description="extension: source, load time and, where present, the compression report"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
