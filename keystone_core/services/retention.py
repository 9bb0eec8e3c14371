"""Edge retention: expire a factory's copy of an episode after a verified cloud sync.

Off by default (``KEYSTONE_EDGE_RETENTION_DAYS`` empty). When set, an episode's device
objects (MCAP + sidecar) may be deleted from the edge bucket once its sync job for the
configured target is ``synced`` — a copy verified by the target — and that happened at least
the retention period ago. Nothing else qualifies: not a queued, running, failed or
resyncing job, not another target's old copy. A dry run reports what would go and deletes
nothing. Each expiry is audited and stamped on the episode (``edge_expired_at``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import ConflictError
from keystone_core.models import Episode, SyncJob, SyncStatus
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.sync import target_of

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from keystone_core.settings import Settings


@dataclass(frozen=True)
class Expirable:
    episode_pk: int
    episode_id: str
    factory_id: int
    bucket: str
    keys: tuple[str, ...]
    size_bytes: int
    synced_at: dt.datetime


@dataclass
class RetentionReport:
    dry_run: bool
    cutoff: dt.datetime | None
    candidates: list[Expirable] = field(default_factory=list)
    expired: int = 0
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def candidate_bytes(self) -> int:
        return sum(c.size_bytes for c in self.candidates)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "candidates": len(self.candidates),
            "candidate_bytes": self.candidate_bytes,
            "expired": self.expired,
            "bytes_freed": self.bytes_freed,
            "errors": self.errors,
            "episodes": [
                {
                    "episode_id": c.episode_id,
                    "bucket": c.bucket,
                    "keys": list(c.keys),
                    "size_bytes": c.size_bytes,
                    "synced_at": c.synced_at.isoformat(),
                }
                for c in self.candidates[:1000]
            ],
        }


def candidates(session: Session, settings: Settings, *, limit: int = 1000) -> list[Expirable]:
    """Episodes whose edge objects may go now (empty when retention or sync is off)."""
    target = target_of(settings)
    if settings.edge_retention_days is None or target is None:
        return []
    cutoff = clock.now() - dt.timedelta(days=settings.edge_retention_days)
    rows = session.exec(
        select(Episode, SyncJob)
        .join(SyncJob, col(SyncJob.episode_id) == col(Episode.id))
        .where(
            col(SyncJob.target) == target,
            col(SyncJob.status) == SyncStatus.SYNCED,
            col(SyncJob.synced_at).is_not(None),
            col(SyncJob.synced_at) <= cutoff,
            col(Episode.edge_expired_at).is_(None),
        )
        .order_by(col(SyncJob.synced_at), col(Episode.id))
        .limit(limit)
    ).all()
    found = []
    for episode, job in rows:
        assert episode.id is not None
        assert job.synced_at is not None
        keys = tuple(k for k in (episode.mcap_path, episode.sidecar_path) if k)
        found.append(
            Expirable(
                episode_pk=episode.id,
                episode_id=episode.episode_id,
                factory_id=episode.factory_id,
                bucket=episode.bucket,
                keys=keys,
                size_bytes=episode.file_size_bytes or 0,
                synced_at=clock.as_utc(job.synced_at),
            )
        )
    return found


def expire(
    session_scope: Callable[[], AbstractContextManager[Session]],
    s3: S3Client,
    settings: Settings,
    *,
    dry_run: bool,
    actor: Actor,
    limit: int = 1000,
) -> RetentionReport:
    """Expire (or, with ``dry_run``, list) up to ``limit`` episodes' edge objects."""
    if settings.edge_retention_days is None:
        if not dry_run:
            raise ConflictError(
                "edge retention is off (KEYSTONE_EDGE_RETENTION_DAYS is empty)",
                code="retention_off",
            )
        return RetentionReport(dry_run=True, cutoff=None)
    cutoff = clock.now() - dt.timedelta(days=settings.edge_retention_days)
    with session_scope() as session:
        found = candidates(session, settings, limit=limit)
    report = RetentionReport(dry_run=dry_run, cutoff=cutoff, candidates=found)
    if dry_run:
        return report
    for item in found:
        with session_scope() as session:
            # Re-check under a row lock: a resync since the listing keeps the objects.
            job = session.exec(
                select(SyncJob)
                .where(
                    col(SyncJob.episode_id) == item.episode_pk,
                    col(SyncJob.status) == SyncStatus.SYNCED,
                )
                .with_for_update()
            ).first()
            if job is None:
                continue
            try:
                for key in item.keys:
                    s3.delete_object(Bucket=item.bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                report.errors.append(f"{item.episode_id}: {exc}")
                continue
            episode = session.get(Episode, item.episode_pk)
            assert episode is not None
            episode.edge_expired_at = clock.now()
            session.add(episode)
            record_audit(
                session,
                actor,
                "episode.edge_expired",
                entity_type="episode",
                entity_id=item.episode_pk,
                before={"bucket": item.bucket, "keys": list(item.keys)},
                after={"synced_at": item.synced_at.isoformat(), "destination": job.destination},
                factory_id=item.factory_id,
            )
            report.expired += 1
            report.bytes_freed += item.size_bytes
    return report
