"""Device onboarding: enrollment windows, ``POST /devices/register`` and token rotation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine

from keystone_api.crud import CONFLICT, ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep, SettingsDep, get_engine
from keystone_api.errors import ErrorBody
from keystone_api.ratelimits import REGISTRATION, REGISTRATION_FACTORY, client_ip, hit
from keystone_api.schemas import IdStr, Page, RowId
from keystone_core.db import session_scope
from keystone_core.models import EnrollmentWindow
from keystone_core.services import devices
from keystone_core.services.crud import MAX_LIMIT

router = APIRouter(prefix="/api/v1", tags=["devices"])


# --- enrollment windows ---------------------------------------------------------------


class EnrollmentWindowCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory_id: int = Field(ge=1)
    duration_minutes: int = Field(
        ge=1,
        description="The window closes itself after this long (KEYSTONE_ENROLLMENT_MAX_MINUTES).",
    )
    robot_type_id: int | None = Field(default=None, ge=1, description="Admit only this type.")
    allowed_networks: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list,
        max_length=64,
        description="Source networks (CIDR) registrations may come from; empty = any.",
    )
    max_registrations: int | None = Field(default=None, ge=1, le=100_000)
    robot_ids: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        max_length=10_000,
        description=(
            "Pre-provisioned robots: each registration claims the next of these (oldest "
            "first) instead of creating a robot."
        ),
    )
    note: str = Field(default="", max_length=1024)


class EnrollmentWindowPublic(BaseModel):
    id: IdStr
    factory_id: IdStr
    robot_type_id: IdStr | None
    opened_by_user_id: IdStr | None
    expires_at: datetime
    closed_at: datetime | None
    is_open: bool
    allowed_networks: list[str]
    max_registrations: int | None
    registered_count: int
    robot_ids: list[IdStr]
    note: str
    created_at: datetime


def _window(window: EnrollmentWindow) -> EnrollmentWindowPublic:
    return EnrollmentWindowPublic(
        id=str(window.id),
        factory_id=str(window.factory_id),
        robot_type_id=None if window.robot_type_id is None else str(window.robot_type_id),
        opened_by_user_id=(
            None if window.opened_by_user_id is None else str(window.opened_by_user_id)
        ),
        expires_at=window.expires_at,
        closed_at=window.closed_at,
        is_open=devices.window_is_open(window),
        allowed_networks=list(window.allowed_networks),
        max_registrations=window.max_registrations,
        registered_count=window.registered_count,
        robot_ids=[str(i) for i in window.robot_ids],
        note=window.note,
        created_at=window.created_at,
    )


@router.post(
    "/enrollment_windows",
    status_code=201,
    response_model=EnrollmentWindowPublic,
    summary="Open a registration window for a factory",
    responses={**ERRORS, **NOT_FOUND},
    name="enrollment_window.open",
)
def open_window(
    body: EnrollmentWindowCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> EnrollmentWindowPublic:
    window = devices.open_window(
        session,
        settings,
        principal.scope,
        principal.actor,
        factory_id=body.factory_id,
        duration_minutes=body.duration_minutes,
        robot_type_id=body.robot_type_id,
        allowed_networks=body.allowed_networks,
        max_registrations=body.max_registrations,
        robot_ids=body.robot_ids,
        note=body.note,
    )
    return _window(window)


@router.get(
    "/enrollment_windows",
    response_model=Page[EnrollmentWindowPublic],
    summary="List enrollment windows, newest first",
    responses=ERRORS,
    name="enrollment_window.list",
)
def list_windows(
    principal: CurrentPrincipal,
    session: SessionDep,
    factory_id: Annotated[int | None, Query(ge=1)] = None,
    open_only: Annotated[bool, Query(description="Only windows that are open now.")] = False,
    limit: Annotated[int, Query(ge=1, description="Values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[EnrollmentWindowPublic]:
    limit = min(limit, MAX_LIMIT)
    rows, total = devices.list_windows(
        session,
        principal.scope,
        factory_id=factory_id,
        open_only=open_only,
        limit=limit,
        offset=offset,
    )
    return Page[EnrollmentWindowPublic](
        items=[_window(w) for w in rows], total=total, limit=limit, offset=offset
    )


@router.get(
    "/enrollment_windows/{id}",
    response_model=EnrollmentWindowPublic,
    summary="Get one enrollment window",
    responses={**ERRORS, **NOT_FOUND},
    name="enrollment_window.get",
)
def get_window(
    id: RowId, principal: CurrentPrincipal, session: SessionDep
) -> EnrollmentWindowPublic:
    return _window(devices.get_window(session, principal.scope, id))


@router.post(
    "/enrollment_windows/{id}/close",
    response_model=EnrollmentWindowPublic,
    summary="Close an enrollment window now",
    responses={**ERRORS, **NOT_FOUND},
    name="enrollment_window.close",
)
def close_window(
    id: RowId, principal: CurrentPrincipal, session: SessionDep
) -> EnrollmentWindowPublic:
    return _window(devices.close_window(session, principal.scope, principal.actor, id))


# --- registration ---------------------------------------------------------------------


class RegistrationRequest(BaseModel):
    """What ``axon-config register`` sends (no credentials)."""

    factory: str = Field(min_length=1, max_length=128, description="The factory's name (or slug).")
    robot_type: str = Field(min_length=1, max_length=128, description="The robot type's model.")


class CallbackAllowlist(BaseModel):
    allowed_host: str
    allowed_path_prefix: str


class Endpoints(BaseModel):
    keystone_ws_url: str
    recorder_rpc_url: str
    transfer_ws_url: str


class ObjectStoreAccess(BaseModel):
    endpoint_url: str
    bucket: str
    region: str
    prefix: str = Field(description="The only key prefix the device writes under.")
    access_key: str
    secret_key: str = Field(description="Shown once.")
    credentials: str = Field(
        description="`scoped` (a key limited to `prefix`), `shared` (not prefix-limited) or `none`."
    )


class RegistrationResponse(BaseModel):
    device_id: str
    factory: str
    factory_id: IdStr
    robot_type: str
    robot_type_id: IdStr
    robot_id: IdStr
    ws_client_auth_token: str = Field(description="`kws_v1_…`, shown once; stored hashed.")
    callback_allowlist: CallbackAllowlist
    endpoints: Endpoints
    s3: ObjectStoreAccess


@router.post(
    "/devices/register",
    status_code=201,
    response_model=RegistrationResponse,
    summary="Register a device (axon-config; no credentials, enrollment window only)",
    description=(
        "Accepted only while an admin-opened enrollment window of the factory admits the "
        "caller (time, source network, robot type, count, pre-provisioned robots). "
        "Rate-limited per client IP and factory; every registration is audited."
    ),
    responses={
        **ERRORS,
        **NOT_FOUND,
        **CONFLICT,
        429: {"model": ErrorBody, "description": "too many registrations"},
        503: {"model": ErrorBody, "description": "the object store issued no device key"},
    },
    name="device.register",
)
def register(
    body: RegistrationRequest,
    request: Request,
    settings: SettingsDep,
    engine: Annotated[Engine, Depends(get_engine)],
) -> dict[str, Any]:
    ip = client_ip(request)
    # Per address first: a refused request does not count against the factory.
    hit(request, REGISTRATION, f"ip:{ip}")
    hit(request, REGISTRATION_FACTORY, f"factory:{body.factory.strip().lower()}")
    links = devices.endpoints(settings, str(request.base_url))
    issued_key_for: str | None = None
    try:
        with session_scope(engine) as session:
            registration = devices.register_device(
                session,
                factory_name=body.factory,
                robot_type_model=body.robot_type,
                client_ip=ip,
                request_id=getattr(request.state, "request_id", None),
            )
            devices.grant_object_store(session, settings, registration)
            if registration.grant is not None and registration.grant.mode == "scoped":
                issued_key_for = registration.robot.device_id
            values = devices.registration_values(registration, links)
    except Exception:
        if issued_key_for is not None:  # nothing may be left half-made
            devices.revoke_object_store_key(settings, issued_key_for)
        raise
    return values


# --- token rotation -------------------------------------------------------------------


class TokenRotated(BaseModel):
    device_id: str
    robot_id: IdStr
    ws_client_auth_token: str = Field(description="The new token, shown once.")
    rotated_at: datetime
    previous_valid_until: datetime | None = Field(
        description=(
            "The earlier tokens keep working until then (KEYSTONE_DEVICE_TOKEN_OVERLAP_HOURS)."
        )
    )


@router.post(
    "/robots/{id}/ws-client-auth-token/rotate",
    response_model=TokenRotated,
    summary="Issue a new device token; the old one works through the overlap window",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="robot.rotate_ws_client_auth_token",
)
def rotate_token(
    id: RowId, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> TokenRotated:
    rotation = devices.rotate_token(session, settings, principal.scope, principal.actor, id)
    return TokenRotated(
        device_id=rotation.robot.device_id,
        robot_id=str(rotation.robot.id),
        ws_client_auth_token=rotation.token,
        rotated_at=rotation.rotated_at,
        previous_valid_until=rotation.previous_valid_until,
    )
