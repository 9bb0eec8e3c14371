"""Housekeeping: archive and delete old audit-log rows; prune the delivered event history.

The audit log grows with every write and the outbox with every event; neither may grow
forever on an edge server. Audit rows older than ``KEYSTONE_AUDIT_RETENTION_DAYS`` are
written to the object store as gzip JSON-lines archives, the upload is checked, and only
then are exactly those rows deleted — so a crash between the two re-archives the same
rows on the next run (same id range, same key), it never loses one. Outbox events older
than ``KEYSTONE_OUTBOX_RETENTION_DAYS`` go with their webhook deliveries and attempts,
but only once the event has been fanned out and every delivery of it is delivered or
failed: pending and retrying work is never touched.

Work is done in chunks, each its own short transaction, so a large backlog never holds
long locks on MariaDB.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import AuditLog, OutboxEvent, WebhookAttempt, WebhookDelivery
from keystone_core.models.enums import OutboxStatus, WebhookDeliveryStatus
from keystone_core.services.audit import Actor, record_audit
from keystone_core.storage import ensure_bucket

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from keystone_core.settings import Settings

SessionFactory = Callable[[], AbstractContextManager[Session]]
AUDIT_CHUNK = 5000
OUTBOX_CHUNK = 1000
ARCHIVE_PREFIX = "audit/"
TERMINAL_DELIVERIES = (WebhookDeliveryStatus.DELIVERED, WebhookDeliveryStatus.FAILED)


@dataclass
class HousekeepingReport:
    dry_run: bool
    audit_cutoff: dt.datetime | None = None
    audit_candidates: int = 0
    audit_archived: int = 0
    audit_deleted: int = 0
    archive_keys: list[str] = field(default_factory=list)
    archive_bytes: int = 0
    outbox_cutoff: dt.datetime | None = None
    outbox_candidates: int = 0
    events_deleted: int = 0
    deliveries_deleted: int = 0
    attempts_deleted: int = 0
    time_budget_reached: bool = False
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in vars(self).items():
            out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
        out["archive_keys"] = self.archive_keys[:100]
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return clock.as_utc(value).isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def audit_row_dict(row: AuditLog) -> dict[str, Any]:
    """Every column of an audit row, as it goes into an archive line."""
    return {c.name: _jsonable(getattr(row, c.name)) for c in AuditLog.__table__.columns}  # type: ignore[attr-defined]


def archive_key(rows: Sequence[AuditLog]) -> str:
    """Where the chunk goes: by the first row's day, named by the id range it holds."""
    first, last = rows[0], rows[-1]
    day = clock.as_utc(first.occurred_at)
    return f"{ARCHIVE_PREFIX}{day:%Y/%m/%d}/audit-{first.id:012d}-{last.id:012d}.jsonl.gz"


def _archive_bytes(rows: Sequence[AuditLog]) -> bytes:
    buffer = io.BytesIO()
    # mtime=0: the same rows always make the same bytes (a re-archive overwrites in kind).
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as archive:
        for row in rows:
            line = json.dumps(audit_row_dict(row), sort_keys=True, separators=(",", ":"))
            archive.write(line.encode() + b"\n")
    return buffer.getvalue()


def read_archive(data: bytes) -> list[dict[str, Any]]:
    """The rows of one archive (gzip JSON lines), in id order."""
    text = gzip.decompress(data).decode()
    return [json.loads(line) for line in text.splitlines() if line]


def _upload_checked(client: S3Client, bucket: str, key: str, body: bytes) -> None:
    digest = hashlib.sha256(body).hexdigest()
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=body,
        ContentType="application/gzip",
        Metadata={"sha256": digest},
    )
    head = client.head_object(Bucket=bucket, Key=key)
    if head["ContentLength"] != len(body) or head.get("Metadata", {}).get("sha256") != digest:
        raise OSError(f"archive s3://{bucket}/{key} does not match what was written")


def archive_audit_log(
    sessions: SessionFactory,
    client: S3Client | None,
    settings: Settings,
    report: HousekeepingReport,
    *,
    deadline: float,
    chunk: int = AUDIT_CHUNK,
) -> None:
    """Archive (unless KEYSTONE_AUDIT_ARCHIVE is false) and delete audit rows past the
    retention period, oldest first, one chunk per transaction."""
    days = settings.audit_retention_days
    if days is None:
        return
    cutoff = clock.now() - dt.timedelta(days=days)
    report.audit_cutoff = cutoff
    expired = col(AuditLog.occurred_at) < cutoff
    with sessions() as session:
        report.audit_candidates = session.exec(
            select(func.count()).select_from(AuditLog).where(expired)
        ).one()
    if report.dry_run or not report.audit_candidates:
        return
    if settings.audit_archive:
        if client is None:
            raise ValueError("archiving the audit log needs the object store")
        ensure_bucket(client, settings.audit_archive_bucket)
    while time.monotonic() < deadline:
        with sessions() as session:
            rows = list(
                session.exec(
                    select(AuditLog).where(expired).order_by(col(AuditLog.id)).limit(chunk)
                )
            )
            if not rows:
                return
            if settings.audit_archive:
                assert client is not None
                key = archive_key(rows)
                body = _archive_bytes(rows)
                _upload_checked(client, settings.audit_archive_bucket, key, body)
                report.archive_keys.append(key)
                report.archive_bytes += len(body)
                report.audit_archived += len(rows)
            ids = [row.id for row in rows]
            session.execute(delete(AuditLog).where(col(AuditLog.id).in_(ids)))
            session.commit()
            report.audit_deleted += len(rows)
    report.time_budget_reached = True


