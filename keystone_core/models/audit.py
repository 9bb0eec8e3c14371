"""Audit log (every write: who, what, before/after), webhooks and the event outbox."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Index, UniqueConstraint
from sqlmodel import Field

from keystone_core import clock
from keystone_core.db import UTCDateTime
from keystone_core.models.base import (
    Timestamped,
    double_field,
    enum_field,
    fk_field,
    id_field,
    utc_field,
)
from keystone_core.models.enums import OutboxStatus, WebhookDeliveryStatus


class AuditLog(Timestamped, table=True):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_entity", "entity_type", "entity_id"),)

    id: int | None = id_field()
    occurred_at: dt.datetime = Field(
        default_factory=clock.now, sa_type=UTCDateTime, nullable=False, index=True
    )
    actor_type: str = Field(max_length=32)  # user | device | system
    actor_id: str = Field(default="", max_length=64)
    actor_account: str = Field(default="", max_length=128)
    # Server defaults let the migration add these to a filled table.
    actor_role: str = Field(default="", max_length=32, sa_column_kwargs={"server_default": ""})
    route: str = Field(default="", max_length=255, sa_column_kwargs={"server_default": ""})
    action: str = Field(max_length=64, index=True)
    entity_type: str = Field(max_length=64)
    entity_id: str = Field(max_length=64)
    factory_id: int | None = fk_field("factories.id", nullable=True)
    before: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    after: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    request_id: str | None = Field(default=None, max_length=64)


class Webhook(Timestamped, table=True):
    __tablename__ = "webhooks"

    id: int | None = id_field()
    url: str = Field(max_length=2048)
    secret: str = Field(max_length=255)
    event_types: list[str] = Field(default_factory=list, sa_type=JSON)
    factory_id: int | None = fk_field("factories.id", nullable=True)
    is_active: bool = Field(default=True)
    consecutive_failures: int = Field(default=0, ge=0)
    disabled_at: dt.datetime | None = utc_field()
    description: str = Field(default="", max_length=255, sa_column_kwargs={"server_default": ""})
    disabled_reason: str = Field(
        default="", max_length=255, sa_column_kwargs={"server_default": ""}
    )
    last_success_at: dt.datetime | None = utc_field()
    last_failure_at: dt.datetime | None = utc_field()


class OutboxEvent(Timestamped, table=True):
    """An event written in the same transaction as the change; delivered later by Dagster."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_status_due", "status", "next_attempt_at"),)

    id: int | None = id_field()
    event_type: str = Field(max_length=64, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    factory_id: int | None = fk_field("factories.id", nullable=True)
    status: OutboxStatus = enum_field(OutboxStatus, OutboxStatus.PENDING)
    attempts: int = Field(default=0, ge=0)
    next_attempt_at: dt.datetime | None = utc_field()
    delivered_at: dt.datetime | None = utc_field()
    last_error: str = Field(default="", max_length=2048)
    # The X-Request-ID of the API call whose transaction wrote the event, if any.
    request_id: str | None = Field(default=None, max_length=64)


class WebhookDelivery(Timestamped, table=True):
    """One outbox event for one webhook: its delivery state, retried with backoff."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_webhook_event"),
        Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
    )

    id: int | None = id_field()
    webhook_id: int = fk_field("webhooks.id", ondelete="CASCADE")
    event_id: int = fk_field("outbox.id", ondelete="CASCADE")
    event_type: str = Field(max_length=64)
    status: WebhookDeliveryStatus = enum_field(WebhookDeliveryStatus, WebhookDeliveryStatus.PENDING)
    attempts: int = Field(default=0, ge=0)
    next_attempt_at: dt.datetime | None = utc_field()
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: dt.datetime | None = utc_field()
    response_status: int | None = None
    last_error: str = Field(default="", max_length=2048)
    delivered_at: dt.datetime | None = utc_field()


class WebhookAttempt(Timestamped, table=True):
    """Every POST made for a delivery (the delivery log)."""

    __tablename__ = "webhook_attempts"

    id: int | None = id_field()
    delivery_id: int = fk_field("webhook_deliveries.id", ondelete="CASCADE")
    attempt_no: int = Field(ge=1)
    started_at: dt.datetime = utc_field(nullable=False)
    duration_ms: float | None = double_field(ge=0)
    response_status: int | None = None
    response_body: str = Field(default="", max_length=1024)
    error: str = Field(default="", max_length=2048)
    success: bool = Field(default=False)
    run_id: str | None = Field(default=None, max_length=64)


class RevokedToken(Timestamped, table=True):
    """A signed-out access token (its ``jti``), refused until it would have expired anyway."""

    __tablename__ = "revoked_tokens"

    jti: str = Field(primary_key=True, max_length=64)
    user_id: int | None = fk_field("users.id", nullable=True, ondelete="CASCADE")
    expires_at: dt.datetime = utc_field(nullable=False, index=True)
