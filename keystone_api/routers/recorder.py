"""The REST → RPC façade to recorders, their presence, and the device-state SSE stream.

``POST /recorder/{device_id}/{action}`` sends one RPC to the device's socket (held by any
API worker) and answers with the recorder's reply (200 even when the recorder says
``success: false``; its message and data are in the body). Gates answer 409 with a code:
``recorder_not_connected``, ``transfer_not_connected``, ``recorder_busy``,
``task_not_configurable``, ``task_not_beginable``, ``recorder_not_recording``; no reply
in time is 504 ``recorder_timeout`` (the outcome is unknown until the next state update).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from keystone_api.crud import CONFLICT, ERRORS, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, Principal, SettingsDep
from keystone_api.errors import ErrorBody
from keystone_api.ws.recorder import RecorderHub
from keystone_core import clock
from keystone_core.errors import ConflictError, NotFoundError
from keystone_core.models import DeviceConnection, Robot, Role, Task, TaskStatus
from keystone_core.services import device_tasks, devices, presence
from keystone_core.services.devices import DeviceIdentity
from keystone_core.settings import Settings

router = APIRouter(prefix="/api/v1", tags=["recorder"])

_FACADE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **NOT_FOUND,
    **CONFLICT,
    504: {"model": ErrorBody, "description": "the recorder did not answer in time"},
}


def _hub(request: Request) -> RecorderHub:
    hub: RecorderHub = request.app.state.recorder_hub
    return hub


# --- models ---------------------------------------------------------------------------


class RecorderState(BaseModel):
    device_id: str
    connected: bool
    current_state: str = Field(description="idle|ready|recording|paused, or unknown.")
    task_id: str | None
    paused_by_device: bool = Field(
        description="The recorder paused itself (disk or task-size guard): out of budget."
    )
    updated_at: datetime | None
    connected_at: datetime | None
    last_seen_at: datetime | None
    remote_ip: str | None
    replaced_count: int


class RecorderDevices(BaseModel):
    devices: list[RecorderState]


class RecorderReply(BaseModel):
    """The recorder's ``rpc_response`` and what Keystone made of it."""

    type: str = "rpc_response"
    request_id: str
    success: bool
    message: str
    data: dict[str, Any] | None = None
    task_id: str | None = None
    task_status: TaskStatus | None = None


class RecorderStats(BaseModel):
    connected: bool
    data: dict[str, Any]


class TaskRef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    task_id: str | None = Field(default=None, max_length=128)


class ConfigRequest(BaseModel):
    """Which task to send. Without one, the next pending task of the device's station.

    ``task_config`` is accepted for compatibility; only its ``task_id`` is used — the
    config itself is always built by Keystone from its own records."""

    model_config = ConfigDict(extra="ignore")

    task_id: str | None = Field(default=None, max_length=128)
    task_config: TaskRef | None = None


def _state(row: DeviceConnection | None, device_id: str, settings: Settings) -> RecorderState:
    if row is None:
        return RecorderState(
            device_id=device_id,
            connected=False,
            current_state="unknown",
            task_id=None,
            paused_by_device=False,
            updated_at=None,
            connected_at=None,
            last_seen_at=None,
            remote_ip=None,
            replaced_count=0,
        )
    connected = presence.is_live(row, settings.device_heartbeat_s)
    return RecorderState(
        device_id=row.device_id,
        connected=connected,
        current_state=(row.state or "unknown") if connected else "unknown",
        task_id=row.task_id,
        paused_by_device=row.paused_by_device,
        updated_at=row.state_at,
        connected_at=row.connected_at,
        last_seen_at=row.last_seen_at,
        remote_ip=row.remote_addr or None,
        replaced_count=row.replaced_count,
    )


# --- reading ----------------------------------------------------------------------------


