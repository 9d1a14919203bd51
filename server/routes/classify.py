"""POST /classify: zero-shot or head classification through the dynamic batching queue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.classifier import ClassifierInputError, ClassifyItem
from server import metrics
from server.errors import APIError
from server.routes.common import ClientDisconnected, ready_runtime, until_disconnect
from server.schemas import ClassifyRequest, ClassifyResponse, ClassifyResult, ErrorResponse, LabelScore

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 422, 503)}


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    if runtime.classifier is None or runtime.batcher is None:
        raise APIError(404, "classification is disabled on this server", type="not_found")
    settings = runtime.settings
    texts = body.texts
    if len(texts) > settings.cls_max_inputs:
        raise APIError(
            400, f"{len(texts)} inputs; the limit is {settings.cls_max_inputs} (cls_max_inputs)", field="inputs"
        )
    labels = tuple(body.labels) if body.labels is not None else None
    items = []
    for i, (text, n_tokens) in enumerate(zip(texts, runtime.classifier.count_tokens(texts), strict=True)):
        if n_tokens > settings.cls_max_input_tokens:
            raise APIError(
                400,
                f"inputs[{i}] has {n_tokens} tokens; the limit is {settings.cls_max_input_tokens} "
                "(cls_max_input_tokens)",
                type="input_too_long",
                field="inputs" if isinstance(body.inputs, str) else f"inputs.{i}",
            )
        item = ClassifyItem(text, labels, body.multi_label, n_tokens)
        try:
            runtime.classifier.check(item)
        except ClassifierInputError as exc:
            raise APIError(400, str(exc), field=exc.field) from exc
        items.append(item)
    try:
        results = await until_disconnect(request, runtime.batcher.submit_many(items))
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
