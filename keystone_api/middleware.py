"""ASGI middleware: request ids, the request-body limit (413) and request metrics."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"

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


class RequestContextMiddleware:
    """Give every request an id, enforce the body limit and record latency by route."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(REQUEST_ID_HEADER, b"").decode("latin-1")[:64]
        request_id = request_id or uuid.uuid4().hex
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
        finally:
            route = scope.get("route")
            template: Any = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(method, template, str(state["status"])).inc()
            HTTP_LATENCY.labels(method, template).observe(time.perf_counter() - started)

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
