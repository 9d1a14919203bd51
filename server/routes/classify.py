"""POST /classify: a thin adapter over server/services/classification.py (zero-shot, few-shot or head
classification through the dynamic batching queue, with an LRU cache of results in front of it)."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.classifier import ClassResult
from server import metrics
from server.errors import APIError
from server.routes.common import ERRORS, ClientDisconnected, ready_runtime
from server.schemas import ClassifyRequest, ClassifyResponse
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
    return Response(_JSON.encode({"results": [_result(r) for r in results]}), media_type="application/json")


# ClassifyResponse's JSON written by msgspec from plain dicts: the same document as the pydantic models'
# model_dump_json(exclude_none=True), without building five models per input.
_JSON = msgspec.json.Encoder()


def _result(r: ClassResult) -> dict[str, object]:
    out: dict[str, object] = {
        "label": r.label,
        "score": float(r.score),
        "scores": [{"label": label, "score": float(score)} for label, score in r.scores],
    }
    if r.labels is not None:
        out["labels"] = r.labels
    return out
