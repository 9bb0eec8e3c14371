"""The factory's health signals, read with a handful of SQL aggregates.

One reading feeds both the Prometheus gauges (``keystone_core.metrics``) and Keystone's own
alert rules (``keystone_core.services.alerts``), so a factory with and without Prometheus
sees the same numbers. Every query is a grouped aggregate over an indexed status or time
column; nothing here loads rows into Python.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import (
    Episode,
    EpisodeStatus,
    Factory,
    Order,
    OrderStatus,
    QAResult,
    SyncJob,
    SyncStatus,
    Task,
    TaskStatus,
)

# Statuses whose sync job still has work to do (the sync queue).
SYNC_QUEUED = (SyncStatus.QUEUED, SyncStatus.RETRY_WAIT, SyncStatus.IN_PROGRESS)
QA_WINDOW = dt.timedelta(hours=1)
# Expired leases are recovered every 5 minutes (release_expired_leases); one still held
# after twice that means the recovery is not running.
STUCK_AFTER = dt.timedelta(minutes=10)


@dataclass
class FactorySignals:
    """What the alert rules and the gauges look at, for one factory at one instant."""

    factory_id: int
    slug: str
    upload_queue: int = 0
    upload_oldest_s: float = 0.0
    inspection_queue: int = 0
    inspection_oldest_s: float = 0.0
    qa_backlog: int = 0
    sync_queue: dict[str, int] = field(default_factory=dict)
    sync_oldest_s: float = 0.0
    sync_failed: int = 0
    # Leases expired for longer than STUCK_AFTER.
    stuck_sync_leases: int = 0
    stuck_qa_leases: int = 0
    # QA results finished in the last hour, by verdict.
    qa_last_hour: dict[str, int] = field(default_factory=dict)
    last_upload_at: dt.datetime | None = None
    in_production_hours: bool = False
    has_open_orders: bool = False
    # Seconds without a verified upload, counted from the later of the last upload and the
    # start of today's production window; 0 outside production hours.
    upload_silence_s: float = 0.0

    @property
    def sync_queue_total(self) -> int:
        return sum(self.sync_queue.values())

    @property
    def qa_results_last_hour(self) -> int:
        return sum(self.qa_last_hour.values())

    @property
    def qa_failure_rate(self) -> float:
        total = self.qa_results_last_hour
        return self.qa_last_hour.get(EpisodeStatus.QA_FAILED.value, 0) / total if total else 0.0

    @property
    def expecting_uploads(self) -> bool:
        """Inside production hours with an order in production: uploads should arrive."""
        return self.in_production_hours and self.has_open_orders


def _age(now: dt.datetime, oldest: dt.datetime | None) -> float:
    return max(0.0, (now - clock.as_utc(oldest)).total_seconds()) if oldest else 0.0


def _hhmm(value: str) -> dt.time | None:
    try:
        hours, minutes = value.split(":")
        return dt.time(int(hours), int(minutes))
    except ValueError:
        return None


def production_window(factory: Factory, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    """Today's production window (UTC) in the factory's time zone, if ``now`` is inside it.

    ``production_days`` are ISO weekdays of the factory's local date; a window whose end is
    before its start runs past midnight (night shift) and belongs to the day it starts.
    """
    try:
        zone = ZoneInfo(factory.timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    start, end = _hhmm(factory.production_start), _hhmm(factory.production_end)
    if start is None or end is None or start == end:
        return None
    local = now.astimezone(zone)
    days = set(factory.production_days or [])
    for day in (local.date(), local.date() - dt.timedelta(days=1)):
        if day.isoweekday() not in days:
            continue
        begins = dt.datetime.combine(day, start, tzinfo=zone)
        ends_day = day if end > start else day + dt.timedelta(days=1)
        ends = dt.datetime.combine(ends_day, end, tzinfo=zone)
        if begins <= local < ends:
            return begins.astimezone(dt.UTC), ends.astimezone(dt.UTC)
    return None


def _grouped(session: Session, query: Any) -> list[tuple[Any, ...]]:
    return list(session.exec(query).all())


def read_signals(session: Session, *, now: dt.datetime | None = None) -> list[FactorySignals]:
    """One reading of every live factory's signals."""
    now = now or clock.now()
    factories = session.exec(select(Factory).where(col(Factory.deleted_at).is_(None))).all()
    by_id = {f.id: FactorySignals(factory_id=f.id, slug=f.slug) for f in factories if f.id}

    def each(rows: list[tuple[Any, ...]]) -> Iterable[tuple[FactorySignals, tuple[Any, ...]]]:
        for factory_id, *rest in rows:
            signals = by_id.get(int(factory_id))
            if signals is not None:
                yield signals, tuple(rest)

    uploading = select(Task.factory_id, func.count(), func.min(Task.updated_at)).where(
        col(Task.status) == TaskStatus.UPLOADING, col(Task.deleted_at).is_(None)
    )
    for s, (count, oldest) in each(_grouped(session, uploading.group_by(col(Task.factory_id)))):
        s.upload_queue, s.upload_oldest_s = int(count), _age(now, oldest)

    episodes = (
        select(Episode.factory_id, Episode.status, func.count(), func.min(Episode.updated_at))
        .where(
            col(Episode.status).in_(
                (EpisodeStatus.NEEDS_INSPECTION, EpisodeStatus.PENDING_QA, EpisodeStatus.QA_RUNNING)
            )
        )
        .group_by(col(Episode.factory_id), col(Episode.status))
    )
    for s, (status, count, oldest) in each(_grouped(session, episodes)):
        if status == EpisodeStatus.NEEDS_INSPECTION:
            s.inspection_queue, s.inspection_oldest_s = int(count), _age(now, oldest)
        else:
            s.qa_backlog += int(count)

    stuck_qa = (
        select(Episode.factory_id, func.count())
        .where(
            col(Episode.status) == EpisodeStatus.QA_RUNNING,
            col(Episode.qa_lease_expires_at) < now - STUCK_AFTER,
        )
        .group_by(col(Episode.factory_id))
    )
    for s, (count,) in each(_grouped(session, stuck_qa)):
        s.stuck_qa_leases = int(count)

    jobs = (
        select(SyncJob.factory_id, SyncJob.status, func.count(), func.min(SyncJob.updated_at))
        .where(col(SyncJob.status).in_((*SYNC_QUEUED, SyncStatus.FAILED)))
        .group_by(col(SyncJob.factory_id), col(SyncJob.status))
    )
    oldest_sync: dict[int, float] = {}
    for s, (status, count, oldest) in each(_grouped(session, jobs)):
        if status == SyncStatus.FAILED:
            s.sync_failed = int(count)
            continue
        s.sync_queue[str(status)] = int(count)
        oldest_sync[s.factory_id] = max(oldest_sync.get(s.factory_id, 0.0), _age(now, oldest))
    for factory_id, age in oldest_sync.items():
        by_id[factory_id].sync_oldest_s = age

    stuck_sync = (
        select(SyncJob.factory_id, func.count())
        .where(
            col(SyncJob.status) == SyncStatus.IN_PROGRESS,
            col(SyncJob.lease_expires_at) < now - STUCK_AFTER,
        )
        .group_by(col(SyncJob.factory_id))
    )
    for s, (count,) in each(_grouped(session, stuck_sync)):
        s.stuck_sync_leases = int(count)

    qa = (
        select(Episode.factory_id, QAResult.verdict, func.count())
        .join(Episode, col(Episode.id) == col(QAResult.episode_id))
        .where(col(QAResult.created_at) >= now - QA_WINDOW)
        .group_by(col(Episode.factory_id), col(QAResult.verdict))
    )
    for s, (verdict, count) in each(_grouped(session, qa)):
        s.qa_last_hour[str(verdict)] = int(count)

    last_upload = select(Episode.factory_id, func.max(Episode.created_at)).group_by(
        col(Episode.factory_id)
    )
    for s, (latest,) in each(_grouped(session, last_upload)):
        s.last_upload_at = clock.as_utc(latest) if latest else None

    open_orders = (
        select(Order.factory_id, func.count())
        .where(
            col(Order.status) == OrderStatus.IN_PROGRESS,
            col(Order.deleted_at).is_(None),
        )
        .group_by(col(Order.factory_id))
    )
    for s, (count,) in each(_grouped(session, open_orders)):
        s.has_open_orders = int(count) > 0

    for factory in factories:
        signals = by_id.get(factory.id) if factory.id else None
        if signals is None:
            continue
        window = production_window(factory, now)
        signals.in_production_hours = window is not None
        if window is not None:
            since = max(filter(None, (window[0], signals.last_upload_at)))
            signals.upload_silence_s = _age(now, since)
    return list(by_id.values())
