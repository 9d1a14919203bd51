"""POST /classify: a thin adapter over server/services/classification.py (zero-shot, few-shot or head
classification through the dynamic batching queue, with an LRU cache of results in front of it)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import metrics
from server.errors import APIError
from server.routes.common import ERRORS, ClientDisconnected, ready_runtime
from server.schemas import ClassifyRequest, ClassifyResponse, ClassifyResult, LabelScore
from server.services import classification

router = APIRouter()


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True, responses=ERRORS)
async def classify(body: ClassifyRequest, request: Request) -> Response:
    runtime = ready_runtime(request)
    if runtime.classifier is None or runtime.batcher is None:
        raise APIError(404, "classification is disabled on this server", type="not_found")
    try:
        results = await classification.classify(request, runtime, body)
    except ClientDisconnected:
        return Response(status_code=499)
    metrics.CLASSIFY_INPUTS.inc(len(results))
    response = ClassifyResponse(
        results=[
            ClassifyResult(
                label=r.label,
                score=r.score,
                scores=[LabelScore(label=lb, score=sc) for lb, sc in r.scores],
                labels=r.labels,
            )
            for r in results
        ]
    )
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")
