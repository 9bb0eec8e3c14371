"""Accounts with roles, their factory scope, data collectors (operators) and inspectors."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import UniqueConstraint
from sqlmodel import Field

from keystone_core.models.base import (
    IdType,
    SoftDeleted,
    Timestamped,
    enum_field,
    fk_field,
    id_field,
    metadata_field,
    utc_field,
)
from keystone_core.models.enums import Role


class DataCollector(SoftDeleted, table=True):
    """An operator who records episodes."""

    __tablename__ = "data_collectors"
    __table_args__ = (
        UniqueConstraint("factory_id", "operator_id", name="uq_data_collectors_operator"),
    )

    id: int | None = id_field()
    factory_id: int = fk_field("factories.id")
    name: str = Field(max_length=128)
    operator_id: str = Field(max_length=100)
    email: str = Field(default="", max_length=255)
    certification: str = Field(default="", max_length=100)
    status: str = Field(default="active", max_length=32, index=True)  # active|inactive|on_leave
    meta: dict[str, Any] = metadata_field()


class Inspector(SoftDeleted, table=True):
    """A person who reviews episodes QA could not decide."""

    __tablename__ = "inspectors"
    __table_args__ = (
        UniqueConstraint("factory_id", "inspector_id", name="uq_inspectors_inspector_id"),
    )

    id: int | None = id_field()
    factory_id: int = fk_field("factories.id")
    name: str = Field(max_length=128)
    inspector_id: str = Field(max_length=100)
    email: str = Field(default="", max_length=255)
    certification_level: str = Field(default="level_1", max_length=32)  # level_1|level_2|senior
    status: str = Field(default="active", max_length=32, index=True)
    meta: dict[str, Any] = metadata_field()


class User(SoftDeleted, table=True):
    """A login account. A collector/inspector account links to its person row."""

    __tablename__ = "users"

    id: int | None = id_field()
    account: str = Field(max_length=64, unique=True)
    password_hash: str = Field(max_length=255)
    role: Role = enum_field(Role, index=True)
    display_name: str = Field(default="", max_length=128)
    is_active: bool = Field(default=True)
    data_collector_id: int | None = fk_field("data_collectors.id", nullable=True)
    inspector_id: int | None = fk_field("inspectors.id", nullable=True)
    last_login_at: datetime | None = utc_field()


class UserFactory(Timestamped, table=True):
    """The factories an account may see; none means all, which only admins may have."""

    __tablename__ = "user_factories"

    user_id: int = Field(
        foreign_key="users.id", primary_key=True, ondelete="CASCADE", sa_type=IdType
    )
    factory_id: int = Field(
        foreign_key="factories.id", primary_key=True, ondelete="CASCADE", sa_type=IdType
    )
