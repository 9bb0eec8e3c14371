"""Axon devices on the wire: enrollment windows, live connections, RPCs in flight, events.

Nothing about a device connection lives only in a worker's memory: which worker holds a
device's socket (``device_connections``), the RPCs waiting for a reply
(``device_commands``) and what the devices said (``device_events``) are rows, so that a
REST call on one API worker reaches a socket held by another and a restart loses nothing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from keystone_core import clock
from keystone_core.db import UTCDateTime
from keystone_core.models.base import (
    IdType,
    Timestamped,
    double_field,
    fk_field,
    id_field,
    utc_field,
)


class EnrollmentWindow(Timestamped, table=True):
    """A time-limited permission for robots of one factory to register without credentials."""

    __tablename__ = "enrollment_windows"
    __table_args__ = (Index("ix_enrollment_windows_factory_expiry", "factory_id", "expires_at"),)

    id: int | None = id_field()
    factory_id: int = fk_field("factories.id")
    # Only robots of this type may register (any type when null).
    robot_type_id: int | None = fk_field("robot_types.id", nullable=True)
    opened_by_user_id: int | None = fk_field("users.id", nullable=True)
    expires_at: dt.datetime = utc_field(nullable=False)
    closed_at: dt.datetime | None = utc_field()
    # Source networks (CIDR) a registration may come from; empty = any.
    allowed_networks: list[str] = Field(default_factory=list, sa_type=JSON)
    max_registrations: int | None = Field(default=None, ge=1)
    registered_count: int = Field(default=0, ge=0)
    # Pre-provisioned robots (ids): when set, a registration claims the next of these
    # (oldest first) instead of creating a robot.
    robot_ids: list[int] = Field(default_factory=list, sa_type=JSON)
    note: str = Field(default="", max_length=1024)


class DeviceConnection(SQLModel, table=True):
    """The socket of one device on one channel (``recorder`` or ``transfer``): the newest wins."""

    __tablename__ = "device_connections"
    __table_args__ = (
        UniqueConstraint("robot_id", "channel", name="uq_device_connections_robot_channel"),
    )

    id: int | None = id_field()
    robot_id: int = fk_field("robots.id")
    factory_id: int = fk_field("factories.id")
    device_id: str = Field(max_length=64, index=True)
    channel: str = Field(max_length=16)
    connection_id: str = Field(max_length=64, index=True)
    worker_id: str = Field(max_length=128, index=True)
    remote_addr: str = Field(default="", max_length=64)
    connected_at: dt.datetime = utc_field(nullable=False)
    # Refreshed by the holding worker's heartbeat; a stale value means the worker died.
    last_seen_at: dt.datetime = utc_field(nullable=False)
    disconnected_at: dt.datetime | None = utc_field()
    # Recorder state as last reported (idle|ready|recording|paused) and its cached task.
    state: str | None = Field(default=None, max_length=16)
    task_id: str | None = Field(default=None, max_length=128)
    state_at: dt.datetime | None = utc_field()
    # The device paused itself (disk or task-size guard): "out of budget".
    paused_by_device: bool = Field(default=False)
    replaced_count: int = Field(default=0, ge=0)
    last_replaced_at: dt.datetime | None = utc_field()
    updated_at: dt.datetime = Field(default_factory=clock.now, sa_type=UTCDateTime, nullable=False)


class DeviceCommand(SQLModel, table=True):
    """One RPC to a device: written by the requesting worker, sent by the socket's worker."""

    __tablename__ = "device_commands"
    __table_args__ = (Index("ix_device_commands_connection_status", "connection_id", "status"),)

    id: int | None = id_field()
    request_id: str = Field(max_length=64, unique=True)
    robot_id: int = fk_field("robots.id")
    connection_id: str = Field(max_length=64)
    action: str = Field(max_length=32)
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # The Keystone task the request concerns (config/begin/finish), as the device knows it.
    task_id: str | None = Field(default=None, max_length=128)
    status: str = Field(default="pending", max_length=16)  # pending|sent|answered|expired
    created_at: dt.datetime = Field(
        default_factory=clock.now, sa_type=UTCDateTime, nullable=False, index=True
    )
    deadline_at: dt.datetime = utc_field(nullable=False)
    sent_at: dt.datetime | None = utc_field()
    answered_at: dt.datetime | None = utc_field()
    success: bool | None = Field(default=None)
    response: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    requested_by: str = Field(default="", max_length=128)


