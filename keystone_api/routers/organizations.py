"""Organizations and factories (sites with their time zone and production hours)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, exists, select
from sqlmodel import col

from keystone_api.crud import add_crud_routes
from keystone_api.schemas import IdStr
from keystone_core.models import (
    DataCollector,
    Factory,
    Inspector,
    Order,
    Organization,
    Robot,
    UserFactory,
    Workstation,
)
from keystone_core.services.crud import Family, Guard
from keystone_core.services.scope import Scope

router = APIRouter(prefix="/api/v1", tags=["organizations"])

HHMM = r"^([01]\d|2[0-3]):[0-5]\d$"
SLUG = r"^[a-z0-9][a-z0-9-]{0,63}$"


def _visible_organizations(scope: Scope) -> ColumnElement[bool] | None:
    if scope.factory_ids is None:
        return None
    return exists(
        select(col(Factory.id)).where(
            col(Factory.organization_id) == col(Organization.id),
            col(Factory.id).in_(sorted(scope.factory_ids)),
        )
    )


ORGANIZATIONS = Family(
    model=Organization,
    entity="organization",
    factory_column=None,
    visibility=_visible_organizations,
    unique=(("name",), ("slug",)),
    guards=(Guard(Factory, "organization_id", "factories"),),
)

FACTORIES = Family(
    model=Factory,
    entity="factory",
    factory_column="id",
    unique=(("slug",), ("organization_id", "name")),
    guards=(
        Guard(Workstation, "factory_id", "stations"),
        Guard(Robot, "factory_id", "robots"),
        Guard(DataCollector, "factory_id", "data collectors"),
        Guard(Inspector, "factory_id", "inspectors"),
        Guard(Order, "factory_id", "orders"),
        Guard(UserFactory, "factory_id", "user accounts"),
    ),
)


class OrganizationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    slug: str = Field(pattern=SLUG)
    description: str = Field(default="", max_length=1024)
    settings: dict[str, Any] = Field(default_factory=dict)


class OrganizationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128)
    description: str | None = Field(default=None, max_length=1024)
    settings: dict[str, Any] | None = None


class OrganizationPublic(BaseModel):
    id: IdStr
    name: str
    slug: str
    description: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class _FactoryFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("timezone", check_fields=False)
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("production_days", check_fields=False)
    @classmethod
    def _weekdays(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(d < 1 or d > 7 for d in value):
            raise ValueError("production_days are ISO weekdays 1 (Monday) … 7 (Sunday)")
        return None if value is None else sorted(set(value))


class FactoryCreate(_FactoryFields):
    organization_id: int
    name: str = Field(min_length=1, max_length=128)
    slug: str = Field(pattern=SLUG)
    location: str = Field(default="", max_length=255)
    timezone: str = Field(default="UTC", max_length=64)
    production_start: str = Field(default="08:00", pattern=HHMM)
    production_end: str = Field(default="20:00", pattern=HHMM)
    production_days: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], max_length=7)
    allowed_networks: list[str] = Field(default_factory=list, max_length=64)
    settings: dict[str, Any] = Field(default_factory=dict)


class FactoryUpdate(_FactoryFields):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    location: str | None = Field(default=None, max_length=255)
    timezone: str | None = Field(default=None, max_length=64)
    production_start: str | None = Field(default=None, pattern=HHMM)
    production_end: str | None = Field(default=None, pattern=HHMM)
    production_days: list[int] | None = Field(default=None, max_length=7)
    allowed_networks: list[str] | None = Field(default=None, max_length=64)
    settings: dict[str, Any] | None = None


class FactoryPublic(BaseModel):
    id: IdStr
    organization_id: IdStr
    name: str
    slug: str
    location: str
    timezone: str
    production_start: str
    production_end: str
    production_days: list[int]
    allowed_networks: list[str]
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def factory_filters(organization_id: int | None = None) -> list[ColumnElement[bool]]:
    if organization_id is None:
        return []
    return [col(Factory.organization_id) == organization_id]


add_crud_routes(
    router,
    "/organizations",
    ORGANIZATIONS,
    public=OrganizationPublic,
    create=OrganizationCreate,
    update=OrganizationUpdate,
)
add_crud_routes(
    router,
    "/factories",
    FACTORIES,
    public=FactoryPublic,
    create=FactoryCreate,
    update=FactoryUpdate,
    filters=factory_filters,
)
