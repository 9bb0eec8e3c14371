"""Cloud sync jobs (one per episode and target) and every attempt made on them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, UniqueConstraint
from sqlmodel import Field

from keystone_core.models.base import Timestamped, enum_field, fk_field, id_field, utc_field
from keystone_core.models.enums import SyncStatus, SyncTarget


class SyncJob(Timestamped, table=True):
    __tablename__ = "sync_jobs"
    __table_args__ = (
        UniqueConstraint("episode_id", "target", name="uq_sync_jobs_episode_target"),
        Index("ix_sync_jobs_status_due", "status", "next_attempt_at"),
    )

    id: int | None = id_field()
    episode_id: int = fk_field("episodes.id")
    factory_id: int = fk_field("factories.id")
    target: SyncTarget = enum_field(SyncTarget, SyncTarget.S3)
    status: SyncStatus = enum_field(SyncStatus, SyncStatus.QUEUED, index=True)
    attempt_count: int = Field(default=0, ge=0)
    next_attempt_at: dt.datetime | None = utc_field()
    last_error: str = Field(default="", max_length=2048)
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: dt.datetime | None = utc_field(index=True)
    remote_session: str | None = Field(default=None, max_length=255)
    # Where the copy lives (s3://bucket/prefix… or the receiver's URL) and how much was sent.
    destination: str = Field(default="", max_length=1024)
    bytes_transferred: int = Field(default=0, ge=0, sa_type=BigInteger)
    synced_at: dt.datetime | None = utc_field()
    # Resumable multipart state of the s3 target: {object name: {"upload_id", "key"}}.
    progress: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # X-Request-ID of the API call that queued (or requeued) the job; tagged on its run.
    request_id: str | None = Field(default=None, max_length=64)


class SyncAttempt(Timestamped, table=True):
    __tablename__ = "sync_attempts"

    id: int | None = id_field()
    sync_job_id: int = fk_field("sync_jobs.id", ondelete="CASCADE")
    attempt_no: int = Field(ge=1)
    started_at: dt.datetime = utc_field(nullable=False)
    finished_at: dt.datetime | None = utc_field()
    outcome: str = Field(default="", max_length=32)
    http_status: int | None = None
    error: str = Field(default="", max_length=2048)
    bytes_transferred: int = Field(default=0, ge=0, sa_type=BigInteger)
    run_id: str | None = Field(default=None, max_length=64)