class DeviceEvent(SQLModel, table=True):
    """What a device did or said (state changes, presence, callbacks): the SSE feed's source."""

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_factory_id", "factory_id", "id"),)

    id: int | None = id_field()
    factory_id: int | None = fk_field("factories.id", nullable=True, index=False)
    robot_id: int | None = fk_field("robots.id", nullable=True)
    device_id: str = Field(default="", max_length=64)
    kind: str = Field(max_length=48, index=True)
    task_id: str | None = Field(default=None, max_length=128)
    data: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    created_at: dt.datetime = Field(
        default_factory=clock.now, sa_type=UTCDateTime, nullable=False, index=True
    )


class DeviceUpload(Timestamped, table=True):
    """One recording as the transfer program reports it, and what Keystone verified."""

    __tablename__ = "device_uploads"
    __table_args__ = (
        UniqueConstraint("robot_id", "task_id", name="uq_device_uploads_robot_task"),
        Index("ix_device_uploads_factory_status", "factory_id", "status"),
    )

    id: int | None = id_field()
    robot_id: int = fk_field("robots.id", index=False)
    factory_id: int = fk_field("factories.id", index=False)
    device_id: str = Field(max_length=64)
    task_id: str = Field(max_length=128)
    # The device's record: pending|active|retry-wait|uploaded_wait_ack|completed|failed;
    # or Keystone's view before the device tracks it: requested (upload_request sent),
    # not_found (it answered upload_not_found), rejected (enqueue refused).
    status: str = Field(default="requested", max_length=24)
    s3_key: str | None = Field(default=None, max_length=1024)
    upload_mode: str = Field(default="", max_length=16)
    file_size_bytes: int | None = Field(default=None, ge=0, sa_type=BigInteger)
    checksum_sha256: str | None = Field(default=None, max_length=64)
    retry_count: int = Field(default=0, ge=0)
    last_error: str = Field(default="", max_length=2048)
    last_error_category: str = Field(default="", max_length=32)
    # Keystone's side: the objects as checked (key, size, checksums, sidecar, summary) …
    bucket: str = Field(default="", max_length=255)
    sidecar_key: str | None = Field(default=None, max_length=1024)
    recording_started_at: dt.datetime | None = utc_field()
    duration_sec: float | None = double_field(ge=0)
    checked_at: dt.datetime | None = utc_field()
    # The MCAP's axon.* metadata records as read at the check (copied to the episode).
    axon_metadata: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # … the stored MCAP re-hashed (KEYSTONE_ACK_VERIFY=sha256) by the verify_uploads job,
    # which claims rows with a lease …
    hash_lease_until: dt.datetime | None = utc_field()
    # … and verified (an episode exists), then ACKed.
    verified_at: dt.datetime | None = utc_field(index=True)
    verify_error: str = Field(default="", max_length=2048)
    acked_at: dt.datetime | None = utc_field()
    ack_count: int = Field(default=0, ge=0)
    # An upload for a task that was cancelled meanwhile (kept for ops, never an episode).
    orphan: bool = Field(default=False)
    request_sent_at: dt.datetime | None = utc_field()
    request_count: int = Field(default=0, ge=0)


class TransferStatus(SQLModel, table=True):
    """The last full status of a device's transfer program (counts, waiting ACKs)."""

    __tablename__ = "transfer_status"

    robot_id: int = Field(primary_key=True, foreign_key="robots.id", sa_type=IdType)
    factory_id: int = fk_field("factories.id")
    device_id: str = Field(max_length=64)
    version: str = Field(default="", max_length=32)
    counts: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    waiting_ack_task_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    failed_task_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    pending_bytes: int = Field(default=0, sa_type=BigInteger)
    bytes_per_sec: int = Field(default=0, sa_type=BigInteger)
    destination: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # SHA-256 of the last `uploads` list: an unchanged list is not written again.
    uploads_digest: str = Field(default="", max_length=64)
    reported_at: dt.datetime = utc_field(nullable=False)
