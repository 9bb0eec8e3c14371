"""The receiver's HTTP surface: ``create_app(settings)``, routes, auth and error mapping."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystone_receiver import __doc__ as package_doc
from keystone_receiver.db import check_database, create_receiver_engine, create_tables
from keystone_receiver.errors import (
    DatabaseUnavailable,
    ObjectStoreUnavailable,
    ReceiverError,
    Unauthorized,
)
from keystone_receiver.protocol import (
    API_PREFIX,
    ID_PATTERN,
    AlreadySyncedBody,
    CompleteRequest,
    EpisodeManifest,
    EpisodeState,
    EpisodeSynced,
    ErrorBody,
    Health,
    ObjectMismatchBody,
    SessionMismatchBody,
    SessionOpened,
)
from keystone_receiver.sessions import SyncSessions
from keystone_receiver.settings import ReceiverSettings
from keystone_receiver.storage import ReceiverStore

log = logging.getLogger("keystone.receiver")

VERSION = "1"
# A manifest of 1,000 objects plus 64 KiB of metadata stays well below this.
MAX_REQUEST_BODY_BYTES = 1024 * 1024
RETRY_AFTER_S = 5

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@dataclass
class Backends:
    """What a running receiver holds: the engine, the bucket and the behaviour over both."""

    engine: Engine
    store: ReceiverStore
    sessions: SyncSessions

    def close(self) -> None:
        self.engine.dispose()


def open_backends(settings: ReceiverSettings) -> Backends:
    """Connect to the database and the store, creating tables and the bucket if missing.

    Raises :class:`DatabaseUnavailable` or :class:`ObjectStoreUnavailable` with one line
    that says what is wrong, so a start-up failure reads as a sentence, not a traceback.
    """
    engine = create_receiver_engine(settings)
    try:
        try:
            create_tables(engine)
        except OperationalError as exc:
            reason = str(exc.orig or exc).splitlines()[0]
            raise DatabaseUnavailable(f"database unreachable: {reason}") from None
        store = ReceiverStore(settings)
        store.ensure_bucket()
    except BaseException:
        engine.dispose()
        raise
    return Backends(engine=engine, store=store, sessions=SyncSessions(engine, store, settings))


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = ErrorBody(code=code, message=message, **extra).model_dump(mode="json")
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _token_digest(value: str) -> bytes:
    # Compare digests so that neither the token's content nor its length leaks through timing.
    return hashlib.sha256(value.encode()).digest()


def _authorized(request: Request) -> bool:
    settings: ReceiverSettings = request.app.state.settings
    if settings.token is None:  # only possible with allow_anonymous (settings enforce it)
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    presented = credentials.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(
        _token_digest(presented), _token_digest(settings.token.get_secret_value())
    )


def require_token(request: Request) -> None:
    """Every route but ``/health``: ``Authorization: Bearer <KEYSTONE_RECEIVER_TOKEN>``."""
    if not _authorized(request):
        raise Unauthorized("missing or wrong bearer token")


def sessions_of(request: Request) -> SyncSessions:
    backends: Backends = request.app.state.backends
    return backends.sessions


SessionsDep = Annotated[SyncSessions, Depends(sessions_of)]
EpisodeIdPath = Annotated[str, Path(pattern=ID_PATTERN)]


class RequestBodyLimit:
    """413 ``payload_too_large`` for bodies over ``max_bytes``, before they are buffered.

    FastAPI's own limit answers in plain text; every answer of the receiver is JSON.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = _error(413, "payload_too_large", self._message())
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading to our handler.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"