@router.get(
    "/recorder/devices",
    response_model=RecorderDevices,
    summary="Recorders known to Keystone and their last reported state",
    responses=ERRORS,
    name="recorder.devices",
)
async def list_devices(
    request: Request, principal: CurrentPrincipal, settings: SettingsDep
) -> RecorderDevices:
    scope = principal.scope

    def work(session: Session) -> list[RecorderState]:
        rows = presence.list_connections(session, presence.RECORDER, scope.factory_ids)
        if scope.role is Role.DATA_COLLECTOR:  # only the robot at the collector's station
            rows = [row for row in rows if devices.may_see(session, scope, row.device_id)]
        return [_state(row, row.device_id, settings) for row in rows]

    return RecorderDevices(devices=await _hub(request).db(work))


@router.get(
    "/recorder/{device_id}/state",
    response_model=RecorderState,
    summary="A recorder's last reported state (refresh=true asks the device)",
    responses=_FACADE_ERRORS,
    name="recorder.state",
)
async def get_state(
    device_id: str,
    request: Request,
    principal: CurrentPrincipal,
    settings: SettingsDep,
    refresh: Annotated[bool, Query(description="Ask the recorder (get_state) first.")] = False,
) -> RecorderState:
    hub = _hub(request)
    device = await hub.db(lambda s: _device(s, principal, device_id))
    if refresh:
        await hub.call(device, "get_state", None, task_id=None, requested_by=principal.user.account)
    row = await hub.db(lambda s: presence.current_connection(s, device.robot_id, presence.RECORDER))
    return _state(row, device.device_id, settings)


@router.get(
    "/recorder/{device_id}/stats",
    response_model=RecorderStats,
    summary="The recorder's get_stats (queues, disk usage, clock gap, last recording)",
    responses=_FACADE_ERRORS,
    name="recorder.stats",
)
async def get_stats(device_id: str, request: Request, principal: CurrentPrincipal) -> RecorderStats:
    hub = _hub(request)
    device = await hub.db(lambda s: _device(s, principal, device_id))
    reply = await hub.call(
        device, "get_stats", None, task_id=None, requested_by=principal.user.account
    )
    data = reply.get("data")
    return RecorderStats(connected=True, data=data if isinstance(data, dict) else {})


def _device(session: Session, principal: Principal, device_id: str) -> DeviceIdentity:
    return devices.identity_of(devices.visible_device(session, principal.scope, device_id))


# --- commands -------------------------------------------------------------------------


def _connection(session: Session, device: DeviceIdentity, settings: Settings) -> DeviceConnection:
    row = presence.current_connection(session, device.robot_id, presence.RECORDER)
    if row is None or not presence.is_live(row, settings.device_heartbeat_s):
        raise ConflictError(
            f"recorder {device.device_id} is not connected", code="recorder_not_connected"
        )
    return row


def _prepare_config(
    session: Session,
    settings: Settings,
    principal: Principal,
    device: DeviceIdentity,
    task_id: str | None,
    base_url: str,
) -> tuple[dict[str, Any], str]:
    if settings.recorder_require_transfer:
        transfer = presence.current_connection(session, device.robot_id, presence.TRANSFER)
        if transfer is None or not presence.is_live(transfer, settings.device_heartbeat_s):
            raise ConflictError(
                f"the transfer program of {device.device_id} is not connected; config is "
                "refused (nothing recorded now could be uploaded)",
                code="transfer_not_connected",
            )
    row = _connection(session, device, settings)
    if row.state in ("recording", "paused"):
        raise ConflictError(
            f"recorder {device.device_id} is {row.state}; finish or cancel first",
            code="recorder_busy",
            current_state=row.state,
            task_id=row.task_id,
        )
    robot = session.get(Robot, device.robot_id)
    assert robot is not None
    if task_id:
        task = session.exec(
            select(Task).where(col(Task.task_id) == task_id, col(Task.deleted_at).is_(None))
        ).first()
        if task is None or not principal.scope.can_see(task.factory_id):
            raise NotFoundError(f"task {task_id} not found", code="task_not_found")
    else:
        task = device_tasks.next_station_task(session, robot)
    device_tasks.check_configurable(session, task, robot)
    device_tasks.assign_task(session, task, robot)
    links = devices.endpoints(settings, base_url)
    return device_tasks.task_config(session, settings, task, links, robot=robot), task.task_id


