"""The recorder's HTTP callbacks: ``POST /callbacks/start`` and ``/callbacks/finish``.

The recorder sends each callback once, never retries, and ignores the answer: the
handlers only record what happened (quickly, idempotently) and the transfer side
completes tasks on its own. Authorised by the task's ``user_token`` or the device token.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from keystone_api.deps import SettingsDep, get_engine
from keystone_api.errors import ErrorBody
from keystone_api.ratelimits import CALLBACK, CALLBACK_ADDRESS, client_ip, hit
from keystone_core import clock
from keystone_core.db import run_transaction, session_scope
from keystone_core.errors import BadRequest, NotFoundError, PayloadTooLarge
from keystone_core.models import TaskStatus
from keystone_core.services import device_tasks
from keystone_core.settings import Settings

router = APIRouter(prefix="/api/v1/callbacks", tags=["callbacks"])
log = logging.getLogger("keystone.callbacks")

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "not JSON, not an object, or no task_id"},
    401: {"model": ErrorBody, "description": "no bearer token"},
    403: {"model": ErrorBody, "description": "the token is not for this task or device"},
    404: {"model": ErrorBody, "description": "unknown task (recorded as an orphan)"},
    413: {"model": ErrorBody, "description": "body over KEYSTONE_CALLBACK_MAX_BYTES"},
    429: {"model": ErrorBody, "description": "too many callbacks from this client"},
}

_BODY_EXAMPLE = {
    "task_id": "task_20260101_080000_000_00_0a1b2c3d",
    "device_id": "AB-F0001-T0001-000001",
    "status": "recording",
    "started_at": "2026-01-01T08:00:00Z",
    "topics": ["/imu/data"],
}


class StartAcknowledged(BaseModel):
    status: Literal["acknowledged"] = "acknowledged"
    task_status: TaskStatus
    acknowledged_at: datetime


class FinishAcknowledged(BaseModel):
    success: bool = True
    message: str
    task_status: TaskStatus
    upload_request_sent: bool = Field(
        False, description="The transfer side is asked for the upload separately."
    )


async def _read_body(request: Request, settings: Settings) -> dict[str, Any]:
    declared = request.headers.get("content-length", "")
    limit = settings.callback_max_bytes
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"callback body over {limit} bytes", code="payload_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw.extend(chunk)
        if len(raw) > limit:
            raise PayloadTooLarge(f"callback body over {limit} bytes", code="payload_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.warning("callback %s from %s is not JSON", request.url.path, client_ip(request))
        raise BadRequest("the body is not JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    task_id = body.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise BadRequest("task_id (a string) is required", code="missing_task_id", field="task_id")
    return body


def _bearer(request: Request) -> str | None:
    parts = request.headers.get("authorization", "").split()
    return parts[1] if len(parts) == 2 and parts[0].lower() == "bearer" else None


def _handle(
    kind: str, request: Request, settings: Settings, engine: Engine, body: dict[str, Any]
) -> device_tasks.Advance:
    task_id = str(body["task_id"])
    token = _bearer(request)

    def work(session: Session) -> device_tasks.Advance:
        caller = device_tasks.authenticate_callback(session, settings, task_id, token)
        hit(request, CALLBACK, f"device:{caller.device.device_id}")
        if kind == "start":
            return device_tasks.on_start_callback(session, caller, body)
        return device_tasks.on_finish_callback(session, caller, body)

    try:
        return run_transaction(engine, work)
    except NotFoundError:
        # Kept for an operator (its own transaction: the request's own is rolled back).
        with session_scope(engine) as session:
            device_tasks.record_orphan_callback(
                session, f"callback_{kind}", task_id, body, client_ip(request)
            )
        log.warning("callback %s for unknown task %r from %s", kind, task_id, client_ip(request))
        raise


async def _receive(
    kind: str, request: Request, settings: Settings, engine: Engine
) -> device_tasks.Advance:
    hit(request, CALLBACK_ADDRESS, f"ip:{client_ip(request)}")
    body = await _read_body(request, settings)
    result: device_tasks.Advance = await run_in_threadpool(
        _handle, kind, request, settings, engine, body
    )
    return result


@router.post(
    "/start",
    response_model=StartAcknowledged,
    summary="Recorder start callback (task token or device token)",
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}, "example": _BODY_EXAMPLE}
            },
        }
    },
    name="callback.start",
)
async def start(
    request: Request, settings: SettingsDep, engine: Annotated[Engine, Depends(get_engine)]
) -> StartAcknowledged:
    result = await _receive("start", request, settings, engine)
    return StartAcknowledged(task_status=result.after, acknowledged_at=clock.now())


@router.post(
    "/finish",
    response_model=FinishAcknowledged,
    summary="Recorder finish callback (task token or device token); idempotent",
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
    name="callback.finish",
)
async def finish(
    request: Request, settings: SettingsDep, engine: Annotated[Engine, Depends(get_engine)]
) -> FinishAcknowledged:
    result = await _receive("finish", request, settings, engine)
    if result.changed:
        message = "Recording finished; waiting for the upload"
    else:
        message = "Recording finish callback already handled"
    return FinishAcknowledged(message=message, task_status=result.after)
