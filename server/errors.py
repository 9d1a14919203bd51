"""One error shape for every failure: ``{"error": {"type", "message", "field"}}``; under ``/v1/`` the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` instead, with 400 for invalid
parameters as OpenAI answers, so OpenAI clients raise their usual exceptions."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.request_id import HEADER, current_request_id

log = logging.getLogger(__name__)

UNSUPPORTED = "unsupported_parameter"  # pydantic error type of fields we parse but cannot honour


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        field: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.field, self.headers = status, message, type, field, headers
        self.code = code  # OpenAI's machine-readable code (e.g. model_not_found), only shown under /v1/


def error_body(type: str, message: str, field: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"type": type, "message": message, "field": field}}


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def openai_error_body(type: str, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def respond(
    request: Request,
    status: int,
    type: str,
    message: str,
    field: str | None = None,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    if is_openai(request):
        if type != "invalid_request_error":  # our finer kinds (input_too_long, not_ready, ...) become the code
            code = code or type
            type = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(openai_error_body(type, message, field, code), status_code=status, headers=headers)
    return JSONResponse(error_body(type, message, field), status_code=status, headers=headers)


def _field_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union members show up as extra loc entries (e.g. inputs.str / inputs.list[str]); drop them.
    members = ("str", "int", "float", "bool", "constrained-str", "LabelObject")
    parts = [p for p in parts if not (p in members or p.startswith(("list[", "function-")))]
    return ".".join(parts) or "body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = _field_name(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return respond(request, 400, "invalid_json", "request body is not valid JSON", "body")
    message = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        message = "unknown field"
    code = UNSUPPORTED if err.get("type") == UNSUPPORTED else None
    status = 400 if is_openai(request) else 422
    return respond(request, status, "invalid_request_error", f"{field}: {message}", field, code=code)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return respond(request, exc.status, exc.type, exc.message, exc.field, code=exc.code, headers=exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kinds = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 408: "timeout", 413: "payload_too_large"}
    kind, field = kinds.get(exc.status_code, "http_error"), "body" if exc.status_code in (400, 408, 413) else None
    return respond(request, exc.status_code, kind, str(exc.detail), field, headers=exc.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    # Runs outside the middlewares (Starlette's outermost layer), so the id header is added here.
    headers = {HEADER: current_request_id()}
    return respond(request, 500, "internal_error", "internal server error", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)