def _begin_target(
    session: Session, settings: Settings, device: DeviceIdentity, task_id: str | None
) -> str:
    row = _connection(session, device, settings)
    wanted = task_id or row.task_id
    task = device_tasks.device_task(session, device, wanted) if wanted else None
    if task is None or task.status is not TaskStatus.READY:
        raise ConflictError(
            "the task is not configured on this recorder; send config first",
            code="task_not_beginable",
            current_status=task.status.value if task else "not_found",
            recorder_state=row.state,
            recorder_task_id=row.task_id,
        )
    if row.state != "ready" or row.task_id != task.task_id:
        raise ConflictError(
            "the recorder is not ready for this task; send config again",
            code="task_not_beginable",
            current_status=task.status.value,
            recorder_state=row.state,
            recorder_task_id=row.task_id,
        )
    return task.task_id


def _active_target(
    session: Session, settings: Settings, device: DeviceIdentity, task_id: str | None
) -> str | None:
    row = _connection(session, device, settings)
    if row.state not in ("recording", "paused"):
        raise ConflictError(
            f"recorder {device.device_id} is {row.state or 'unknown'}, not recording",
            code="recorder_not_recording",
            current_state=row.state,
        )
    return task_id or row.task_id


async def _run(
    request: Request,
    principal: Principal,
    device_id: str,
    action: str,
    plan: Callable[[Session, DeviceIdentity], tuple[dict[str, Any] | None, str | None]],
) -> RecorderReply:
    hub = _hub(request)

    def prepare(session: Session) -> tuple[DeviceIdentity, dict[str, Any] | None, str | None]:
        device = _device(session, principal, device_id)
        params, task_id = plan(session, device)
        return device, params, task_id

    device, params, task_id = await hub.db(prepare)
    reply = await hub.call(
        device, action, params, task_id=task_id, requested_by=principal.user.account
    )
    status = None
    if task_id:
        status = await hub.db(
            lambda s: s.exec(select(Task.status).where(col(Task.task_id) == task_id)).first()
        )
    data = reply.get("data")
    return RecorderReply(
        request_id=str(reply.get("request_id", "")),
        success=reply.get("success") is True,
        message=str(reply.get("message", "")),
        data=data if isinstance(data, dict) else None,
        task_id=task_id,
        task_status=status,
    )


@router.post(
    "/recorder/{device_id}/config",
    response_model=RecorderReply,
    summary="Send a task's config to the recorder (the station's next task by default)",
    responses=_FACADE_ERRORS,
    name="recorder.config",
)
async def config(
    device_id: str,
    request: Request,
    principal: CurrentPrincipal,
    settings: SettingsDep,
    body: ConfigRequest | None = None,
) -> RecorderReply:
    wanted = None
    if body is not None:
        wanted = body.task_id or (body.task_config.task_id if body.task_config else None)
    base = str(request.base_url)

    def plan(session: Session, device: DeviceIdentity) -> tuple[dict[str, Any], str]:
        task_config, task_id = _prepare_config(session, settings, principal, device, wanted, base)
        return {"task_config": task_config}, task_id

    return await _run(request, principal, device_id, "config", plan)


TargetFn = Callable[[Session, Settings, DeviceIdentity, str | None], str | None]


def _with_task(action: str, summary: str, target: TargetFn) -> None:
    """``begin``/``finish``: params ``{task_id}``, the body's or the recorder's cached one."""

    async def handler(
        device_id: str,
        request: Request,
        principal: CurrentPrincipal,
        settings: SettingsDep,
        body: TaskRef | None = None,
    ) -> RecorderReply:
        def plan(session: Session, device: DeviceIdentity) -> tuple[dict[str, Any], str | None]:
            task_id = target(session, settings, device, body.task_id if body else None)
            return ({"task_id": task_id} if task_id else {}), task_id

        return await _run(request, principal, device_id, action, plan)

    router.add_api_route(
        f"/recorder/{{device_id}}/{action}",
        handler,
        methods=["POST"],
        response_model=RecorderReply,
        summary=summary,
        responses=_FACADE_ERRORS,
        name=f"recorder.{action}",
    )


