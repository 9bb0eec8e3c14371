"""Robot types with their config templates, robots, and where each robot has stood."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import MISSING, AliasChoices, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import ColumnElement
from sqlmodel import col

from keystone_api.crud import CONFLICT, ERRORS, MAX_OFFSET, NOT_FOUND, add_crud_routes
from keystone_api.deps import CurrentPrincipal, SessionDep
from keystone_api.ratelimits import CONFIG_DOWNLOAD, client_ip, hit
from keystone_api.schemas import IdStr, Page, RowId
from keystone_core.models import Robot, RobotType
from keystone_core.services import devices, robots
from keystone_core.services.crud import MAX_LIMIT

router = APIRouter(prefix="/api/v1", tags=["robots"])

RobotStatus = Literal["active", "maintenance", "retired"]
# Device ids end up in object keys and WebSocket paths (axon-protocol.md §1.2).
DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Topic = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Filename = Annotated[
    str,
    Path(
        pattern=robots.FILENAME_PATTERN,
        max_length=128,
        description="A bare file name of [A-Za-z0-9._-], e.g. `recorder.yaml`.",
    ),
]


# --- robot types ----------------------------------------------------------------------


class RobotTypeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=128)
    manufacturer: str = Field(default="", max_length=128)
    end_effector: str = Field(default="", max_length=100)
    sensor_suite: dict[str, Any] = Field(default_factory=dict)
    ros_topics: list[Topic] = Field(default_factory=list, max_length=256)
    capabilities: dict[str, Any] = Field(default_factory=dict)
    qa_config: dict[str, Any] = Field(default_factory=dict)
    description: str = Field(default="", max_length=1024)


class RobotTypeUpdate(BaseModel):
    """Omitted fields stay as they are; ``null`` is refused (every column is required)."""

    model_config = ConfigDict(extra="forbid")

    name: str | MISSING = Field(default=MISSING, min_length=1, max_length=128)
    model: str | MISSING = Field(default=MISSING, min_length=1, max_length=128)
    manufacturer: str | MISSING = Field(default=MISSING, max_length=128)
    end_effector: str | MISSING = Field(default=MISSING, max_length=100)
    sensor_suite: dict[str, Any] | MISSING = MISSING
    ros_topics: list[Topic] | MISSING = Field(default=MISSING, max_length=256)
    capabilities: dict[str, Any] | MISSING = MISSING
    qa_config: dict[str, Any] | MISSING = MISSING
    description: str | MISSING = Field(default=MISSING, max_length=1024)


class RobotTypePublic(BaseModel):
    id: IdStr
    name: str
    model: str
    manufacturer: str
    end_effector: str
    sensor_suite: dict[str, Any]
    ros_topics: list[str]
    capabilities: dict[str, Any]
    qa_config: dict[str, Any]
    description: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def robot_type_filters(
    model: Annotated[str | None, Query(max_length=128)] = None,
    manufacturer: Annotated[str | None, Query(max_length=128)] = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if model is not None:
        where.append(col(RobotType.model) == model)
    if manufacturer is not None:
        where.append(col(RobotType.manufacturer) == manufacturer)
    return where


add_crud_routes(
    router,
    "/robot_types",
    robots.ROBOT_TYPES,
    public=RobotTypePublic,
    create=RobotTypeCreate,
    update=RobotTypeUpdate,
    filters=robot_type_filters,
)


# --- config templates -----------------------------------------------------------------


class ConfigTemplateSlot(BaseModel):
    filename: str
    exists: bool
    updated_at: datetime | None


class ConfigTemplateList(BaseModel):
    """``recorder.yaml`` and ``transfer.yaml`` always, then any other stored file."""

    templates: list[ConfigTemplateSlot]


class ConfigTemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(
        description=(
            "The file with `{{ placeholders }}` axon-config fills; never secrets. "
            f"At most {robots.MAX_TEMPLATE_BYTES} bytes."
        )
    )


class ConfigTemplatePublic(BaseModel):
    robot_type_id: IdStr
    filename: str
    content: str
    created_at: datetime
    updated_at: datetime


@router.get(
    "/robot_types/{id}/config_templates",
    response_model=ConfigTemplateList,
    summary="List a robot type's config templates",
    responses={**ERRORS, **NOT_FOUND},
    name="robot_config_template.list",
)
def list_config_templates(
    id: int, principal: CurrentPrincipal, session: SessionDep
) -> ConfigTemplateList:
    slots = robots.list_templates(session, id)
    return ConfigTemplateList(
        templates=[ConfigTemplateSlot.model_validate(s, from_attributes=True) for s in slots]
    )


@router.get(
    "/robot_types/{id}/config_templates/{filename}",
    response_model=ConfigTemplatePublic,
    summary="Get one config template (unrendered)",
    responses={**ERRORS, **NOT_FOUND},
    name="robot_config_template.get",
)
def get_config_template(
    id: int, filename: Filename, principal: CurrentPrincipal, session: SessionDep
) -> ConfigTemplatePublic:
    template = robots.get_template(session, id, filename)
    return ConfigTemplatePublic.model_validate(template, from_attributes=True)


@router.put(
    "/robot_types/{id}/config_templates/{filename}",
    response_model=ConfigTemplatePublic,
    summary="Create or replace a config template",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="robot_config_template.put",
)
def put_config_template(
    id: RowId,
    filename: Filename,
    body: ConfigTemplateBody,
    principal: CurrentPrincipal,
    session: SessionDep,
) -> ConfigTemplatePublic:
    template = robots.put_template(session, principal.actor, id, filename, body.content)
    return ConfigTemplatePublic.model_validate(template, from_attributes=True)


@router.delete(
    "/robot_types/{id}/config_templates/{filename}",
    status_code=204,
    response_class=Response,
    summary="Delete a config template",
    responses={**ERRORS, **NOT_FOUND},
    name="robot_config_template.delete",
)
def delete_config_template(
    id: int, filename: Filename, principal: CurrentPrincipal, session: SessionDep
) -> Response:
    robots.delete_template(session, principal.actor, id, filename)
    return Response(status_code=204)


_JSON_ERROR: dict[str, Any] = {
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
}


@router.get(
    "/robot_types/{id}/configs/{filename}",
    response_class=PlainTextResponse,
    summary="Download a config file as axon-config does (no credentials)",
    description=(
        "Without `device_id`: the template as stored; axon-config fills the placeholders "
        "on the device from its registration response. With `device_id`: the identity "
        "placeholders of that robot (device_id, robot_id, factory, factory_id, robot_type, "
        "robot_type_id, robot_model) are filled here; the others are left for the device."
    ),
    # Spelled out: with a text/plain route, FastAPI would file ``model`` errors as text.
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        404: {"description": "no such robot type, template or device", **_JSON_ERROR},
        422: {"description": "invalid filename or device_id", **_JSON_ERROR},
        429: {"description": "too many downloads from this address", **_JSON_ERROR},
    },
    name="robot_config.render",
)
def get_rendered_config(
    id: RowId,
    filename: Filename,
    session: SessionDep,
    request: Request,
    device_id: Annotated[
        str | None,
        Query(pattern=DEVICE_ID, description="Fill this robot's identity placeholders."),
    ] = None,
) -> PlainTextResponse:
    # Open without credentials: limited per address (KEYSTONE_CONFIG_DOWNLOAD_RATE_PER_MINUTE).
    hit(request, CONFIG_DOWNLOAD, f"ip:{client_ip(request)}")
    return PlainTextResponse(robots.rendered_config(session, id, filename, device_id))


# --- robots ---------------------------------------------------------------------------


class RobotCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory_id: int
    robot_type_id: int
    device_id: str = Field(pattern=DEVICE_ID)
    name: str = Field(default="", max_length=128)
    asset_id: str | None = Field(default=None, min_length=1, max_length=100)
    status: RobotStatus = "active"
    metadata: dict[str, Any] = Field(default_factory=dict)


class RobotUpdate(BaseModel):
    """Omitted fields stay; ``asset_id`` null clears it; ``device_id`` cannot change (it is
    in the device's config and its object keys)."""

    model_config = ConfigDict(extra="forbid")

    factory_id: int | MISSING = MISSING
    robot_type_id: int | MISSING = MISSING
    name: str | MISSING = Field(default=MISSING, max_length=128)
    asset_id: str | None = Field(default=None, min_length=1, max_length=100)
    status: RobotStatus | MISSING = MISSING
    metadata: dict[str, Any] | MISSING = MISSING


class RobotPublic(BaseModel):
    id: IdStr
    factory_id: IdStr
    robot_type_id: IdStr
    device_id: str
    name: str
    asset_id: str | None
    status: str
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("meta", "metadata"))
    last_seen_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def robot_filters(
    factory_id: int | None = None,
    robot_type_id: int | None = None,
    status: RobotStatus | None = None,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if factory_id is not None:
        where.append(col(Robot.factory_id) == factory_id)
    if robot_type_id is not None:
        where.append(col(Robot.robot_type_id) == robot_type_id)
    if status is not None:
        where.append(col(Robot.status) == status)
    if device_id is not None:
        where.append(col(Robot.device_id) == device_id)
    return where


add_crud_routes(
    router,
    "/robots",
    robots.ROBOTS,
    public=RobotPublic,
    create=RobotCreate,
    update=RobotUpdate,
    filters=robot_filters,
    # Decommissioning: tokens and object-store key revoked, sockets refused.
    after_delete=devices.decommission,
)


class WorkstationBindingPublic(BaseModel):
    """One stay of a robot at a station; ``unbound_at`` is null while it is still there."""

    id: IdStr
    robot_id: IdStr
    workstation_id: IdStr
    workstation_name: str
    factory_id: IdStr
    bound_at: datetime
    unbound_at: datetime | None
    bound_by_user_id: IdStr | None


@router.get(
    "/robots/{id}/workstation_history",
    response_model=Page[WorkstationBindingPublic],
    summary="Where a robot has stood, newest first",
    responses={**ERRORS, **NOT_FOUND},
    name="robot.workstation_history",
)
def workstation_history(
    id: RowId,
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[WorkstationBindingPublic]:
    limit = min(limit, MAX_LIMIT)
    entries, total = robots.workstation_history(
        session, principal.scope, id, limit=limit, offset=offset
    )
    items = [
        WorkstationBindingPublic(
            id=str(e.binding.id),
            robot_id=str(e.binding.robot_id),
            workstation_id=str(e.binding.workstation_id),
            workstation_name=e.workstation_name,
            factory_id=str(e.factory_id),
            bound_at=e.binding.bound_at,
            unbound_at=e.binding.unbound_at,
            bound_by_user_id=(
                None if e.binding.bound_by_user_id is None else str(e.binding.bound_by_user_id)
            ),
        )
        for e in entries
    ]
    return Page[WorkstationBindingPublic](items=items, total=total, limit=limit, offset=offset)
