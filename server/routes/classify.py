"""POST /classify: zero-shot or head classification through the dynamic batching queue, with an LRU
cache of results in front of it for repeated inputs."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.classifier import ClassifierInputError, ClassifyItem, ClassResult
from server import metrics
from server.errors import APIError
from server.routes.common import ERRORS, ClientDisconnected, encoder_inputs, on_encoder, ready_runtime
from server.runtime import Runtime
from server.schemas import (
    CLS_MAX_LABEL_TOKENS,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    LabelScore,
)

router = APIRouter()


def _label_tokens(runtime: Runtime, labels: list[str], label_counts: list[int]) -> int:
    """Checks the per-label token limit; returns the tokens of the labels the classifier has not cached
    yet, which the batch running the request's first item will encode."""
    assert runtime.classifier is not None
    counts = dict(zip(labels, label_counts, strict=True))
    for i, n_tokens in enumerate(counts.values()):
        if n_tokens > CLS_MAX_LABEL_TOKENS:
            raise APIError(
                400,
                f"labels[{i}] has {n_tokens} tokens; the limit is {CLS_MAX_LABEL_TOKENS}",
                type="input_too_long",
                field=f"labels.{i}",
            )
    return sum(counts[label] for label in runtime.classifier.uncached_labels(labels))


def _with_label_cost(items: list[ClassifyItem], label_tokens: int) -> list[ClassifyItem]:
    """``items`` with ``label_tokens`` added to the first one's cost: the batch that runs it (the first
    of the request's batches: the queue keeps a call's items in order) encodes the new labels."""
    if not items or not label_tokens:
        return items
    return [replace(items[0], n_tokens=items[0].n_tokens + label_tokens), *items[1:]]


async def _classify(runtime: Runtime, items: list[ClassifyItem], label_tokens: int) -> list[ClassResult]:
    """Answers cached items at once and sends only the others through the batcher."""
    assert runtime.batcher is not None and runtime.cls_model_id is not None
    cache = runtime.cls_cache
    if cache is None:
        return await runtime.batcher.submit_many(_with_label_cost(items, label_tokens))  # type: ignore[return-value]
    keys = [(runtime.cls_model_id, it.text, it.labels, it.multi_label) for it in items]
    results = [cache.get(key) for key in keys]
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        fresh = await runtime.batcher.submit_many(_with_label_cost([items[i] for i in missing], label_tokens))
        for i, result in zip(missing, fresh, strict=True):
            assert isinstance(result, ClassResult)
            cache.put(keys[i], result)
            results[i] = result
    return results  # type: ignore[return-value]


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    if runtime.classifier is None or runtime.batcher is None:
        raise APIError(404, "classification is disabled on this server", type="not_found")
    texts = body.texts
    n_tokens, label_counts = encoder_inputs(
        runtime, texts, "inputs", single=isinstance(body.inputs, str), labels=body.labels or ()
    )
    labels = tuple(body.labels) if body.labels is not None else None
    items = []
    for text, n in zip(texts, n_tokens, strict=True):
        item = ClassifyItem(text, labels, body.multi_label, n)
        try:
            runtime.classifier.check(item)
        except ClassifierInputError as exc:
            raise APIError(400, str(exc), field=exc.field) from exc
        items.append(item)
    label_tokens = _label_tokens(runtime, body.labels, label_counts) if body.labels is not None else 0
    try:
        results = await on_encoder(request, runtime, len(items), lambda: _classify(runtime, items, label_tokens))
    except ClientDisconnected:
        return Response(status_code=499)
    except ClassifierInputError as exc:
        raise APIError(400, str(exc), field=exc.field) from exc
    metrics.CLASSIFY_INPUTS.inc(len(items))
    response = ClassifyResponse(
        results=[
            ClassifyResult(label=r.label, score=r.score, scores=[LabelScore(label=lb, score=sc) for lb, sc in r.scores])
            for r in results
        ]
    )
    return Response(response.model_dump_json(), media_type="application/json")