async def _receiver_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ReceiverError)
    return _error(exc.status, exc.code, exc.message, **exc.extra)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI parses JSON before it runs dependencies; an unauthenticated caller still
    # learns nothing about what it sent.
    if not _authorized(request):
        return _error(401, Unauthorized.code, "missing or wrong bearer token")
    errors = [{k: v for k, v in e.items() if k in {"loc", "msg", "type"}} for e in exc.errors()]
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(422, "invalid_request", "request body is not valid JSON", detail=errors)
    fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) or "body" for e in errors)
    return _error(422, "invalid_request", f"invalid request: {fields}", detail=errors)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return _error(422, "invalid_request", "request body is not valid JSON")
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return _error(exc.status_code, code, message)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("database error on %s %s: %s", request.method, request.url.path, exc)
    return _error(503, DatabaseUnavailable.code, "the database is unavailable; retry shortly")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, "internal_error", "internal error; see the receiver's log")


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "`unauthorized`: missing or wrong bearer token"},
    422: {"model": ErrorBody, "description": "`invalid_request`: the body or path is invalid"},
    503: {"model": ErrorBody, "description": "database or object store unavailable; retry"},
}


def create_app(settings: ReceiverSettings) -> FastAPI:
    """The receiver. Tables and the bucket are created when it starts (lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = await run_in_threadpool(open_backends, settings)
        app.state.backends = backends
        log.info("keystone cloud receiver ready (bucket %s)", settings.bucket)
        try:
            yield
        finally:
            backends.close()

    app = FastAPI(
        title="Keystone cloud receiver",
        version=VERSION,
        description=package_doc,
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.add_exception_handler(ReceiverError, _receiver_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(RequestBodyLimit, max_bytes=MAX_REQUEST_BODY_BYTES)

    authed = [Depends(require_token)]

    @app.post(
        f"{API_PREFIX}/episode",
        status_code=202,
        response_model=SessionOpened,
        response_model_exclude_none=True,
        dependencies=authed,
        responses={
            **_ERRORS,
            409: {"model": AlreadySyncedBody, "description": "`already_synced` (has synced_at)"},
        },
        summary="Open or resume the episode's upload session",
    )
    def open_session(manifest: EpisodeManifest, sessions: SessionsDep) -> SessionOpened:
        return sessions.open(manifest)

    @app.post(
        f"{API_PREFIX}/episode/{{episode_id}}/complete",
        response_model=EpisodeSynced,
        dependencies=authed,
        responses={
            **_ERRORS,
            404: {"model": ErrorBody, "description": "`unknown_episode`"},
            409: {"model": SessionMismatchBody, "description": "`session_mismatch`"},
            422: {"model": ObjectMismatchBody, "description": "`object_mismatch`, or invalid"},
        },
        summary="Verify every object and mark the episode synced",
    )
    def complete_session(
        episode_id: EpisodeIdPath, body: CompleteRequest, sessions: SessionsDep
    ) -> EpisodeSynced:
        return sessions.complete(episode_id, body.session)

    @app.get(
        f"{API_PREFIX}/episode/{{episode_id}}",
        response_model=EpisodeState,
        dependencies=authed,
        responses={**_ERRORS, 404: {"model": ErrorBody, "description": "`unknown_episode`"}},
        summary="The episode's session, progress and counters",
    )
    def episode_state(episode_id: EpisodeIdPath, sessions: SessionsDep) -> EpisodeState:
        return sessions.state(episode_id)

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": ErrorBody, "description": "`unavailable`, names components"}},
        summary="Liveness and readiness: the database and the bucket answer",
    )
    def health(request: Request) -> Health | JSONResponse:
        backends: Backends = request.app.state.backends
        failing: dict[str, str] = {}
        try:
            check_database(backends.engine)
        except Exception as exc:
            failing["database"] = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        try:
            backends.store.check()
        except ObjectStoreUnavailable as exc:
            failing["object_store"] = exc.message
        if failing:
            return _error(
                503,
                "unavailable",
                "; ".join(f"{name}: {reason}" for name, reason in failing.items()),
                components={
                    name: "ok" if name not in failing else "failing"
                    for name in ("database", "object_store")
                },
            )
        return Health(status="ok")

    return app
