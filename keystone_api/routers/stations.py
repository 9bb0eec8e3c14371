"""Stations (workstations): where a robot and a collector record; robot binding history."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import MISSING, AliasChoices, BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement

from keystone_api.crud import CONFLICT, ERRORS, NOT_FOUND, add_crud_routes, equal_to
from keystone_api.deps import CurrentPrincipal, SessionDep
from keystone_api.schemas import IdStr, RowId
from keystone_core.models import Workstation
from keystone_core.services import robots

router = APIRouter(prefix="/api/v1", tags=["stations"])

StationStatus = Literal["active", "inactive", "break", "offline"]
LOOKUP_MAX_IDS = 100


class StationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory_id: int
    name: str = Field(min_length=1, max_length=128)
    status: StationStatus = "active"
    robot_id: int | None = None
    data_collector_id: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class StationUpdate(BaseModel):
    """Omitted fields stay; ``robot_id``/``data_collector_id`` null unbinds them."""

    model_config = ConfigDict(extra="forbid")

    name: str | MISSING = Field(default=MISSING, min_length=1, max_length=128)
    status: StationStatus | MISSING = MISSING
    robot_id: int | None = None
    data_collector_id: int | None = None
    metadata: dict[str, Any] | MISSING = MISSING


class StationPublic(BaseModel):
    id: IdStr
    factory_id: IdStr
    name: str
    status: str
    robot_id: IdStr | None
    data_collector_id: IdStr | None
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("meta", "metadata"))
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class StationLookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workstation_ids: list[int] = Field(max_length=LOOKUP_MAX_IDS)


class StationLookupItem(StationPublic):
    """A station with the names Synapse shows next to it (Go's lookup fields)."""

    robot_name: str | None
    robot_serial: str | None = Field(description="The robot's device_id.")
    collector_name: str | None
    collector_operator_id: str | None
    deleted: bool


class StationLookupResponse(BaseModel):
    items: list[StationLookupItem]


def station_filters(
    factory_id: int | None = None,
    status: StationStatus | None = None,
    robot_id: int | None = None,
    data_collector_id: int | None = None,
) -> list[ColumnElement[bool]]:
    return equal_to(
        Workstation,
        factory_id=factory_id,
        status=status,
        robot_id=robot_id,
        data_collector_id=data_collector_id,
    )


# List and get come from the generic builder; writes are below because a change of robot
# also writes binding history in the same transaction.
add_crud_routes(
    router,
    "/stations",
    robots.STATIONS,
    public=StationPublic,
    create=None,
    update=None,
    filters=station_filters,
    delete=False,
)


@router.post(
    "/stations",
    status_code=201,
    response_model=StationPublic,
    summary="Create a station",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="station.create",
)
def create_station(
    body: StationCreate, principal: CurrentPrincipal, session: SessionDep
) -> StationPublic:
    values = body.model_dump(exclude_unset=True)
    row = robots.create_station(session, principal.scope, principal.actor, values)
    return StationPublic.model_validate(row, from_attributes=True)


@router.put(
    "/stations/{id}",
    response_model=StationPublic,
    summary="Update a station (rebinding its robot records history)",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="station.update",
)
def update_station(
    id: int, body: StationUpdate, principal: CurrentPrincipal, session: SessionDep
) -> StationPublic:
    changes = body.model_dump(exclude_unset=True)
    row = robots.update_station(session, principal.scope, principal.actor, id, changes)
    return StationPublic.model_validate(row, from_attributes=True)


@router.delete(
    "/stations/{id}",
    status_code=204,
    response_class=Response,
    summary="Delete a station (409 while it has open batches or unfinished tasks)",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="station.delete",
)
def delete_station(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    robots.delete_station(session, principal.scope, principal.actor, id)
    return Response(status_code=204)


@router.post(
    "/stations/lookup",
    response_model=StationLookupResponse,
    summary="Resolve station ids (deleted ones too); ids the caller may not see are absent",
    responses=ERRORS,
    name="station.lookup",
)
def lookup_stations(
    body: StationLookupRequest, principal: CurrentPrincipal, session: SessionDep
) -> StationLookupResponse:
    rows = robots.lookup_stations(session, principal.scope, body.workstation_ids)
    items = [
        StationLookupItem(
            **StationPublic.model_validate(station, from_attributes=True).model_dump(),
            robot_name=None if robot is None else robot.name,
            robot_serial=None if robot is None else robot.device_id,
            collector_name=None if collector is None else collector.name,
            collector_operator_id=None if collector is None else collector.operator_id,
            deleted=station.deleted_at is not None,
        )
        for station, robot, collector in rows
    ]
    return StationLookupResponse(items=items)