_with_task("begin", "Start recording the configured task", _begin_target)
_with_task(
    "finish",
    "Finish the recording (the reply waits for the device to hash the file)",
    _active_target,
)


def _simple(action: str, summary: str, *, needs_recording: bool) -> None:
    async def handler(
        device_id: str, request: Request, principal: CurrentPrincipal, settings: SettingsDep
    ) -> RecorderReply:
        def plan(session: Session, device: DeviceIdentity) -> tuple[None, str | None]:
            if needs_recording:
                return None, _active_target(session, settings, device, None)
            row = _connection(session, device, settings)
            return None, row.task_id

        return await _run(request, principal, device_id, action, plan)

    router.add_api_route(
        f"/recorder/{{device_id}}/{action}",
        handler,
        methods=["POST"],
        response_model=RecorderReply,
        summary=summary,
        responses=_FACADE_ERRORS,
        name=f"recorder.{action}",
    )


_simple("pause", "Pause the recording (messages are dropped while paused)", needs_recording=True)
_simple("resume", "Resume a paused recording", needs_recording=True)
_simple(
    "cancel",
    "Cancel the recording: the device deletes it; the task is cancelled",
    needs_recording=True,
)
_simple(
    "clear",
    "Drop the configured task from the recorder (task back to pending)",
    needs_recording=False,
)
_simple(
    "quit",
    "Stop the recorder process (a recording is finalised; no callback)",
    needs_recording=False,
)


# --- the device-state stream ------------------------------------------------------------


KEEPALIVE_S = 15.0
POLL_S = 0.5


def _event_frame(event: Any) -> str:
    payload = {
        "device_id": event.device_id,
        "task_id": event.task_id,
        **(event.data or {}),
        "updated_at": event.created_at.isoformat(),
    }
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(payload, default=str)}\n\n"


@router.get(
    "/device-state/stream",
    response_class=StreamingResponse,
    summary="Server-sent events of device connections, recorder states and callbacks",
    description=(
        "Events: `device_connection`, `recorder_state`, `config_applied`, "
        "`recorder_rpc_failed`, `callback_start`, `callback_finish` and their `_orphan` "
        "forms. Each has an `id`; reconnect with `Last-Event-ID` to resume. A comment "
        "line every 15 s keeps proxies from closing the stream."
    ),
    responses={**ERRORS, 200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    name="device_state.stream",
)
async def stream(
    request: Request,
    principal: CurrentPrincipal,
    device_id: Annotated[list[str] | None, Query(max_length=100)] = None,
    device_ids: Annotated[
        str | None, Query(max_length=4096, description="Comma-separated.")
    ] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    hub = _hub(request)
    wanted = set(device_id or [])
    if device_ids:
        wanted |= {d.strip() for d in device_ids.split(",") if d.strip()}
    factories = principal.scope.factory_ids
    if last_event_id and last_event_id.isdigit():
        cursor = int(last_event_id)
    else:
        cursor = await hub.db(presence.latest_event_id)

    async def events() -> AsyncIterator[str]:
        nonlocal cursor
        yield ": connected\n\n"
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            batch = await hub.db(
                functools.partial(
                    presence.events_since,
                    cursor=cursor,
                    factory_ids=factories,
                    device_ids=frozenset(wanted) or None,
                )
            )
            for event in batch:
                cursor = max(cursor, int(event.id or 0))
                yield _event_frame(event)
            if batch:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield f": keepalive {clock.now().isoformat()}\n\n"
            await asyncio.sleep(POLL_S)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