def _prunable_events(cutoff: dt.datetime) -> Any:
    """Fanned-out events older than ``cutoff`` none of whose deliveries is still due."""
    open_delivery = (
        select(WebhookDelivery.id)
        .where(
            col(WebhookDelivery.event_id) == col(OutboxEvent.id),
            col(WebhookDelivery.status).not_in(TERMINAL_DELIVERIES),
        )
        .exists()
    )
    return (
        select(OutboxEvent.id)
        .where(
            col(OutboxEvent.status) == OutboxStatus.DELIVERED,
            col(OutboxEvent.delivered_at) < cutoff,
            ~open_delivery,
        )
        .order_by(col(OutboxEvent.id))
    )


def prune_event_history(
    sessions: SessionFactory,
    settings: Settings,
    report: HousekeepingReport,
    *,
    deadline: float,
    chunk: int = OUTBOX_CHUNK,
) -> None:
    """Delete old, finished outbox events with their deliveries and attempts."""
    days = settings.outbox_retention_days
    if days is None:
        return
    cutoff = clock.now() - dt.timedelta(days=days)
    report.outbox_cutoff = cutoff
    with sessions() as session:
        report.outbox_candidates = session.exec(
            select(func.count()).select_from(_prunable_events(cutoff).subquery())
        ).one()
    if report.dry_run or not report.outbox_candidates:
        return
    while time.monotonic() < deadline:
        with sessions() as session:
            event_ids = list(session.exec(_prunable_events(cutoff).limit(chunk)))
            if not event_ids:
                return
            delivery_ids = list(
                session.exec(
                    select(WebhookDelivery.id).where(col(WebhookDelivery.event_id).in_(event_ids))
                )
            )
            # Children first: the schema cascades, but SQLite without the pragma would not.
            if delivery_ids:
                attempts = session.execute(
                    delete(WebhookAttempt).where(col(WebhookAttempt.delivery_id).in_(delivery_ids))
                )
                deliveries = session.execute(
                    delete(WebhookDelivery).where(col(WebhookDelivery.id).in_(delivery_ids))
                )
                report.attempts_deleted += attempts.rowcount  # type: ignore[attr-defined]
                report.deliveries_deleted += deliveries.rowcount  # type: ignore[attr-defined]
            events = session.execute(delete(OutboxEvent).where(col(OutboxEvent.id).in_(event_ids)))
            report.events_deleted += events.rowcount  # type: ignore[attr-defined]
            session.commit()
    report.time_budget_reached = True


def run_housekeeping(
    sessions: SessionFactory,
    client: S3Client | None,
    settings: Settings,
    *,
    dry_run: bool = False,
    actor: Actor | None = None,
    time_budget_s: float = 15 * 60,
) -> HousekeepingReport:
    """Both jobs, then one audit row that says what went (not for a dry run or no-op)."""
    report = HousekeepingReport(dry_run=dry_run)
    deadline = time.monotonic() + time_budget_s
    try:
        archive_audit_log(sessions, client, settings, report, deadline=deadline)
    except (BotoCoreError, ClientError, OSError, ValueError) as exc:
        # Nothing of the failed chunk was deleted: its rows stay for the next run.
        report.errors.append(f"audit archive: {exc}")
    prune_event_history(sessions, settings, report, deadline=deadline)
    if not dry_run and (report.audit_deleted or report.events_deleted):
        with sessions() as session:
            record_audit(
                session,
                actor or Actor.system("housekeeping"),
                "housekeeping.pruned",
                entity_type="housekeeping",
                entity_id="audit_log+outbox",
                after={
                    "audit_deleted": report.audit_deleted,
                    "audit_archived": report.audit_archived,
                    "archive_bucket": settings.audit_archive_bucket
                    if settings.audit_archive
                    else None,
                    "archive_keys": report.archive_keys[:20],
                    "events_deleted": report.events_deleted,
                    "deliveries_deleted": report.deliveries_deleted,
                    "attempts_deleted": report.attempts_deleted,
                },
            )
            session.commit()
    return report
