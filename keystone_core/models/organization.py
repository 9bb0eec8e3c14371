"""Organizations, factories and their workstations."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, UniqueConstraint
from sqlmodel import Field

from keystone_core.models.base import SoftDeleted, fk_field, id_field, metadata_field


class Organization(SoftDeleted, table=True):
    __tablename__ = "organizations"

    id: int | None = id_field()
    name: str = Field(max_length=128, unique=True)
    slug: str = Field(max_length=64, unique=True)
    description: str = Field(default="", max_length=1024)
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class Factory(SoftDeleted, table=True):
    """A site with its own edge bucket; time zone and production hours drive alerts."""

    __tablename__ = "factories"

    id: int | None = id_field()
    organization_id: int = fk_field("organizations.id")
    name: str = Field(max_length=128)
    slug: str = Field(max_length=64, unique=True)
    location: str = Field(default="", max_length=255)
    timezone: str = Field(default="UTC", max_length=64)
    # Local wall-clock hours "HH:MM"; production_days is ISO weekdays (1 = Monday).
    production_start: str = Field(default="08:00", max_length=5)
    production_end: str = Field(default="20:00", max_length=5)
    production_days: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], sa_type=JSON)
    allowed_networks: list[str] = Field(default_factory=list, sa_type=JSON)
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class Workstation(SoftDeleted, table=True):
    """A recording station ("station" in the API): where a robot and an operator work."""

    __tablename__ = "workstations"
    __table_args__ = (UniqueConstraint("factory_id", "name", name="uq_workstations_factory_name"),)

    id: int | None = id_field()
    factory_id: int = fk_field("factories.id")
    name: str = Field(max_length=128)
    status: str = Field(
        default="active", max_length=32, index=True
    )  # active|inactive|break|offline
    robot_id: int | None = fk_field("robots.id", nullable=True)
    data_collector_id: int | None = fk_field("data_collectors.id", nullable=True)
    meta: dict[str, Any] = metadata_field()
