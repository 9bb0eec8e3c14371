"""ASGI middleware: request ids, the request-body limit (413), request metrics and the
access log (one line per request)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystone_core.request_context import bound_request_id

REQUEST_ID_HEADER = b"x-request-id"
# A given X-Request-ID is kept only when it is this plain: it goes into log lines, audit
# rows, webhook headers and Dagster run tags, where a newline or quote could forge entries.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
access_log = logging.getLogger("keystone.access")

HTTP_REQUESTS = Counter(
    "keystone_http_requests_total",
    "HTTP requests by route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "keystone_http_request_duration_seconds",
    "HTTP request latency by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit."""


def _too_large_body(limit: int) -> bytes:
    return json.dumps(
        {"code": "payload_too_large", "message": f"request body exceeds {limit} bytes"}
    ).encode()


def request_id_from(headers: dict[bytes, bytes]) -> str:
    """The caller's ``X-Request-ID`` when it is safe (``[A-Za-z0-9._:-]``, at most 64
    characters), else a new one (32 hex digits)."""
    given = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")
    return given if SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    """Give every request an id (bound as the current request id while it is served),
    enforce the body limit, record latency by route and write the access log line."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = request_id_from(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        state = {"status": 500, "too_large": False, "replaced": False}

        async def send_with_id(message: Message) -> None:
            if state["replaced"]:
                return  # the app's own answer to a cut-off body is dropped
            if message["type"] == "http.response.start":
                if state["too_large"]:
                    state["replaced"] = True
                    await self._reject(send_with_id_raw)
                    return
                state["status"] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        async def send_with_id_raw(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        try:
            with bound_request_id(request_id):
                await self._serve(scope, receive, send_with_id, send_with_id_raw, headers, state)
        finally:
            route = scope.get("route")
            template: Any = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            seconds = time.perf_counter() - started
            HTTP_REQUESTS.labels(method, template, str(state["status"])).inc()
            HTTP_LATENCY.labels(method, template).observe(seconds)
            status = int(state["status"])
            client = scope.get("client")
            access_log.log(
                logging.WARNING if status >= 500 else logging.INFO,
                "%s %s %d %.1f ms",
                method,
                scope.get("path", ""),
                status,
                seconds * 1000,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "route": template,
                    "path": scope.get("path", ""),
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "client": client[0] if client else None,
                },
            )

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send_with_id: Send,
        send_with_id_raw: Send,
        headers: dict[bytes, bytes],
        state: dict[str, Any],
    ) -> None:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(send_with_id_raw)
            return
        received = 0

        async def limited_receive() -> Message:
            # A chunked body has no length up front: count it as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    state["too_large"] = True
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if not state["replaced"]:
                state["replaced"] = True
                await self._reject(send_with_id_raw)

    async def _reject(self, send: Send) -> None:
        body = _too_large_body(self.max_body_bytes)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
