"""Episodes (one verified recording per task) and their QA results and inspections."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Date, Index
from sqlmodel import Field

from keystone_core.models.base import (
    IdType,
    Timestamped,
    double_field,
    enum_field,
    fk_field,
    id_field,
    metadata_field,
    utc_field,
)
from keystone_core.models.enums import EpisodeStatus, InspectionDecision, QATier


class Episode(Timestamped, table=True):
    __tablename__ = "episodes"
    __table_args__ = (
        Index("ix_episodes_factory_status", "factory_id", "status"),
        Index("ix_episodes_factory_date", "factory_id", "recording_date"),
        Index("ix_episodes_status_lease", "status", "qa_lease_expires_at"),
        # The "no uploads for 30 min" alert reads the latest episode of each factory.
        Index("ix_episodes_factory_created", "factory_id", "created_at"),
    )

    id: int | None = id_field()
    episode_id: str = Field(max_length=64, unique=True)
    # One episode per task: a retried upload lands on the same row.
    task_id: int = Field(foreign_key="tasks.id", unique=True, ondelete="RESTRICT", sa_type=IdType)
    factory_id: int = fk_field("factories.id")
    order_id: int = fk_field("orders.id")
    batch_id: int = fk_field("batches.id")
    robot_id: int | None = fk_field("robots.id", nullable=True)
    device_id: str = Field(max_length=64, index=True)
    status: EpisodeStatus = enum_field(EpisodeStatus, EpisodeStatus.PENDING_QA, index=True)
    # UTC date the recording started (sidecar/callback), else the date in the object key.
    recording_date: dt.date = Field(sa_type=Date, index=True)
    recording_started_at: dt.datetime | None = utc_field()
    duration_sec: float | None = double_field(ge=0)
    bucket: str = Field(max_length=255)
    # Object keys in ``bucket`` (the device's own paths; Keystone never rewrites them).
    mcap_path: str = Field(max_length=1024)
    sidecar_path: str | None = Field(default=None, max_length=1024)
    file_size_bytes: int | None = Field(default=None, ge=0, sa_type=BigInteger)
    checksum: str | None = Field(default=None, max_length=128)  # SHA-256 hex of the MCAP
    verified_at: dt.datetime | None = utc_field()
    qa_score: float | None = double_field(ge=0, le=1)
    qa_lease_owner: str | None = Field(default=None, max_length=128)
    qa_lease_expires_at: dt.datetime | None = utc_field()
    # Tier asked for by a rerun (None: fast, thorough when borderline).
    qa_tier: str | None = Field(default=None, max_length=16)
    # Runs that could not read the object (missing, store down); retried after qa_not_before.
    qa_attempts: int = Field(default=0, ge=0)
    qa_not_before: dt.datetime | None = utc_field()
    # X-Request-ID of the API call that requeued QA; tagged on the run that scores it.
    qa_request_id: str | None = Field(default=None, max_length=64)
    approved_at: dt.datetime | None = utc_field()
    # Edge retention: when the device objects were expired after a verified sync.
    edge_expired_at: dt.datetime | None = utc_field()
    labels: list[str] = Field(default_factory=list, sa_type=JSON)
    quality_flag: str = Field(default="", max_length=1024)
    meta: dict[str, Any] = metadata_field()


class QAResult(Timestamped, table=True):
    """One QA run over one episode; ``checks`` holds value, threshold, pass and reason."""

    __tablename__ = "qa_results"

    id: int | None = id_field()
    episode_id: int = fk_field("episodes.id", ondelete="CASCADE")
    tier: QATier = enum_field(QATier)
    score: float = double_field(nullable=False, ge=0, le=1)
    hard_failure: bool = Field(default=False)
    verdict: EpisodeStatus = enum_field(EpisodeStatus)
    checks: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    run_id: str | None = Field(default=None, max_length=64, index=True)
    started_at: dt.datetime = utc_field(nullable=False)
    finished_at: dt.datetime = utc_field(nullable=False)


class Inspection(Timestamped, table=True):
    """A human review: claimed under a lease, then decided; history is kept."""

    __tablename__ = "inspections"
    __table_args__ = (
        Index("ix_inspections_episode_decided", "episode_id", "decided_at"),
        # Quality dashboard: decisions per inspector and day in a time range.
        Index("ix_inspections_decided", "decided_at"),
    )

    id: int | None = id_field()
    episode_id: int = fk_field("episodes.id")
    inspector_id: int | None = fk_field("inspectors.id", nullable=True)
    user_id: int | None = fk_field("users.id", nullable=True)
    claimed_at: dt.datetime = utc_field(nullable=False)
    lease_expires_at: dt.datetime | None = utc_field(index=True)
    decision: InspectionDecision | None = enum_field(InspectionDecision, None)
    reason: str = Field(default="", max_length=2048)
    failed_tags: list[str] = Field(default_factory=list, sa_type=JSON)
    decided_at: dt.datetime | None = utc_field()
