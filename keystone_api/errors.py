"""One mapping from Keystone errors to HTTP: ``{code, message}`` bodies, never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from keystone_core.errors import (
    AuthenticationError,
    BadRequest,
    ConfigurationError,
    ConflictError,
    DependencyUnavailable,
    DeviceTimeout,
    KeystoneError,
    NotFoundError,
    PayloadTooLarge,
    PermissionDeniedError,
    ValidationFailed,
)
from keystone_core.ratelimit import RateLimited

log = logging.getLogger("keystone.api")

STATUS_BY_ERROR: tuple[tuple[type[KeystoneError], int], ...] = (
    (BadRequest, 400),
    (PayloadTooLarge, 413),
    (DeviceTimeout, 504),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (ValidationFailed, 422),
    (RateLimited, 429),
    (DependencyUnavailable, 503),
    (ConfigurationError, 500),
)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
    504: "gateway_timeout",
}


class ErrorBody(BaseModel):
    """The body of every error response."""

    code: str
    message: str
    detail: Any | None = None


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def status_for(exc: KeystoneError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 400


async def _keystone_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KeystoneError)
    status = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    return error_response(status, exc.code, exc.message, exc.details or None, headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in err.items() if k in {"loc", "msg", "type"}} for err in exc.errors()]
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(422, "invalid_json", "request body is not valid JSON", errors)
    fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) or "body" for e in errors)
    return error_response(422, "validation_error", f"invalid input: {fields}", errors)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # Bytes that are not UTF-8 JSON: the same answer as any other malformed JSON.
        return error_response(422, "invalid_json", "request body is not valid JSON")
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _out_of_range(_request: Request, exc: Exception) -> JSONResponse:
    # A number the schema admits but the database cannot hold (e.g. an id beyond BIGINT).
    return error_response(422, "value_out_of_range", "a value is out of the accepted range")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Runs outside the request-id middleware (Starlette's outermost layer): name it here.
    log.exception(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        extra={"request_id": getattr(request.state, "request_id", None)},
    )
    return error_response(500, "internal_error", "internal error; see the server log")


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    log.error("database connection pool exhausted on %s %s", request.method, request.url.path)
    return error_response(
        503,
        "database_busy",
        "no database connection became free in time; retry shortly",
        headers={"Retry-After": "5"},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KeystoneError, _keystone_error)
    app.add_exception_handler(PoolTimeout, _pool_exhausted)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _out_of_range)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(Exception, _unexpected)
