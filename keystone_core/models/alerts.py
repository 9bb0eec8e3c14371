"""Keystone alerts (raised and cleared by the alert rules) and component heartbeats."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Index
from sqlmodel import Field

from keystone_core.models.base import (
    Timestamped,
    double_field,
    enum_field,
    fk_field,
    id_field,
    utc_field,
)
from keystone_core.models.enums import AlertSeverity, AlertState


class Alert(Timestamped, table=True):
    """One firing of one rule for one factory (or the whole site), kept after it clears."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_state_started", "state", "started_at"),)

    id: int | None = id_field()
    rule: str = Field(max_length=64, index=True)
    severity: AlertSeverity = enum_field(AlertSeverity)
    state: AlertState = enum_field(AlertState, AlertState.FIRING)
    factory_id: int | None = fk_field("factories.id", nullable=True)
    # "{rule}:{factory_id or '-'}" while firing, NULL once resolved: a unique index on it
    # allows one open alert per rule and factory (MariaDB has no partial unique indexes).
    open_key: str | None = Field(default=None, max_length=96, unique=True)
    summary: str = Field(default="", max_length=512)
    value: float | None = double_field()
    threshold: float | None = double_field()
    labels: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    started_at: dt.datetime = utc_field(nullable=False)
    last_evaluated_at: dt.datetime = utc_field(nullable=False)
    resolved_at: dt.datetime | None = utc_field()


class ComponentHeartbeat(Timestamped, table=True):
    """The last sign of life of a component that has no port to probe (the Dagster daemon)."""

    __tablename__ = "component_heartbeats"

    name: str = Field(primary_key=True, max_length=64)
    beat_at: dt.datetime = utc_field(nullable=False)
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
