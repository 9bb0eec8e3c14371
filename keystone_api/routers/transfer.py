"""REST to the transfer program: ask for uploads, a status, and see every device's status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from keystone_api.crud import CONFLICT, ERRORS, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, Principal, SettingsDep
from keystone_api.errors import ErrorBody
from keystone_api.ws.transfer import TransferHub
from keystone_core.errors import ConflictError
from keystone_core.models import DeviceConnection, Role, TransferStatus
from keystone_core.services import devices, presence
from keystone_core.services.devices import DeviceIdentity
from keystone_core.settings import Settings

router = APIRouter(prefix="/api/v1/transfer", tags=["transfer"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    **NOT_FOUND,
    **CONFLICT,
    504: {"model": ErrorBody, "description": "the worker holding the socket did not send in time"},
}


def _hub(request: Request) -> TransferHub:
    hub: TransferHub = request.app.state.transfer_hub
    return hub


class TransferDeviceStatus(BaseModel):
    version: str
    counts: dict[str, Any]
    waiting_ack_task_ids: list[str]
    failed_task_ids: list[str] = Field(
        description="Uploads the device gave up on: files in its failed_uploads_dir, need ops."
    )
    pending_bytes: int
    bytes_per_sec: int
    reported_at: datetime


class TransferDevice(BaseModel):
    device_id: str
    connected: bool
    remote_ip: str | None
    connected_at: datetime | None
    last_seen_at: datetime | None
    status: TransferDeviceStatus | None


class TransferDevices(BaseModel):
    devices: list[TransferDevice]


class Sent(BaseModel):
    status: str = "sent"


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    priority: int = Field(default=1, ge=0, le=1000, description="Ignored by the device.")


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _device(session: Session, principal: Principal, device_id: str) -> DeviceIdentity:
    return devices.identity_of(devices.visible_device(session, principal.scope, device_id))


def _require_connected(session: Session, device: DeviceIdentity, settings: Settings) -> None:
    row = presence.current_connection(session, device.robot_id, presence.TRANSFER)
    if row is None or not presence.is_live(row, settings.device_heartbeat_s):
        raise ConflictError(
            f"the transfer program of {device.device_id} is not connected",
            code="transfer_not_connected",
        )


async def _send(
    request: Request,
    principal: Principal,
    settings: Settings,
    device_id: str,
    action: str,
    params: dict[str, Any] | None,
) -> Sent:
    hub = _hub(request)

    def prepare(session: Session) -> DeviceIdentity:
        device = _device(session, principal, device_id)
        _require_connected(session, device, settings)
        return device

    device = await hub.db(prepare)
    task_id = params.get("task_id") if params else None
    await hub.call(device, action, params, task_id=task_id, requested_by=principal.user.account)
    return Sent()


@router.get(
    "/devices",
    response_model=TransferDevices,
    summary="Transfer programs: connection and last reported status",
    responses=ERRORS,
    name="transfer.devices",
)
async def list_devices(
    request: Request, principal: CurrentPrincipal, settings: SettingsDep
) -> TransferDevices:
    scope = principal.scope

    def work(session: Session) -> list[TransferDevice]:
        rows: list[DeviceConnection] = presence.list_connections(
            session, presence.TRANSFER, scope.factory_ids
        )
        if scope.role is Role.DATA_COLLECTOR:
            rows = [r for r in rows if devices.may_see(session, scope, r.device_id)]
        statuses = {
            s.robot_id: s
            for s in session.exec(
                select(TransferStatus).where(
                    col(TransferStatus.robot_id).in_([r.robot_id for r in rows])
                )
            ).all()
        }
        out = []
        for row in rows:
            status = statuses.get(row.robot_id)
            out.append(
                TransferDevice(
                    device_id=row.device_id,
                    connected=presence.is_live(row, settings.device_heartbeat_s),
                    remote_ip=row.remote_addr or None,
                    connected_at=row.connected_at,
                    last_seen_at=row.last_seen_at,
                    status=None
                    if status is None
                    else TransferDeviceStatus.model_validate(status, from_attributes=True),
                )
            )
        return out

    return TransferDevices(devices=await _hub(request).db(work))


@router.post(
    "/{device_id}/upload_request",
    response_model=Sent,
    summary="Ask the device to upload one task's recording",
    responses=_ERRORS,
    name="transfer.upload_request",
)
async def upload_request(
    device_id: str,
    body: UploadRequest,
    request: Request,
    principal: CurrentPrincipal,
    settings: SettingsDep,
) -> Sent:
    params = {"task_id": body.task_id, "priority": body.priority}
    return await _send(request, principal, settings, device_id, "upload_request", params)


@router.post(
    "/{device_id}/upload_all",
    response_model=Sent,
    summary="Ask the device to upload every finished recording it has",
    responses=_ERRORS,
    name="transfer.upload_all",
)
async def upload_all(
    device_id: str, request: Request, principal: CurrentPrincipal, settings: SettingsDep
) -> Sent:
    return await _send(request, principal, settings, device_id, "upload_all", None)


@router.post(
    "/{device_id}/status_query",
    response_model=Sent,
    summary="Ask the device for its full status (answered on the socket, stored)",
    responses=_ERRORS,
    name="transfer.status_query",
)
async def status_query(
    device_id: str, request: Request, principal: CurrentPrincipal, settings: SettingsDep
) -> Sent:
    return await _send(request, principal, settings, device_id, "status_query", None)


@router.post(
    "/{device_id}/cancel",
    response_model=Sent,
    summary="Send cancel for a task (the current transfer program ignores it)",
    responses=_ERRORS,
    name="transfer.cancel",
)
async def cancel(
    device_id: str,
    body: CancelRequest,
    request: Request,
    principal: CurrentPrincipal,
    settings: SettingsDep,
) -> Sent:
    params = {"task_id": body.task_id}
    return await _send(request, principal, settings, device_id, "cancel", params)
