"""The classification service behind POST /classify: a request's inputs and labels become classifier items
(label objects with descriptions and examples travel whole, to an engine core too), their limits are checked,
identical inputs are answered from the response cache, and the rest go through the batching queue."""

from __future__ import annotations

from dataclasses import replace

from fastapi import Request

from engine.classifier import ClassifierInputError, ClassifyItem, ClassResult, LabelSpec
from server.errors import APIError
from server.routes.common import encoder_inputs, on_encoder
from server.runtime import Runtime
from server.schemas import CLS_MAX_LABEL_TOKENS, ClassifyRequest, LabelObject


def label_specs(body: ClassifyRequest) -> tuple[LabelSpec, ...] | None:
    """The request's labels as the classifier takes them (a plain string is a label named by its text)."""
    if body.labels is None:
        return None
    return tuple(
        LabelSpec(label)
        if isinstance(label, str)
        else LabelSpec(label.name, label.description, tuple(label.examples), label.threshold)
        for label in body.labels
    )


def _label_text_fields(body: ClassifyRequest) -> list[str]:
    """The request field of each of ``body.label_texts``, for errors."""
    fields: list[str] = []
    for i, label in enumerate(body.labels or ()):
        if isinstance(label, str):
            fields.append(f"labels.{i}")
            continue
        assert isinstance(label, LabelObject)
        if not label.examples and not label.description:
            fields.append(f"labels.{i}.name")
            continue
        fields.extend(f"labels.{i}.examples.{j}" for j in range(len(label.examples)))
        if label.description:
            fields.append(f"labels.{i}.description")
    return fields


def _label_tokens(runtime: Runtime, body: ClassifyRequest, texts: list[str], counts: list[int]) -> int:
    """Checks the per-text token limit of the labels' texts (``body.label_texts``, ``counts`` tokens each);
    returns the tokens of those the classifier has not cached yet, which the batch running the request's
    first item will encode."""
    assert runtime.classifier is not None
    if max(counts, default=0) > CLS_MAX_LABEL_TOKENS:  # the fields are named for the error only
        for field, text, n_tokens in zip(_label_text_fields(body), texts, counts, strict=True):
            if n_tokens > CLS_MAX_LABEL_TOKENS:
                raise APIError(
                    400,
                    f"{field} ({text[:32]!r}...) has {n_tokens} tokens; the limit is {CLS_MAX_LABEL_TOKENS}",
                    type="input_too_long",
                    field=field,
                )
    by_text = dict(zip(texts, counts, strict=True))
    return sum(by_text[t] for t in runtime.classifier.uncached_labels(texts))


def _with_label_cost(items: list[ClassifyItem], label_tokens: int) -> list[ClassifyItem]:
    """``items`` with ``label_tokens`` added to the first one's cost: the batch that runs it (the first
    of the request's batches: the queue keeps a call's items in order) encodes the new label texts."""
    if not items or not label_tokens:
        return items
    return [replace(items[0], n_tokens=items[0].n_tokens + label_tokens), *items[1:]]


def _checked(results: list[object]) -> list[ClassResult]:
    """The results, or the first item's error (an engine core returns errors in place of results)."""
    for result in results:
        if isinstance(result, ClassifierInputError):
            raise result
        assert isinstance(result, ClassResult)
    return results  # type: ignore[return-value]


async def _through_cache(runtime: Runtime, items: list[ClassifyItem], label_tokens: int) -> list[ClassResult]:
    """Answers cached items at once and sends only the others through the batcher."""
    assert runtime.batcher is not None and runtime.served.cls_model_id is not None
    cache = runtime.cls_cache
    if cache is None:
        return _checked(await runtime.batcher.submit_many(_with_label_cost(items, label_tokens)))
    keys = [(runtime.served.cls_model_id, it.text, it.labels, it.multi_label, it.threshold) for it in items]
    results: list[ClassResult | None] = [cache.get(key) for key in keys]
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        fresh = _checked(await runtime.batcher.submit_many(_with_label_cost([items[i] for i in missing], label_tokens)))
        for i, result in zip(missing, fresh, strict=True):
            cache.put(keys[i], result)
            results[i] = result
    return results  # type: ignore[return-value]


async def classify(request: Request, runtime: Runtime, body: ClassifyRequest) -> list[ClassResult]:
    """Validates ``body`` against the model's limits and classifies its inputs (APIError on bad input;
    ClientDisconnected when the client leaves first)."""
    assert runtime.classifier is not None
    texts, label_texts = body.texts, body.label_texts
    ids, label_counts = await encoder_inputs(
        runtime, texts, "inputs", single=isinstance(body.inputs, str), labels=label_texts
    )
    labels = label_specs(body)
    items = []
    for text, row in zip(texts, ids, strict=True):
        item = ClassifyItem(text, labels, body.multi_label, len(row), threshold=body.threshold, ids=tuple(row))
        try:
            runtime.classifier.check(item)
        except ClassifierInputError as exc:
            raise APIError(400, str(exc), field=exc.field) from exc
        items.append(item)
    label_tokens = _label_tokens(runtime, body, label_texts, label_counts) if labels is not None else 0
    try:
        return await on_encoder(request, runtime, len(items), lambda: _through_cache(runtime, items, label_tokens))
    except ClassifierInputError as exc:
        raise APIError(400, str(exc), field=exc.field) from exc
