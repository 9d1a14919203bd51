"""One error shape for every failure: ``{"error": {"type", "message", "field"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.field, self.headers = status, message, type, field, headers


def error_body(type: str, message: str, field: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"type": type, "message": message, "field": field}}


def _field_name(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Union members show up as extra loc entries (e.g. inputs.str / inputs.list[str]); drop them.
    parts = [p for p in parts if not (p in ("str", "int", "float", "bool") or p.startswith(("list[", "function-")))]
    return ".".join(parts) or "body"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    field = _field_name(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return JSONResponse(error_body("invalid_json", "request body is not valid JSON", "body"), status_code=400)
    message = err.get("msg", "invalid value")
    if err.get("type") == "extra_forbidden":
        message = "unknown field"
    return JSONResponse(error_body("invalid_request_error", f"{field}: {message}", field), status_code=422)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.type, exc.message, exc.field), status_code=exc.status, headers=exc.headers)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unhandled)
