"""Robot types, robots, their workstation binding history and device credentials."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Text, UniqueConstraint
from sqlmodel import Field

from keystone_core.models.base import (
    SoftDeleted,
    Timestamped,
    enum_field,
    fk_field,
    id_field,
    metadata_field,
    utc_field,
)
from keystone_core.models.enums import CredentialKind


class RobotType(SoftDeleted, table=True):
    __tablename__ = "robot_types"

    id: int | None = id_field()
    name: str = Field(max_length=128)
    # Devices register with the model name (``robot_type`` in the registration call).
    model: str = Field(max_length=128, unique=True)
    manufacturer: str = Field(default="", max_length=128)
    end_effector: str = Field(default="", max_length=100)
    sensor_suite: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # Topics every episode of this type must contain (QA's required topics).
    ros_topics: list[str] = Field(default_factory=list, sa_type=JSON)
    capabilities: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # QA thresholds of the type (rates, durations, weights).
    qa_config: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    description: str = Field(default="", max_length=1024)


class RobotConfigTemplate(Timestamped, table=True):
    """A config file template of a robot type; ``{{ placeholders }}``, never secrets."""

    __tablename__ = "robot_config_templates"
    __table_args__ = (
        UniqueConstraint("robot_type_id", "filename", name="uq_robot_config_templates_file"),
    )

    id: int | None = id_field()
    robot_type_id: int = fk_field("robot_types.id", ondelete="CASCADE")
    filename: str = Field(max_length=255)
    content: str = Field(default="", sa_type=Text)


class Robot(SoftDeleted, table=True):
    __tablename__ = "robots"

    id: int | None = id_field()
    factory_id: int = fk_field("factories.id")
    robot_type_id: int = fk_field("robot_types.id")
    device_id: str = Field(max_length=64, unique=True)
    name: str = Field(default="", max_length=128)
    asset_id: str | None = Field(default=None, max_length=100)
    status: str = Field(default="active", max_length=32, index=True)  # active|maintenance|retired
    meta: dict[str, Any] = metadata_field()
    last_seen_at: datetime | None = utc_field()
    # Set when the device registered through an enrollment window (axon-config).
    registered_at: datetime | None = utc_field()


class RobotWorkstationBinding(Timestamped, table=True):
    """History of which robot stood at which workstation, and who bound it."""

    __tablename__ = "robot_workstation_bindings"

    id: int | None = id_field()
    robot_id: int = fk_field("robots.id")
    workstation_id: int = fk_field("workstations.id")
    bound_at: datetime = utc_field(nullable=False)
    unbound_at: datetime | None = utc_field()
    bound_by_user_id: int | None = fk_field("users.id", nullable=True)


class DeviceCredential(Timestamped, table=True):
    """A device credential: a token (``kws_v1_…``, only its SHA-256 is stored) or the id of
    the device's own object-store access key (``external_id``; the secret is never kept)."""

    __tablename__ = "device_credentials"

    id: int | None = id_field()
    robot_id: int = fk_field("robots.id")
    kind: CredentialKind = enum_field(CredentialKind, CredentialKind.WS_CLIENT)
    token_hash: str = Field(max_length=64, unique=True)
    token_prefix: str = Field(max_length=16)
    external_id: str | None = Field(default=None, max_length=128)
    last_used_at: datetime | None = utc_field()
    # A rotated token stays valid until ``expires_at`` (the overlap window), then never.
    expires_at: datetime | None = utc_field()
    revoked_at: datetime | None = utc_field(index=True)
