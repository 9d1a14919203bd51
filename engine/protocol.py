"""Messages between API-server processes and engine cores, as msgpack frames (msgspec).

One frame per engine step carries every sequence's new token for one API server, so the cost of
crossing processes grows with steps, not with tokens times requests. Request keys are allocated by
the API server that owns the request: ``key % API_STRIDE`` is its index, which is how a core routes
outputs back without a lookup table.
"""

from __future__ import annotations

import msgspec

from engine.classifier import ClassifierInputError, ClassifyItem, ClassResult, Embedding
from engine.sequence import SamplingParams

API_STRIDE = 1024  # more API servers than this per host are not supported


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """An API server announces itself and where the core should send its outputs."""

    api_index: int
    address: str


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    key: int
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str  # for log lines; clients may repeat ids, keys are unique
    # Seconds the request had left when it was sent: the engine sheds it if it cannot finish in time.
    timeout_s: float | None = None


class Abort(msgspec.Struct, tag="abort", array_like=True):
    key: int


class ClassifyRequest(msgspec.Struct, tag="classify", array_like=True):
    key: int
    items: list[ClassifyItem]


class CancelClassify(msgspec.Struct, tag="cancel", array_like=True):
    key: int


Command = AddRequest | Abort | ClassifyRequest | CancelClassify


class Commands(msgspec.Struct, tag="commands", array_like=True):
    """The commands one API server issued in one turn of its event loop, in one frame: the engine takes the
    generation ones in together, so the sequences of one request (n > 1, several prompts) join the same step
    as they do when the engine runs in the API server's process; and under load a frame carries many
    requests, so crossing processes costs per loop turn, not per request."""

    items: list[Command]


ToCore = Hello | Commands


class TokenLogprobs(msgspec.Struct, array_like=True):
    """The log-probability of a sampled token under the model's distribution, and the ``top`` most likely
    tokens' (most likely first), for a request that asked for them."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class TokenOutput(msgspec.Struct, array_like=True):
    """One sequence's new token after a step. ``finish_reason`` is set by the core for end-of-sequence
    ("stop"), length limits ("length") and failures ("error"); stop strings are matched by the API server."""

    key: int
    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    logprobs: TokenLogprobs | None = None  # only for a request that asked for them
    # On a sequence's first token: seconds from the start of the step that first scheduled it to this output
    # (a duration, so the API server can place it on its own clock, whichever process the engine is in).
    scheduled_ago: float | None = None


class StepOutputs(msgspec.Struct, tag="step", array_like=True):
    outputs: list[TokenOutput]
    running: int  # the core's load after the step, for routing across data-parallel cores
    waiting: int
    error: str | None = None  # why sequences finished with "error" (type only: details are in the core's log)
    core: int = 0  # which engine core sent it


class Scores(msgspec.Struct, tag="c", array_like=True):
    label: str
    score: float
    scores: list[tuple[str, float]]
    labels: list[str] | None = None  # multi_label: the labels that reach their thresholds


class Vector(msgspec.Struct, tag="e", array_like=True):
    vector: list[float]


class ItemError(msgspec.Struct, tag="x", array_like=True):
    message: str
    field: str


ItemResult = Scores | Vector | ItemError


def pack_result(result: ClassResult | Embedding | ClassifierInputError) -> ItemResult:
    if isinstance(result, ClassResult):
        return Scores(result.label, result.score, result.scores, result.labels)
    if isinstance(result, Embedding):
        return Vector(result.vector)
    return ItemError(str(result), result.field)


def unpack_result(result: ItemResult) -> ClassResult | Embedding | ClassifierInputError:
    if isinstance(result, Scores):
        return ClassResult(result.label, result.score, result.scores, result.labels)
    if isinstance(result, Vector):
        return Embedding(result.vector)
    return ClassifierInputError(result.message, result.field)


class ClassifyResults(msgspec.Struct, array_like=True):
    key: int
    results: list[ItemResult]
    # "full: ..." (queue bound, 429), "closed" (stopping, 503) or "failed: ..." (the batch raised, 500); results
    # are empty then
    refused: str | None = None


class ClassifyReplies(msgspec.Struct, tag="results", array_like=True):
    """The classification requests of one API server that a core finished in one turn of its event loop
    (the requests of one batch, typically)."""

    items: list[ClassifyResults]
    core: int = 0


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The core's answer to :class:`Hello`: everything an API server needs to serve without the models.
    Tokenizers travel pickled (trusted local processes only) so both sides tokenize identically."""

    core_index: int
    pid: int
    details: bytes  # pickled server-side description (runtime.CoreDetails)


FromCore = StepOutputs | ClassifyReplies | Ready

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
decode_to_core = msgspec.msgpack.Decoder(ToCore).decode
decode_from_core = msgspec.msgpack.Decoder(FromCore).decode
