"""Production and quality statistics: dashboards and data-production numbers from SQL aggregates.

Every number here is computed by the database (``COUNT``/``SUM``/``AVG``/``MAX`` with
``GROUP BY``, window functions for percentiles, ``JSON_TABLE``/``json_each`` for the QA
checks); Python only reads the aggregated rows, pages of details and the bounded lists a
dashboard shows. Route, parameter and field names follow the Go implementation that
Synapse already calls (``docs/statistics.md`` lists which names are its and what every
number means).

Time: an episode's production time (``recorded_at``) is when its recording started, or
midnight UTC of its recording date when the device did not report the start — the same
instant the episode's UTC ``recording_date`` (partitions, sync backfills) comes from.
Day, week and month buckets and "today" are local days at a fixed UTC offset: the
caller's ``timezone_offset``, else the offset of the factory's time zone (at the start of
the range; now, for the dashboards), else UTC.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from keystone_core import clock
from keystone_core.db import UTCDateTime
from keystone_core.errors import NotFoundError, PermissionDeniedError, ValidationFailed
from keystone_core.models import (
    SOP,
    Batch,
    BatchStatus,
    DataCollector,
    DeviceConnection,
    DeviceUpload,
    Episode,
    EpisodeStatus,
    Factory,
    Inspection,
    InspectionDecision,
    Inspector,
    Order,
    QAResult,
    Robot,
    RobotType,
    Role,
    Scene,
    Skill,
    Subscene,
    SyncJob,
    SyncStatus,
    Task,
    TaskStatus,
    User,
    Workstation,
)
from keystone_core.services.scope import Scope

SessionScope = Callable[[], AbstractContextManager[Session]]

# --- definitions -----------------------------------------------------------------------

# "success": usable downstream; "failed": QA or an inspector threw it out; "processing":
# QA or an inspector has not decided yet.
SUCCESS = (EpisodeStatus.AUTO_APPROVED, EpisodeStatus.INSPECTOR_APPROVED)
FAILED = (EpisodeStatus.QA_FAILED, EpisodeStatus.REJECTED)
PROCESSING = (EpisodeStatus.PENDING_QA, EpisodeStatus.QA_RUNNING, EpisodeStatus.NEEDS_INSPECTION)
QA_PENDING = (EpisodeStatus.PENDING_QA, EpisodeStatus.QA_RUNNING)
SYNC_OPEN = (SyncStatus.QUEUED, SyncStatus.IN_PROGRESS, SyncStatus.RETRY_WAIT, SyncStatus.FAILED)

MAX_RANGE_DAYS = 366
MAX_HOURLY_RANGE_DAYS = 31
DEFAULT_RANGE = dt.timedelta(days=7)
MAX_OFFSET_MINUTES = 14 * 60
EXPORT_PAGE_ROWS = 1000
SCORE_BUCKETS = 10

Granularity = Literal["hour", "day", "week", "month"]
Dimension = Literal[
    "source",
    "robot_device",
    "robot_type",
    "collector",
    "scene",
    "sop",
    "skill",
    "qa_status",
    "cloud_synced",
    "factory",
    "order",
    "batch",
    "workstation",
]
DetailSort = Literal["time", "count", "duration_ms", "size_bytes", "status", "qa_score"]

TASK_STATUS_LABELS = {
    TaskStatus.PENDING: "Pending",
    TaskStatus.READY: "Ready",
    TaskStatus.IN_PROGRESS: "In progress",
    TaskStatus.UPLOADING: "Uploading",
    TaskStatus.COMPLETED: "Completed",
    TaskStatus.FAILED: "Failed",
    TaskStatus.CANCELLED: "Cancelled",
}
STATION_STATUS_LABELS = {
    "active": "Online",
    "inactive": "Standing by",
    "break": "On break",
    "offline": "Offline",
}


def round_half_up(value: float) -> int:
    """The integer nearest ``value`` (halves up): how milliseconds and bytes are reported."""
    return math.floor(value + 0.5)


def rate(part: int, total: int) -> float:
    """``part / total`` as a fraction, 0 when there is nothing to divide."""
    return part / total if total else 0.0


def percent(part: int, total: int) -> float:
    """``part / total`` in percent with one decimal (the dashboards' convention)."""
    return round_half_up(part * 1000 / total) / 10 if total else 0.0


def _int(value: Any) -> int:
    return 0 if value is None else round_half_up(float(value))


def _ms(seconds: Any) -> int:
    return 0 if seconds is None else round_half_up(float(seconds) * 1000)


def _iso(value: dt.datetime | None) -> str:
    return "" if value is None else clock.as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- time ------------------------------------------------------------------------------


def parse_offset(value: str | None) -> int | None:
    """``+08:00`` → 480 minutes; ``None`` for no value; 422 ``invalid_timezone_offset``."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    bad = ValidationFailed(
        "timezone_offset must look like +08:00 or -05:00 (at most ±14:00)",
        code="invalid_timezone_offset",
    )
    if len(text) != 6 or text[0] not in "+-" or text[3] != ":":
        raise bad
    hours, minutes = text[1:3], text[4:6]
    if not (hours.isdigit() and minutes.isdigit()):
        raise bad
    total = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or total > MAX_OFFSET_MINUTES:
        raise bad
    return -total if text[0] == "-" else total


def format_offset(minutes: int) -> str:
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def factory_offset(timezone: str | None, at: dt.datetime) -> int:
    """The UTC offset (minutes) of an IANA zone at ``at``; unknown zones count as UTC."""
    try:
        zone = ZoneInfo(timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return 0
    delta = at.astimezone(zone).utcoffset() or dt.timedelta(0)
    return int(delta.total_seconds() // 60)


def local_offset(
    session: Session,
    scope: Scope,
    *,
    explicit: str | None,
    factory_id: int | None,
    at: dt.datetime | None = None,
) -> int:
    """Minutes east of UTC for local days: ``timezone_offset`` when given, else the time
    zone of the one factory asked for (``factory_id``, or the caller's only factory) at
    ``at``, else UTC. A fixed offset: a daylight-saving change inside a range is not
    followed (pass ``timezone_offset`` to choose)."""
    given = parse_offset(explicit)
    if given is not None:
        return given
    if factory_id is None and scope.factory_ids is not None and len(scope.factory_ids) == 1:
        (factory_id,) = scope.factory_ids
    if factory_id is None:
        return 0
    zone = session.execute(
        select(col(Factory.timezone)).where(col(Factory.id) == factory_id)
    ).scalar()
    return factory_offset(zone, at or clock.now()) if zone else 0


def time_range(
    start: dt.datetime | None,
    end: dt.datetime | None,
    *,
    granularity: Granularity = "day",
    now: dt.datetime | None = None,
) -> tuple[dt.datetime, dt.datetime]:
    """``[start, end)`` in UTC: defaults to the 7 days before ``now``; naive times are UTC.
    422 when the end is not after the start, or the range is longer than 366 days (31
    days for hourly buckets)."""
    end = clock.as_utc(end) if end is not None else (now or clock.now())
    start = clock.as_utc(start) if start is not None else end - DEFAULT_RANGE
    if end <= start:
        raise ValidationFailed("end_time must be after start_time", code="invalid_time_range")
    longest = MAX_HOURLY_RANGE_DAYS if granularity == "hour" else MAX_RANGE_DAYS
    if end - start > dt.timedelta(days=longest):
        raise ValidationFailed(
            f"the time range is longer than {longest} days"
            + (" (hourly buckets)" if granularity == "hour" else ""),
            code="time_range_too_long",
            max_days=longest,
        )
    return start, end


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _is_sqlite(session: Session) -> bool:
    return _dialect(session) == "sqlite"


def recorded_at(sqlite: bool) -> ColumnElement[Any]:
    """An episode's production instant: recording start, else midnight of its UTC date.

    SQLite stores datetimes as ``YYYY-MM-DD HH:MM:SS.ffffff`` text, so the date fallback
    gets the same shape to compare and sort with them; MariaDB/MySQL turn the DATE into a
    DATETIME with ``TIMESTAMP()``."""
    if sqlite:
        midnight: ColumnElement[Any] = cast(col(Episode.recording_date), String) + literal(
            " 00:00:00.000000"
        )
    else:
        midnight = func.timestamp(col(Episode.recording_date))
    return func.coalesce(
        col(Episode.recording_started_at),
        midnight,
        type_=UTCDateTime(),
    )


def bucket_of(
    sqlite: bool, moment: Any, granularity: Granularity, offset_minutes: int
) -> ColumnElement[str]:
    """The local bucket of a UTC timestamp as text: ``YYYY-MM-DD HH:00`` (hour),
    ``YYYY-MM-DD`` (day; for week the Monday, for month the 1st)."""
    if sqlite:
        shift = f"{int(offset_minutes):+d} minutes"
        if granularity == "hour":
            return func.strftime("%Y-%m-%d %H:00", moment, shift)
        if granularity == "day":
            return func.strftime("%Y-%m-%d", moment, shift)
        if granularity == "month":
            return func.strftime("%Y-%m-01", moment, shift)
        # 'weekday 0' moves to the coming Sunday (or stays on one); six days back is Monday.
        return func.date(moment, shift, "weekday 0", "-6 days")
    local = func.date_add(moment, literal_column(f"INTERVAL {int(offset_minutes)} MINUTE"))
    if granularity == "hour":
        return func.date_format(local, "%Y-%m-%d %H:00")
    if granularity == "day":
        return func.date_format(local, "%Y-%m-%d")
    if granularity == "month":
        return func.date_format(local, "%Y-%m-01")
    return func.date_format(func.subdate(func.date(local), func.weekday(local)), "%Y-%m-%d")


def _floor_local(moment: dt.datetime, granularity: Granularity) -> dt.datetime:
    if granularity == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "week":
        return day - dt.timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    return day


def _next_local(moment: dt.datetime, granularity: Granularity) -> dt.datetime:
    if granularity == "hour":
        return moment + dt.timedelta(hours=1)
    if granularity == "day":
        return moment + dt.timedelta(days=1)
    if granularity == "week":
        return moment + dt.timedelta(days=7)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.replace(year=year, month=month)


def bucket_keys(
    start: dt.datetime, end: dt.datetime, granularity: Granularity, offset_minutes: int
) -> list[tuple[str, dt.datetime]]:
    """Every bucket overlapping ``[start, end)``: (its key as :func:`bucket_of` writes it,
    its start as a UTC instant)."""
    shift = dt.timedelta(minutes=offset_minutes)
    local = _floor_local((start + shift).replace(tzinfo=None), granularity)
    local_end = (end + shift).replace(tzinfo=None)
    out = []
    while local < local_end:
        key = local.strftime("%Y-%m-%d %H:00" if granularity == "hour" else "%Y-%m-%d")
        out.append((key, (local - shift).replace(tzinfo=dt.UTC)))
        local = _next_local(local, granularity)
    return out


def local_day_window(offset_minutes: int, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """``[local midnight, next local midnight)`` of ``day`` as UTC instants."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC) - dt.timedelta(
        minutes=offset_minutes
    )
    return start, start + dt.timedelta(days=1)


def local_today(offset_minutes: int, now: dt.datetime | None = None) -> dt.date:
    return ((now or clock.now()) + dt.timedelta(minutes=offset_minutes)).date()


# --- response shapes (shared by the API) ---------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class CountMetrics(_Out):
    total: int = Field(description="Episodes (verified recordings) produced in the range.")
    success: int = Field(description="Approved: auto_approved + inspector_approved.")
    failed: int = Field(description="Thrown out: qa_failed + rejected.")
    processing: int = Field(description="Undecided: pending_qa + qa_running + needs_inspection.")
    success_rate: float = Field(description="success / total (0 when total is 0).")


class DurationMetrics(_Out):
    total_ms: int = Field(description="Sum of recording durations (episodes with one).")
    avg_ms: int
    p95_ms: int = Field(description="Nearest-rank 95th percentile of the durations.")
    max_ms: int


class SizeMetrics(_Out):
    total_bytes: int
    success_bytes: int = Field(description="Bytes of approved episodes.")
    failed_bytes: int = Field(description="Bytes of qa_failed and rejected episodes.")
    avg_bytes: int
    max_bytes: int


class QAMetrics(_Out):
    approved: int = Field(description="Same as count.success.")
    pass_rate: float = Field(description="approved / (approved + failed): of the decided ones.")


class CloudSyncMetrics(_Out):
    synced: int = Field(description="Episodes with a synced copy on a cloud target.")
    unsynced: int
    sync_rate: float = Field(description="synced / total.")


class CompareMetrics(_Out):
    previous_total_count: int = Field(description="count.total of the range just before.")
    count_change_rate: float = Field(
        description="(total - previous) / previous; 1 when previous is 0 and total is not."
    )


class ProductionSummary(_Out):
    start_time: dt.datetime
    end_time: dt.datetime
    count: CountMetrics
    duration: DurationMetrics
    size: SizeMetrics
    qa: QAMetrics
    cloud_sync: CloudSyncMetrics
    compare: CompareMetrics


class TrendItem(_Out):
    time: str = Field(description="Start of the local bucket as a UTC instant (RFC 3339).")
    count: CountMetrics
    duration: DurationMetrics
    size: SizeMetrics


class ProductionTrend(_Out):
    granularity: Granularity
    timezone_offset: str = Field(description="The UTC offset of the local buckets.")
    items: list[TrendItem] = Field(description="Every bucket of the range, empty ones too.")


class BreakdownItem(_Out):
    id: str = Field(description="The dimension's value ('' for episodes without one).")
    name: str
    count: CountMetrics
    duration: DurationMetrics
    size: SizeMetrics


class ProductionBreakdown(_Out):
    dimension: Dimension
    items: list[BreakdownItem]
    total: int = Field(description="Distinct values of the dimension in the range.")
    limit: int
    offset: int
    has_next: bool = Field(serialization_alias="hasNext")
    has_prev: bool = Field(serialization_alias="hasPrev")


class DetailItem(_Out):
    id: str = Field(description="The episode's row id.")
    episode_id: str = Field(description="The episode's public id.")
    time: str = Field(description="Production time (recording start), UTC RFC 3339.")
    factory_id: str
    order_id: str
    batch_id: str
    workstation_id: str
    workstation_name: str
    source_id: str = Field(description="The recording device id.")
    source_name: str = Field(description="The robot's name, else its device id.")
    scene_id: str
    scene_name: str
    robot_device_id: str
    robot_type_id: str
    robot_type_name: str
    collector_operator_id: str
    collector_name: str
    task_id: str
    task_name: str
    sop_id: str
    sop: str = Field(description="`slug @ version` of the task's SOP.")
    data_type: str = Field(description="Always `episode`.")
    status: str = Field(description="success, failed or processing (see count).")
    qa_status: EpisodeStatus
    qa_score: float | None
    cloud_synced: bool
    count: int = Field(description="Always 1: one row is one episode.")
    duration_ms: int | None
    size_bytes: int | None
    error_code: str = Field(description="The failed episode's status (qa_failed, rejected).")
    error_message: str = Field(description="The failing QA checks of a failed episode.")


class ProductionDetails(_Out):
    items: list[DetailItem]
    total: int
    limit: int
    offset: int
    has_next: bool = Field(serialization_alias="hasNext")
    has_prev: bool = Field(serialization_alias="hasPrev")


# --- filters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProductionFilter:
    """Which episodes a data-production statistic covers (all given filters apply)."""

    start: dt.datetime
    end: dt.datetime
    factory_id: int | None = None
    order_id: int | None = None
    batch_id: int | None = None
    workstation_id: int | None = None
    skill_id: int | None = None
    scene_ids: tuple[int, ...] = ()
    sop_ids: tuple[int, ...] = ()
    robot_type_ids: tuple[int, ...] = ()
    robot_device_ids: tuple[str, ...] = ()
    collector_operator_ids: tuple[str, ...] = ()
    # Operator statistics: the calling data collector's own episodes only.
    data_collector_id: int | None = None
    qa_statuses: tuple[EpisodeStatus, ...] = ()
    cloud_synced: bool | None = None
    task_id: str | None = None


def check_factory(scope: Scope, factory_id: int | None) -> None:
    """Another factory's id is 404, as for its rows."""
    if factory_id is not None and not scope.can_see(factory_id):
        raise NotFoundError(f"factory {factory_id} not found")


def own_collector(scope: Scope) -> int:
    """The data collector behind a collector account (operator statistics)."""
    if scope.role is not Role.DATA_COLLECTOR:
        raise PermissionDeniedError("operator statistics are for data collectors", code="forbidden")
    if scope.data_collector_id is None:
        raise PermissionDeniedError(
            "this account is not linked to a data collector", code="collector_identity_missing"
        )
    return scope.data_collector_id


def _synced() -> ColumnElement[bool]:
    return exists().where(
        col(SyncJob.episode_id) == col(Episode.id), col(SyncJob.status) == SyncStatus.SYNCED
    )


def _episode_conditions(
    sqlite: bool, f: ProductionFilter, scope: Scope
) -> list[ColumnElement[bool]]:
    at = recorded_at(sqlite)
    # The first two use the (factory_id, recording_date) index; the exact instant follows.
    # recording_date is the UTC date of recorded_at, so it lies within these dates.
    where: list[ColumnElement[bool]] = [
        col(Episode.recording_date) >= f.start.date(),
        col(Episode.recording_date) <= f.end.date(),
        at >= f.start,
        at < f.end,
    ]
    if scope.factory_ids is not None:
        where.append(col(Episode.factory_id).in_(sorted(scope.factory_ids)))
    if f.factory_id is not None:
        where.append(col(Episode.factory_id) == f.factory_id)
    if f.order_id is not None:
        where.append(col(Episode.order_id) == f.order_id)
    if f.batch_id is not None:
        where.append(col(Episode.batch_id) == f.batch_id)
    if f.workstation_id is not None:
        where.append(col(Task.workstation_id) == f.workstation_id)
    if f.skill_id is not None:
        where.append(col(Task.skill_id) == f.skill_id)
    if f.scene_ids:
        where.append(col(Task.scene_id).in_(f.scene_ids))
    if f.sop_ids:
        where.append(col(Task.sop_id).in_(f.sop_ids))
    if f.robot_type_ids:
        where.append(
            col(Episode.robot_id).in_(
                select(col(Robot.id)).where(col(Robot.robot_type_id).in_(f.robot_type_ids))
            )
        )
    if f.robot_device_ids:
        where.append(col(Episode.device_id).in_(f.robot_device_ids))
    if f.collector_operator_ids:
        where.append(
            col(Task.data_collector_id).in_(
                select(col(DataCollector.id)).where(
                    col(DataCollector.operator_id).in_(f.collector_operator_ids)
                )
            )
        )
    if f.data_collector_id is not None:
        where.append(col(Task.data_collector_id) == f.data_collector_id)
    if f.qa_statuses:
        where.append(col(Episode.status).in_([s.value for s in f.qa_statuses]))
    if f.cloud_synced is not None:
        where.append(_synced() if f.cloud_synced else ~_synced())
    if f.task_id is not None:
        where.append(col(Task.task_id) == f.task_id)
    return where


Join = tuple[Any, ColumnElement[bool]]


def _records(
    sqlite: bool,
    f: ProductionFilter,
    scope: Scope,
    *extra: ColumnElement[Any],
    joins: Sequence[Join] = (),
) -> Select[Any]:
    """One row per episode in the filter: what the aggregates read, plus ``extra``."""
    query = (
        select(
            col(Episode.id).label("id"),
            col(Episode.status).label("status"),
            col(Episode.duration_sec).label("dur"),
            col(Episode.file_size_bytes).label("size"),
            case((_synced(), 1), else_=0).label("synced"),
            *extra,
        )
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
    )
    for target, onclause in joins:
        query = query.outerjoin(target, onclause)
    return query.where(*_episode_conditions(sqlite, f, scope))


def _aggregates(records: Any) -> list[ColumnElement[Any]]:
    c = records.c
    success = c.status.in_([s.value for s in SUCCESS])
    failed = c.status.in_([s.value for s in FAILED])
    return [
        func.count().label("total"),
        func.sum(case((success, 1), else_=0)).label("success"),
        func.sum(case((failed, 1), else_=0)).label("failed"),
        func.sum(case((c.status.in_([s.value for s in PROCESSING]), 1), else_=0)).label(
            "processing"
        ),
        func.sum(c.synced).label("synced"),
        func.sum(c.dur).label("dur_total"),
        func.avg(c.dur).label("dur_avg"),
        func.max(c.dur).label("dur_max"),
        func.sum(c.size).label("size_total"),
        func.sum(case((success, c.size), else_=0)).label("size_success"),
        func.sum(case((failed, c.size), else_=0)).label("size_failed"),
        func.avg(c.size).label("size_avg"),
        func.max(c.size).label("size_max"),
    ]


def _p95(session: Session, records: Any, group: str | None) -> dict[str, float]:
    """Nearest-rank 95th percentile of the durations, per ``group`` column (or overall,
    keyed ''): the smallest duration whose rank r has r ≥ 0.95·n."""
    c = records.c
    partition = [c[group]] if group else None
    key: ColumnElement[Any] = c[group] if group else literal("")
    ranked = (
        select(
            key.label("grp"),
            c.dur.label("dur"),
            func.row_number().over(partition_by=partition, order_by=c.dur).label("rn"),
            func.count().over(partition_by=partition).label("n"),
        )
        .where(c.dur.is_not(None))
        .subquery()
    )
    rows = session.execute(
        select(ranked.c.grp, func.min(ranked.c.dur))
        .where(ranked.c.rn * 100 >= ranked.c.n * 95)
        .group_by(ranked.c.grp)
    ).all()
    return {str(grp): float(value) for grp, value in rows if value is not None}


def _metrics(row: Any, p95_sec: float | None) -> tuple[CountMetrics, DurationMetrics, SizeMetrics]:
    total, success = int(row.total or 0), _int(row.success)
    count = CountMetrics(
        total=total,
        success=success,
        failed=_int(row.failed),
        processing=_int(row.processing),
        success_rate=rate(success, total),
    )
    duration = DurationMetrics(
        total_ms=_ms(row.dur_total),
        avg_ms=_ms(row.dur_avg),
        p95_ms=_ms(p95_sec),
        max_ms=_ms(row.dur_max),
    )
    size = SizeMetrics(
        total_bytes=_int(row.size_total),
        success_bytes=_int(row.size_success),
        failed_bytes=_int(row.size_failed),
        avg_bytes=_int(row.size_avg),
        max_bytes=_int(row.size_max),
    )
    return count, duration, size


# --- data production ------------------------------------------------------------------------


def summary(session: Session, scope: Scope, f: ProductionFilter) -> ProductionSummary:
    """Totals of the range, with the range just before it for comparison."""
    sqlite = _is_sqlite(session)
    records = _records(sqlite, f, scope).subquery()
    row = session.execute(select(*_aggregates(records))).one()
    p95 = _p95(session, records, None).get("")
    count, duration, size = _metrics(row, p95)
    span = f.end - f.start
    previous = replace(f, start=f.start - span, end=f.start)
    before = _records(sqlite, previous, scope).subquery()
    previous_total = int(session.execute(select(func.count()).select_from(before)).scalar_one())
    if previous_total:
        change = (count.total - previous_total) / previous_total
    else:
        change = 1.0 if count.total else 0.0
    synced = _int(row.synced)
    return ProductionSummary(
        start_time=f.start,
        end_time=f.end,
        count=count,
        duration=duration,
        size=size,
        qa=QAMetrics(
            approved=count.success, pass_rate=rate(count.success, count.success + count.failed)
        ),
        cloud_sync=CloudSyncMetrics(
            synced=synced, unsynced=count.total - synced, sync_rate=rate(synced, count.total)
        ),
        compare=CompareMetrics(previous_total_count=previous_total, count_change_rate=change),
    )


def trend(
    session: Session,
    scope: Scope,
    f: ProductionFilter,
    *,
    granularity: Granularity,
    offset_minutes: int,
) -> ProductionTrend:
    """The range's numbers per local hour, day, week or month (empty buckets included)."""
    sqlite = _is_sqlite(session)
    bucket = bucket_of(sqlite, recorded_at(sqlite), granularity, offset_minutes).label("bucket")
    records = _records(sqlite, f, scope, bucket).subquery()
    rows = {
        str(r.bucket): r
        for r in session.execute(
            select(records.c.bucket, *_aggregates(records)).group_by(records.c.bucket)
        ).all()
    }
    p95 = _p95(session, records, "bucket")
    items = []
    for key, starts in bucket_keys(f.start, f.end, granularity, offset_minutes):
        row = rows.get(key)
        if row is None:
            count, duration, size = _empty_metrics()
        else:
            count, duration, size = _metrics(row, p95.get(key))
        items.append(TrendItem(time=_iso(starts), count=count, duration=duration, size=size))
    return ProductionTrend(
        granularity=granularity, timezone_offset=format_offset(offset_minutes), items=items
    )


def _empty_metrics() -> tuple[CountMetrics, DurationMetrics, SizeMetrics]:
    return (
        CountMetrics(total=0, success=0, failed=0, processing=0, success_rate=0.0),
        DurationMetrics(total_ms=0, avg_ms=0, p95_ms=0, max_ms=0),
        SizeMetrics(total_bytes=0, success_bytes=0, failed_bytes=0, avg_bytes=0, max_bytes=0),
    )


def _text(column: Any) -> ColumnElement[str]:
    return func.coalesce(cast(column, String), "")


@dataclass(frozen=True)
class _Dimension:
    key: Any
    name: Any
    joins: tuple[Join, ...] = ()


def _sop_label(slug: Any, version: Any) -> ColumnElement[str]:
    return case(
        (slug.is_(None), ""),
        (func.coalesce(version, "") == "", slug),
        else_=slug + literal(" @ ") + version,
    )


def _dimension(name: Dimension) -> _Dimension:
    robot = (Robot, col(Robot.id) == col(Episode.robot_id))
    if name in ("source", "robot_device"):
        device = col(Episode.device_id)
        label = func.coalesce(func.nullif(col(Robot.name), ""), device)
        return _Dimension(device, label, (robot,))
    if name == "robot_type":
        return _Dimension(
            _text(col(Robot.robot_type_id)),
            func.coalesce(col(RobotType.name), ""),
            (robot, (RobotType, col(RobotType.id) == col(Robot.robot_type_id))),
        )
    if name == "collector":
        return _Dimension(
            func.coalesce(col(DataCollector.operator_id), ""),
            func.coalesce(col(DataCollector.name), ""),
            ((DataCollector, col(DataCollector.id) == col(Task.data_collector_id)),),
        )
    if name == "scene":
        return _Dimension(
            _text(col(Task.scene_id)),
            func.coalesce(col(Scene.name), ""),
            ((Scene, col(Scene.id) == col(Task.scene_id)),),
        )
    if name == "sop":
        return _Dimension(
            _text(col(Task.sop_id)),
            _sop_label(col(SOP.slug), col(SOP.version)),
            ((SOP, col(SOP.id) == col(Task.sop_id)),),
        )
    if name == "skill":
        return _Dimension(
            _text(col(Task.skill_id)),
            _sop_label(col(Skill.slug), col(Skill.version)),
            ((Skill, col(Skill.id) == col(Task.skill_id)),),
        )
    if name == "qa_status":
        status = cast(col(Episode.status), String)
        return _Dimension(status, status)
    if name == "cloud_synced":
        synced = _synced()
        return _Dimension(
            case((synced, "true"), else_="false"), case((synced, "synced"), else_="not synced")
        )
    if name == "factory":
        return _Dimension(
            _text(col(Episode.factory_id)),
            func.coalesce(col(Factory.name), ""),
            ((Factory, col(Factory.id) == col(Episode.factory_id)),),
        )
    if name == "order":
        return _Dimension(
            _text(col(Episode.order_id)),
            func.coalesce(col(Order.name), ""),
            ((Order, col(Order.id) == col(Episode.order_id)),),
        )
    if name == "batch":
        return _Dimension(
            _text(col(Episode.batch_id)),
            func.coalesce(func.nullif(col(Batch.name), ""), col(Batch.batch_id), ""),
            ((Batch, col(Batch.id) == col(Episode.batch_id)),),
        )
    if name == "workstation":
        return _Dimension(
            _text(col(Task.workstation_id)),
            func.coalesce(col(Workstation.name), ""),
            ((Workstation, col(Workstation.id) == col(Task.workstation_id)),),
        )
    raise ValidationFailed(f"unknown dimension {name!r}", code="invalid_dimension")


def breakdown(
    session: Session,
    scope: Scope,
    f: ProductionFilter,
    *,
    dimension: Dimension,
    limit: int,
    offset: int,
) -> ProductionBreakdown:
    """The range's numbers per value of ``dimension``: most episodes first (then most
    failed, then by id)."""
    sqlite = _is_sqlite(session)
    dim = _dimension(dimension)
    records = _records(
        sqlite, f, scope, dim.key.label("grp"), dim.name.label("grp_name"), joins=dim.joins
    ).subquery()
    total = int(
        session.execute(
            select(func.count()).select_from(
                select(records.c.grp).group_by(records.c.grp).subquery()
            )
        ).scalar_one()
    )
    aggregates = _aggregates(records)
    by_total, by_failed = aggregates[0], aggregates[2]
    rows = session.execute(
        select(records.c.grp, func.max(records.c.grp_name).label("grp_name"), *aggregates)
        .group_by(records.c.grp)
        .order_by(by_total.desc(), by_failed.desc(), records.c.grp)
        .limit(limit)
        .offset(offset)
    ).all()
    keys = [str(r.grp) for r in rows]
    p95: dict[str, float] = {}
    if keys:
        page = select(records.c.grp, records.c.dur).where(records.c.grp.in_(keys)).subquery()
        p95 = _p95(session, page, "grp")
    items = []
    for row in rows:
        count, duration, size = _metrics(row, p95.get(str(row.grp)))
        items.append(
            BreakdownItem(
                id=str(row.grp),
                name=str(row.grp_name or ""),
                count=count,
                duration=duration,
                size=size,
            )
        )
    return ProductionBreakdown(
        dimension=dimension,
        items=items,
        total=total,
        limit=limit,
        offset=offset,
        has_next=offset + limit < total,
        has_prev=offset > 0,
    )


def _detail_query(sqlite: bool, f: ProductionFilter, scope: Scope) -> Select[Any]:
    at = recorded_at(sqlite)
    return (
        select(
            col(Episode.id).label("id"),
            col(Episode.episode_id).label("episode_id"),
            at.label("recorded_at"),
            col(Episode.factory_id).label("factory_id"),
            col(Episode.order_id).label("order_id"),
            col(Episode.batch_id).label("batch_id"),
            col(Task.workstation_id).label("workstation_id"),
            col(Workstation.name).label("workstation_name"),
            col(Episode.device_id).label("device_id"),
            col(Robot.name).label("robot_name"),
            col(Robot.robot_type_id).label("robot_type_id"),
            col(RobotType.name).label("robot_type_name"),
            col(Task.scene_id).label("scene_id"),
            col(Scene.name).label("scene_name"),
            col(DataCollector.operator_id).label("operator_id"),
            col(DataCollector.name).label("collector_name"),
            col(Task.task_id).label("task_id"),
            col(Task.sop_id).label("sop_id"),
            _sop_label(col(SOP.slug), col(SOP.version)).label("sop"),
            col(Episode.status).label("status"),
            col(Episode.qa_score).label("qa_score"),
            _synced().label("cloud_synced"),
            col(Episode.duration_sec).label("duration_sec"),
            col(Episode.file_size_bytes).label("size_bytes"),
            col(Episode.quality_flag).label("quality_flag"),
        )
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .outerjoin(Workstation, col(Workstation.id) == col(Task.workstation_id))
        .outerjoin(Robot, col(Robot.id) == col(Episode.robot_id))
        .outerjoin(RobotType, col(RobotType.id) == col(Robot.robot_type_id))
        .outerjoin(Scene, col(Scene.id) == col(Task.scene_id))
        .outerjoin(DataCollector, col(DataCollector.id) == col(Task.data_collector_id))
        .outerjoin(SOP, col(SOP.id) == col(Task.sop_id))
        .where(*_episode_conditions(sqlite, f, scope))
    )


def production_status(status: EpisodeStatus) -> str:
    if status in SUCCESS:
        return "success"
    if status in FAILED:
        return "failed"
    return "processing"


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _detail(row: Any) -> DetailItem:
    status = EpisodeStatus(row.status)
    failed = status in FAILED
    device = _s(row.device_id)
    return DetailItem(
        id=str(row.id),
        episode_id=row.episode_id,
        time=_iso(row.recorded_at),
        factory_id=str(row.factory_id),
        order_id=str(row.order_id),
        batch_id=str(row.batch_id),
        workstation_id=_s(row.workstation_id),
        workstation_name=_s(row.workstation_name),
        source_id=device,
        source_name=row.robot_name or device,
        scene_id=_s(row.scene_id),
        scene_name=_s(row.scene_name),
        robot_device_id=device,
        robot_type_id=_s(row.robot_type_id),
        robot_type_name=_s(row.robot_type_name),
        collector_operator_id=_s(row.operator_id),
        collector_name=_s(row.collector_name),
        task_id=row.task_id,
        task_name=row.task_id,
        sop_id=_s(row.sop_id),
        sop=_s(row.sop),
        data_type="episode",
        status=production_status(status),
        qa_status=status,
        qa_score=row.qa_score,
        cloud_synced=bool(row.cloud_synced),
        count=1,
        duration_ms=None if row.duration_sec is None else _ms(row.duration_sec),
        size_bytes=row.size_bytes,
        error_code=status.value if failed else "",
        error_message=_s(row.quality_flag) if failed else "",
    )


def details(
    session: Session,
    scope: Scope,
    f: ProductionFilter,
    *,
    sort_by: DetailSort,
    descending: bool,
    limit: int,
    offset: int,
) -> ProductionDetails:
    """One page of the episodes behind the numbers."""
    sqlite = _is_sqlite(session)
    query = _detail_query(sqlite, f, scope)
    total = int(session.execute(select(func.count()).select_from(query.subquery())).scalar_one())
    key: Any = {
        "time": recorded_at(sqlite),
        "count": recorded_at(sqlite),  # every row counts 1: sorted by time
        "duration_ms": col(Episode.duration_sec),
        "size_bytes": col(Episode.file_size_bytes),
        "status": col(Episode.status),
        "qa_score": col(Episode.qa_score),
    }[sort_by]
    tie = col(Episode.id)
    order = (key.desc(), tie.desc()) if descending else (key.asc(), tie.asc())
    rows = session.execute(query.order_by(*order).limit(limit).offset(offset)).all()
    return ProductionDetails(
        items=[_detail(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        has_next=offset + limit < total,
        has_prev=offset > 0,
    )


EXPORT_COLUMNS = (
    "id",
    "time",
    "robot_device_id",
    "robot_type_name",
    "collector_operator_id",
    "collector_name",
    "task_id",
    "sop",
    "duration_sec",
    "size_bytes",
    "qa_status",
    "cloud_synced",
    "factory_id",
    "order_id",
    "batch_id",
    "workstation_name",
    "scene_name",
)


def _csv_line(values: Iterable[Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(values)
    return out.getvalue()


def export_csv(
    sessions: SessionScope,
    scope: Scope,
    f: ProductionFilter,
    *,
    offset_minutes: int,
    page_rows: int | None = None,
) -> Iterator[str]:
    """The detail rows as CSV text, newest production time first (as ``details``), read
    ``page_rows`` at a time: keyset on (time, id), one short transaction per page, each
    page's date range shrinking to what is left — an export of any size holds one page in
    memory and no connection between pages."""
    size = page_rows or EXPORT_PAGE_ROWS
    yield _csv_line(EXPORT_COLUMNS)
    shift = dt.timedelta(minutes=offset_minutes)
    last: tuple[dt.datetime, int] | None = None
    while True:
        with sessions() as session:
            sqlite = _is_sqlite(session)
            at = recorded_at(sqlite)
            query = _detail_query(sqlite, f, scope)
            if last is not None:
                last_at, last_id = last
                query = query.where(
                    col(Episode.recording_date) <= last_at.date(),
                    or_(at < last_at, and_(at == last_at, col(Episode.id) < last_id)),
                )
            rows = session.execute(
                query.order_by(at.desc(), col(Episode.id).desc()).limit(size)
            ).all()
        if not rows:
            return
        chunk = []
        for row in rows:
            local = clock.as_utc(row.recorded_at) + shift
            chunk.append(
                _csv_line(
                    (
                        row.episode_id,
                        local.strftime("%Y-%m-%d %H:%M:%S"),
                        _s(row.device_id),
                        _s(row.robot_type_name),
                        _s(row.operator_id),
                        _s(row.collector_name),
                        row.task_id,
                        _s(row.sop),
                        "" if row.duration_sec is None else f"{float(row.duration_sec):.3f}",
                        _s(row.size_bytes),
                        EpisodeStatus(row.status).value,
                        "true" if row.cloud_synced else "false",
                        row.factory_id,
                        row.order_id,
                        row.batch_id,
                        _s(row.workstation_name),
                        _s(row.scene_name),
                    )
                )
            )
        yield "".join(chunk)
        if len(rows) < size:
            return
        last = (clock.as_utc(rows[-1].recorded_at), int(rows[-1].id))


# --- quality dashboard ----------------------------------------------------------------------


class QualitySummary(_Out):
    total: int = Field(description="Episodes produced in the range.")
    pending_qa: int = Field(description="pending_qa + qa_running.")
    auto_approved: int
    needs_inspection: int
    qa_failed: int
    inspector_approved: int
    rejected: int
    approved: int = Field(description="auto_approved + inspector_approved.")
    qa_done: int = Field(description="Episodes QA has scored (every status but pending_qa).")
    pass_rate: float = Field(description="approved / (approved + qa_failed + rejected).")
    auto_approve_rate: float = Field(description="auto_approved / qa_done.")
    avg_score: float | None = Field(description="Mean qa_score of the scored episodes.")


class FailingCheck(_Out):
    name: str
    failed: int = Field(description="Episodes whose latest QA result failed this check.")
    rate: float = Field(description="failed / checked_episodes.")


class ThroughputDay(_Out):
    date: dt.date = Field(description="Local day of the decisions.")
    decided: int
    approved: int
    rejected: int


class InspectorThroughput(_Out):
    user_id: str = Field(description="The account that decided.")
    account: str
    display_name: str
    inspector_id: str = Field(description="The inspector row id ('' when not linked).")
    inspector_name: str
    decided: int
    approved: int
    rejected: int
    days: list[ThroughputDay]


class ScoreBucket(_Out):
    lower: float = Field(description="Inclusive.")
    upper: float = Field(description="Exclusive, except 1.0 for the last bucket.")
    count: int


class QualityDashboard(_Out):
    start_time: dt.datetime
    end_time: dt.datetime
    timezone_offset: str
    summary: QualitySummary
    checked_episodes: int = Field(description="Episodes in the range with a QA result.")
    failing_checks: list[FailingCheck] = Field(description="Most failed first.")
    inspectors: list[InspectorThroughput] = Field(
        description="Inspections decided in the range, per account, busiest first."
    )
    score_distribution: list[ScoreBucket]


def _latest_result() -> ColumnElement[bool]:
    """The joined QA result is its episode's newest (a correlated MAX on the episode index)."""
    newer = aliased(QAResult)
    latest = select(func.max(col(newer.id))).where(col(newer.episode_id) == col(Episode.id))
    return col(QAResult.id) == latest.scalar_subquery()


def _failing_checks(session: Session, sqlite: bool, where: list[ColumnElement[bool]]) -> Any:
    """Check name → episodes whose latest QA result has it with ``passed: false``.

    The checks are a JSON array on the result row; it is unnested in SQL (``json_each``
    on SQLite, ``JSON_TABLE`` on MariaDB/MySQL) so only (name, count) rows come back."""
    latest = (
        select(col(QAResult.checks).label("checks"))
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .join(QAResult, and_(col(QAResult.episode_id) == col(Episode.id), _latest_result()))
        .where(*where)
        .subquery("latest")
    )
    if sqlite:
        unnested = func.json_each(latest.c.checks).table_valued("value").alias("chk")
        name: Any = func.json_extract(unnested.c.value, "$.name")
        failed: Any = func.json_type(unnested.c.value, "$.passed") == "false"
    else:
        unnested = (
            func.json_table(
                latest.c.checks,
                literal_column(
                    "'$[*]' COLUMNS (name VARCHAR(128) PATH '$.name', "
                    "passed VARCHAR(8) PATH '$.passed')"
                ),
            )
            .table_valued("name", "passed")
            .alias("chk")
        )
        name = unnested.c.name
        failed = unnested.c.passed == "false"
    count = func.count().label("failed")
    return session.execute(
        select(name.label("name"), count)
        .select_from(latest)
        .join(unnested, true())
        .where(failed)
        .group_by(name)
        .order_by(count.desc(), name)
    ).all()


def quality_dashboard(
    session: Session, scope: Scope, f: ProductionFilter, *, offset_minutes: int
) -> QualityDashboard:
    """QA pass rate, failing checks, inspector throughput and the score histogram."""
    sqlite = _is_sqlite(session)
    where = _episode_conditions(sqlite, f, scope)
    base = select().select_from(Episode).join(Task, col(Task.id) == col(Episode.task_id))
    counts = {
        EpisodeStatus(status): int(n)
        for status, n in session.execute(
            base.add_columns(col(Episode.status), func.count())
            .where(*where)
            .group_by(col(Episode.status))
        ).all()
    }
    scored, avg_score = session.execute(
        base.add_columns(func.count(col(Episode.qa_score)), func.avg(col(Episode.qa_score))).where(
            *where
        )
    ).one()
    edges = [i / SCORE_BUCKETS for i in range(SCORE_BUCKETS + 1)]
    score = col(Episode.qa_score)
    histogram = session.execute(
        base.add_columns(
            *(
                func.sum(
                    case(
                        (
                            and_(
                                score >= edges[i],
                                score < edges[i + 1] if i < SCORE_BUCKETS - 1 else score <= 1.0,
                            ),
                            1,
                        ),
                        else_=0,
                    )
                )
                for i in range(SCORE_BUCKETS)
            )
        ).where(*where)
    ).one()
    checked = int(
        session.execute(
            base.add_columns(func.count()).where(
                *where, exists().where(col(QAResult.episode_id) == col(Episode.id))
            )
        ).scalar_one()
    )
    failing = _failing_checks(session, sqlite, where)

    def n(*statuses: EpisodeStatus) -> int:
        return sum(counts.get(s, 0) for s in statuses)

    total = sum(counts.values())
    approved = n(*SUCCESS)
    pending = n(*QA_PENDING)
    qa_done = total - n(EpisodeStatus.PENDING_QA)
    return QualityDashboard(
        start_time=f.start,
        end_time=f.end,
        timezone_offset=format_offset(offset_minutes),
        summary=QualitySummary(
            total=total,
            pending_qa=pending,
            auto_approved=n(EpisodeStatus.AUTO_APPROVED),
            needs_inspection=n(EpisodeStatus.NEEDS_INSPECTION),
            qa_failed=n(EpisodeStatus.QA_FAILED),
            inspector_approved=n(EpisodeStatus.INSPECTOR_APPROVED),
            rejected=n(EpisodeStatus.REJECTED),
            approved=approved,
            qa_done=qa_done,
            pass_rate=rate(approved, approved + n(*FAILED)),
            auto_approve_rate=rate(n(EpisodeStatus.AUTO_APPROVED), qa_done),
            avg_score=None if not scored else float(avg_score),
        ),
        checked_episodes=checked,
        failing_checks=[
            FailingCheck(name=_s(name), failed=int(k), rate=rate(int(k), checked))
            for name, k in failing
        ],
        inspectors=_throughput(session, sqlite, scope, f, offset_minutes),
        score_distribution=[
            ScoreBucket(lower=edges[i], upper=edges[i + 1], count=_int(histogram[i]))
            for i in range(SCORE_BUCKETS)
        ],
    )


def _throughput(
    session: Session, sqlite: bool, scope: Scope, f: ProductionFilter, offset_minutes: int
) -> list[InspectorThroughput]:
    """Decisions per account and local day, by when they were made (``decided_at``)."""
    decided = col(Inspection.decided_at)
    day = bucket_of(sqlite, decided, "day", offset_minutes).label("day")
    where: list[ColumnElement[bool]] = [
        decided.is_not(None),
        decided >= f.start,
        decided < f.end,
        col(Inspection.user_id).is_not(None),
    ]
    if scope.factory_ids is not None:
        where.append(col(Episode.factory_id).in_(sorted(scope.factory_ids)))
    if f.factory_id is not None:
        where.append(col(Episode.factory_id) == f.factory_id)
    rows = session.execute(
        select(
            col(Inspection.user_id),
            func.max(col(User.account)),
            func.max(col(User.display_name)),
            func.max(col(Inspection.inspector_id)),
            func.max(col(Inspector.name)),
            day,
            func.sum(case((col(Inspection.decision) == InspectionDecision.APPROVED, 1), else_=0)),
            func.sum(case((col(Inspection.decision) == InspectionDecision.REJECTED, 1), else_=0)),
        )
        .select_from(Inspection)
        .join(Episode, col(Episode.id) == col(Inspection.episode_id))
        .outerjoin(User, col(User.id) == col(Inspection.user_id))
        .outerjoin(Inspector, col(Inspector.id) == col(Inspection.inspector_id))
        .where(*where)
        .group_by(col(Inspection.user_id), day)
    ).all()
    people: dict[int, InspectorThroughput] = {}
    for user_id, account, display, inspector_id, inspector_name, on, ok, no in rows:
        person = people.get(int(user_id))
        if person is None:
            person = InspectorThroughput(
                user_id=str(user_id),
                account=_s(account),
                display_name=_s(display),
                inspector_id=_s(inspector_id),
                inspector_name=_s(inspector_name),
                decided=0,
                approved=0,
                rejected=0,
                days=[],
            )
            people[int(user_id)] = person
        approved, rejected = _int(ok), _int(no)
        person.days.append(
            ThroughputDay(
                date=dt.date.fromisoformat(str(on)),
                decided=approved + rejected,
                approved=approved,
                rejected=rejected,
            )
        )
        person.decided += approved + rejected
        person.approved += approved
        person.rejected += rejected
    for person in people.values():
        person.days.sort(key=lambda d: d.date)
    return sorted(people.values(), key=lambda p: (-p.decided, int(p.user_id)))


# --- production dashboard -----------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    """Go's dashboard parameters (the limits already clamped to their maxima)."""

    factory_id: int | None = None
    workstation_id: int | None = None
    organization_id: int | None = None
    timezone_offset: str | None = None
    trend_days: int = 7
    distribution_limit: int = 100
    active_limit: int = 20
    recent_limit: int = 10
    preview_limit: int = 8


class DashboardScope(_Out):
    role: Role
    factory_id: str = ""
    workstation_id: str = ""
    organization_id: str = ""
    warning: str = Field(
        default="", description="Why a collector's dashboard is empty (account not linked)."
    )


class TaskCounts(_Out):
    total: int = 0
    completed: int = 0
    in_progress: int = 0
    uploading: int = 0
    pending: int = 0
    ready: int = 0
    failed: int = 0
    cancelled: int = 0


class EpisodeCounts(_Out):
    total: int = 0
    pending_qa: int = 0
    qa_running: int = 0
    auto_approved: int = 0
    needs_inspection: int = 0
    qa_failed: int = 0
    inspector_approved: int = 0
    rejected: int = 0


class TaskTrendItem(_Out):
    date: str = Field(description="`MM-DD` of the local day (Synapse's label).")
    day: dt.date
    total: int = 0
    completed: int = 0
    in_progress: int = 0
    uploading: int = 0
    pending: int = Field(default=0, description="pending + ready.")
    failed: int = 0


class DistributionItem(_Out):
    id: str
    name: str
    value: int


class Distributions(_Out):
    scene: list[DistributionItem]
    sop: list[DistributionItem]


class DashboardQuality(_Out):
    pass_rate: float = Field(default=0.0, description="passed / total_inspected, percent.")
    total_inspected: int = Field(default=0, description="passed + failed + inspecting.")
    passed: int = Field(default=0, description="auto_approved + inspector_approved.")
    failed: int = Field(default=0, description="qa_failed + rejected.")
    inspecting: int = Field(default=0, description="needs_inspection.")
    pending_qa: int = Field(default=0, description="pending_qa + qa_running.")


class Queues(_Out):
    uploading: int = Field(default=0, description="Tasks in `uploading` (the upload queue).")
    awaiting_verification: int = Field(
        default=0, description="Reported uploads not yet verified into an episode."
    )
    qa_backlog: int = Field(default=0, description="Episodes in pending_qa or qa_running.")
    inspection_waiting: int = Field(default=0, description="Episodes in needs_inspection.")
    inspection_claimed: int = Field(default=0, description="…of them under a live claim.")
    sync_queued: int = 0
    sync_in_progress: int = 0
    sync_retry_wait: int = 0
    sync_failed: int = 0


class DeviceSummary(_Out):
    total: int = 0
    online: int = Field(default=0, description="Robots with a live recorder socket.")
    offline: int = 0
    online_rate: float = Field(default=0.0, description="Percent, one decimal.")


class SystemStatus(_Out):
    operating_days: int = Field(
        default=0, description="Local days since the first task was assigned (today is 1)."
    )
    total_data_duration_sec: float = 0.0
    online_stations: int = Field(default=0, description="Stations in status `active`.")


class TodayProduction(_Out):
    date: dt.date
    tasks_completed: int = 0
    episodes: int = 0
    duration_sec: float = 0.0
    size_bytes: int = 0
    approved: int = 0


class StationItem(_Out):
    id: str
    name: str
    status: str
    status_text: str
    collector_operator_id: str
    collector_name: str
    device_id: str
    device_model: str
    robot_name: str


class ActiveBatchItem(_Out):
    id: str
    batch_id: str
    order_id: str
    order_name: str
    scene_name: str
    workstation_id: str
    device_id: str
    collector_operator_id: str
    collector_name: str
    task_count: int
    completed_count: int
    failed_count: int
    cancelled_count: int


class ActiveTaskItem(_Out):
    id: str = Field(description="The task's public id.")
    sop_id: str
    sop_label: str
    scene_full: str = Field(description="`scene@subscene`.")
    device_id: str
    collector_operator_id: str
    collector_name: str


class Snapshot(_Out):
    generated_at: dt.datetime
    scope: DashboardScope
    timezone_offset: str
    tasks: TaskCounts
    episodes: EpisodeCounts
    trend: list[TaskTrendItem] = Field(description="Tasks by local day of assignment.")
    distributions: Distributions
    quality: DashboardQuality
    queues: Queues
    devices: DeviceSummary
    system: SystemStatus
    today: TodayProduction
    stations: list[StationItem]
    active_batches: list[ActiveBatchItem]
    active_tasks: list[ActiveTaskItem]


class OverviewSummary(_Out):
    total_tasks: int = 0
    total_episodes: int = 0
    today_tasks: int = Field(default=0, description="Tasks assigned today.")
    today_episodes: int = 0
    completed_tasks: int = Field(default=0, description="Tasks completed today.")
    in_progress_tasks: int = 0
    uploading_tasks: int = 0
    pending_tasks: int = 0
    failed_tasks: int = Field(default=0, description="Tasks that failed today.")
    cancelled_tasks: int = 0
    active_batches: int = 0
    active_stations: int = 0
    total_stations: int = 0
    robot_online_rate: float = 0.0
    quality_pass_rate: float = 0.0
    total_data_duration_sec: float = 0.0
    total_data_size_bytes: int = 0
    today_data_duration_sec: float = 0.0
    today_data_size_bytes: int = 0


class OverviewTrendItem(_Out):
    date: str = Field(description="`MM-DD` of the local day.")
    day: dt.date
    total: int = Field(description="Episodes produced that day.")
    approved: int
    rejected: int = Field(description="qa_failed + rejected.")
    duration_sec: float
    size_bytes: int


class OverviewPeriod(_Out):
    start_date: dt.date
    end_date: dt.date = Field(description="Inclusive (today).")
    days: int
    episodes: int
    duration_hours: float
    size_bytes: int
    approved: int
    rejected: int
    qa_failed: int
    pass_rate: float = Field(description="approved / (approved + rejected + qa_failed), %.")


class StatusDistributionItem(_Out):
    status: TaskStatus
    label: str
    value: int


class RecentFailure(_Out):
    id: str
    title: str = Field(description="The episode's public id.")
    reason: str
    created_at: str


class OverviewQuality(DashboardQuality):
    recent_failures: list[RecentFailure] = Field(default_factory=list)


class DevicesOverview(_Out):
    summary: DeviceSummary


class StationSummary(_Out):
    total: int = 0
    online: int = Field(default=0, description="active + inactive + break.")
    active: int = 0
    inactive: int = 0
    on_break: int = Field(default=0, alias="break")
    offline: int = 0
    online_rate: float = 0.0


class StationsOverview(_Out):
    summary: StationSummary


class RecentTaskItem(_Out):
    id: str
    task_id: str
    task_name: str
    status: TaskStatus
    status_text: str
    robot_name: str
    station_name: str
    batch_id: str
    scene_name: str
    sop_label: str
    episode_id: str
    created_at: str
    updated_at: str


class PreviewItem(_Out):
    id: str
    scene_name: str
    sop_label: str
    device_type: str
    device_id: str
    station_name: str
    status: str
    video_url: str
    preview_url: str = Field(description="Where to get a download link for the MCAP.")
    poster_url: str = Field(description="Download link route for the QA contact sheet, if any.")
    duration_seconds: float
    created_at: str
    episode_id: str
    task_id: str


class Overview(_Out):
    generated_at: dt.datetime
    scope: DashboardScope
    timezone_offset: str
    summary: OverviewSummary
    period: OverviewPeriod
    trend: list[OverviewTrendItem]
    task_status_distribution: list[StatusDistributionItem]
    quality: OverviewQuality
    devices: DevicesOverview
    stations: StationsOverview
    recent_tasks: list[RecentTaskItem]
    previews: list[PreviewItem]


@dataclass(frozen=True)
class _Where:
    """The dashboard's filters for each table it reads (factory scope, factory,
    workstation, organization, and a collector's own rows)."""

    scope: Scope
    q: DashboardQuery
    collector_id: int | None
    empty: bool

    def factory(self, column: Any) -> list[ColumnElement[bool]]:
        if self.empty:
            return [false()]
        out: list[ColumnElement[bool]] = []
        if self.scope.factory_ids is not None:
            out.append(column.in_(sorted(self.scope.factory_ids)))
        if self.q.factory_id is not None:
            out.append(column == self.q.factory_id)
        if self.q.organization_id is not None:
            out.append(
                column.in_(
                    select(col(Factory.id)).where(
                        col(Factory.organization_id) == self.q.organization_id
                    )
                )
            )
        return out

    def _stations(self) -> Select[Any]:
        query = select(col(Workstation.id)).where(col(Workstation.deleted_at).is_(None))
        if self.collector_id is not None:
            query = query.where(col(Workstation.data_collector_id) == self.collector_id)
        if self.q.workstation_id is not None:
            query = query.where(col(Workstation.id) == self.q.workstation_id)
        return query

    @property
    def narrowed(self) -> bool:
        return self.collector_id is not None or self.q.workstation_id is not None

    def tasks(self, *, live: bool = True) -> list[ColumnElement[bool]]:
        """``live``: without soft-deleted tasks (every count but the first-task day)."""
        out = [*self.factory(col(Task.factory_id))]
        if live:
            out.append(col(Task.deleted_at).is_(None))
        if self.collector_id is not None:
            out.append(col(Task.data_collector_id) == self.collector_id)
        if self.q.workstation_id is not None:
            out.append(col(Task.workstation_id) == self.q.workstation_id)
        return out

    def episodes(self) -> list[ColumnElement[bool]]:
        """For queries over episodes joined to their task."""
        out = self.factory(col(Episode.factory_id))
        if self.collector_id is not None:
            out.append(col(Task.data_collector_id) == self.collector_id)
        if self.q.workstation_id is not None:
            out.append(col(Task.workstation_id) == self.q.workstation_id)
        return out

    def stations(self) -> list[ColumnElement[bool]]:
        out = [col(Workstation.deleted_at).is_(None), *self.factory(col(Workstation.factory_id))]
        if self.narrowed:
            out.append(col(Workstation.id).in_(self._stations()))
        return out

    def robots(self) -> list[ColumnElement[bool]]:
        out = [col(Robot.deleted_at).is_(None), *self.factory(col(Robot.factory_id))]
        if self.narrowed:
            bound = self._stations().with_only_columns(col(Workstation.robot_id))
            out.append(col(Robot.id).in_(bound))
        return out

    def batches(self) -> list[ColumnElement[bool]]:
        out = [col(Batch.deleted_at).is_(None), *self.factory(col(Batch.factory_id))]
        if self.narrowed:
            out.append(col(Batch.workstation_id).in_(self._stations()))
        return out

    def episode_ids(self) -> Select[Any]:
        return (
            select(col(Episode.id))
            .join(Task, col(Task.id) == col(Episode.task_id))
            .where(*self.episodes())
        )


def _dashboard_where(scope: Scope, q: DashboardQuery) -> tuple[_Where, DashboardScope]:
    check_factory(scope, q.factory_id)
    out = DashboardScope(
        role=scope.role,
        factory_id=_s(q.factory_id),
        workstation_id=_s(q.workstation_id),
        organization_id=_s(q.organization_id),
    )
    collector_id, empty = None, False
    if scope.role is Role.DATA_COLLECTOR:
        # A collector's dashboard shows its own work only (Go: its workstation's).
        collector_id = scope.data_collector_id
        if collector_id is None:
            empty = True
            out.warning = "account not linked to a data collector"
    return _Where(scope, q, collector_id, empty), out


def _task_counts(session: Session, where: _Where) -> TaskCounts:
    rows = session.execute(
        select(col(Task.status), func.count()).where(*where.tasks()).group_by(col(Task.status))
    ).all()
    counts = {TaskStatus(s): int(n) for s, n in rows}
    return TaskCounts(
        total=sum(counts.values()),
        **{s.value: counts.get(s, 0) for s in TaskStatus},
    )


@dataclass(frozen=True)
class _EpisodeTotals:
    counts: dict[EpisodeStatus, int]
    duration_sec: float
    size_bytes: int


def _episode_totals(session: Session, where: _Where, *extra: ColumnElement[bool]) -> _EpisodeTotals:
    rows = session.execute(
        select(
            col(Episode.status),
            func.count(),
            func.sum(col(Episode.duration_sec)),
            func.sum(col(Episode.file_size_bytes)),
        )
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .where(*where.episodes(), *extra)
        .group_by(col(Episode.status))
    ).all()
    return _EpisodeTotals(
        counts={EpisodeStatus(s): int(n) for s, n, _d, _b in rows},
        duration_sec=float(sum(float(d or 0) for _s, _n, d, _b in rows)),
        size_bytes=sum(_int(b) for _s, _n, _d, b in rows),
    )


def _quality(totals: _EpisodeTotals) -> DashboardQuality:
    c = totals.counts
    passed = sum(c.get(s, 0) for s in SUCCESS)
    failed = sum(c.get(s, 0) for s in FAILED)
    inspecting = c.get(EpisodeStatus.NEEDS_INSPECTION, 0)
    inspected = passed + failed + inspecting
    return DashboardQuality(
        pass_rate=percent(passed, inspected),
        total_inspected=inspected,
        passed=passed,
        failed=failed,
        inspecting=inspecting,
        pending_qa=sum(c.get(s, 0) for s in QA_PENDING),
    )


def _days(offset: int, trend_days: int, now: dt.datetime) -> list[dt.date]:
    today = local_today(offset, now)
    return [today - dt.timedelta(days=trend_days - 1 - i) for i in range(trend_days)]


def _task_trend(
    session: Session, where: _Where, sqlite: bool, offset: int, days: list[dt.date]
) -> list[TaskTrendItem]:
    start, _ = local_day_window(offset, days[0])
    _, end = local_day_window(offset, days[-1])
    assigned = col(Task.assigned_at)
    day = bucket_of(sqlite, assigned, "day", offset).label("day")
    rows = session.execute(
        select(day, col(Task.status), func.count())
        .where(*where.tasks(), assigned >= start, assigned < end)
        .group_by(day, col(Task.status))
    ).all()
    per_day: dict[str, dict[TaskStatus, int]] = {}
    for on, status, n in rows:
        per_day.setdefault(str(on), {})[TaskStatus(status)] = int(n)
    items = []
    for d in days:
        c = per_day.get(d.isoformat(), {})
        item = TaskTrendItem(
            date=d.strftime("%m-%d"),
            day=d,
            completed=c.get(TaskStatus.COMPLETED, 0),
            in_progress=c.get(TaskStatus.IN_PROGRESS, 0),
            uploading=c.get(TaskStatus.UPLOADING, 0),
            pending=c.get(TaskStatus.PENDING, 0) + c.get(TaskStatus.READY, 0),
            failed=c.get(TaskStatus.FAILED, 0),
        )
        # Go's total: the five shown series (cancelled tasks are not in the trend).
        item.total = item.completed + item.in_progress + item.uploading + item.pending + item.failed
        items.append(item)
    return items


def _distribution(
    session: Session, where: _Where, kind: Literal["scene", "sop"], limit: int
) -> list[DistributionItem]:
    if kind == "scene":
        key: Any = col(Task.scene_id)
        label: ColumnElement[Any] = func.coalesce(col(Scene.name), "")
        join: Join = (Scene, col(Scene.id) == col(Task.scene_id))
    else:
        key = col(Task.sop_id)
        label = _sop_label(col(SOP.slug), col(SOP.version))
        join = (SOP, col(SOP.id) == col(Task.sop_id))
    value = func.count().label("value")
    rows = session.execute(
        select(key, func.max(label), value)
        .select_from(Task)
        .outerjoin(*join)
        .where(*where.tasks())
        .group_by(key)
        .order_by(value.desc(), key)
        .limit(limit)
    ).all()
    return [
        DistributionItem(id=_s(k), name=_s(name) or "Unclassified", value=int(n))
        for k, name, n in rows
    ]


def _queues(session: Session, where: _Where, tasks: TaskCounts, totals: _EpisodeTotals) -> Queues:
    now = clock.now()
    sync = {
        SyncStatus(s): int(n)
        for s, n in session.execute(
            select(col(SyncJob.status), func.count())
            .where(
                *where.factory(col(SyncJob.factory_id)),
                *([col(SyncJob.episode_id).in_(where.episode_ids())] if where.narrowed else []),
                col(SyncJob.status).in_([s.value for s in SYNC_OPEN]),
            )
            .group_by(col(SyncJob.status))
        ).all()
    }
    unverified: list[ColumnElement[bool]] = [
        *where.factory(col(DeviceUpload.factory_id)),
        col(DeviceUpload.verified_at).is_(None),
        col(DeviceUpload.orphan).is_(False),
        col(DeviceUpload.status).not_in(("failed", "not_found", "rejected")),
    ]
    if where.narrowed:
        unverified.append(
            col(DeviceUpload.robot_id).in_(select(col(Robot.id)).where(*where.robots()))
        )
    awaiting = int(
        session.execute(
            select(func.count()).select_from(DeviceUpload).where(*unverified)
        ).scalar_one()
    )
    claimed = int(
        session.execute(
            select(func.count())
            .select_from(Episode)
            .join(Task, col(Task.id) == col(Episode.task_id))
            .where(
                *where.episodes(),
                col(Episode.status) == EpisodeStatus.NEEDS_INSPECTION,
                exists().where(
                    col(Inspection.episode_id) == col(Episode.id),
                    col(Inspection.decided_at).is_(None),
                    col(Inspection.lease_expires_at) > now,
                ),
            )
        ).scalar_one()
    )
    c = totals.counts
    return Queues(
        uploading=tasks.uploading,
        awaiting_verification=awaiting,
        qa_backlog=sum(c.get(s, 0) for s in QA_PENDING),
        inspection_waiting=c.get(EpisodeStatus.NEEDS_INSPECTION, 0),
        inspection_claimed=claimed,
        sync_queued=sync.get(SyncStatus.QUEUED, 0),
        sync_in_progress=sync.get(SyncStatus.IN_PROGRESS, 0),
        sync_retry_wait=sync.get(SyncStatus.RETRY_WAIT, 0),
        sync_failed=sync.get(SyncStatus.FAILED, 0),
    )


def _devices(session: Session, where: _Where, heartbeat_s: float) -> DeviceSummary:
    """Robots in scope and how many hold a live recorder socket (a row refreshed within
    three heartbeats, as :func:`keystone_core.services.presence.is_live` counts it)."""
    fresh = clock.now() - dt.timedelta(seconds=3 * heartbeat_s)
    live = exists().where(
        col(DeviceConnection.robot_id) == col(Robot.id),
        col(DeviceConnection.channel) == "recorder",
        col(DeviceConnection.disconnected_at).is_(None),
        col(DeviceConnection.last_seen_at) > fresh,
    )
    total, online = session.execute(
        select(func.count(), func.sum(case((live, 1), else_=0))).where(*where.robots())
    ).one()
    total, online = int(total), _int(online)
    return DeviceSummary(
        total=total, online=online, offline=total - online, online_rate=percent(online, total)
    )


def _stations(session: Session, where: _Where) -> list[StationItem]:
    order = case(
        (col(Workstation.status) == "active", 0),
        (col(Workstation.status) == "inactive", 1),
        (col(Workstation.status) == "break", 2),
        (col(Workstation.status) == "offline", 3),
        else_=9,
    )
    rows = session.execute(
        select(
            col(Workstation.id),
            col(Workstation.name),
            col(Workstation.status),
            col(DataCollector.operator_id),
            col(DataCollector.name),
            col(Robot.device_id),
            col(RobotType.model),
            col(Robot.name),
        )
        .select_from(Workstation)
        .outerjoin(DataCollector, col(DataCollector.id) == col(Workstation.data_collector_id))
        .outerjoin(Robot, col(Robot.id) == col(Workstation.robot_id))
        .outerjoin(RobotType, col(RobotType.id) == col(Robot.robot_type_id))
        .where(*where.stations())
        .order_by(order, col(Workstation.id))
    ).all()
    return [
        StationItem(
            id=str(sid),
            name=name,
            status=status,
            status_text=STATION_STATUS_LABELS.get(status, status),
            collector_operator_id=_s(operator),
            collector_name=_s(collector),
            device_id=_s(device),
            device_model=_s(model),
            robot_name=_s(robot_name),
        )
        for sid, name, status, operator, collector, device, model, robot_name in rows
    ]


def _active_batch_count(session: Session, where: _Where) -> int:
    active = [*where.batches(), col(Batch.status) == BatchStatus.ACTIVE]
    return int(session.execute(select(func.count()).select_from(Batch).where(*active)).scalar_one())


def _active_batches(session: Session, where: _Where, limit: int) -> list[ActiveBatchItem]:
    active = [*where.batches(), col(Batch.status) == BatchStatus.ACTIVE]
    newest = (
        select(col(Batch.id))
        .where(*active)
        .order_by(
            func.coalesce(col(Batch.started_at), col(Batch.created_at)).desc(), col(Batch.id).desc()
        )
        .limit(limit)
        .subquery()
    )
    tally = (
        select(
            col(Task.batch_id).label("batch_id"),
            func.count().label("tasks"),
            func.sum(case((col(Task.status) == TaskStatus.COMPLETED, 1), else_=0)).label("done"),
            func.sum(case((col(Task.status) == TaskStatus.FAILED, 1), else_=0)).label("failed"),
            func.sum(case((col(Task.status) == TaskStatus.CANCELLED, 1), else_=0)).label(
                "cancelled"
            ),
        )
        .where(col(Task.deleted_at).is_(None), col(Task.batch_id).in_(select(newest.c.id)))
        .group_by(col(Task.batch_id))
        .subquery()
    )
    rows = session.execute(
        select(
            col(Batch.id),
            col(Batch.batch_id),
            col(Batch.order_id),
            col(Order.name),
            col(Scene.name),
            col(Batch.workstation_id),
            col(Robot.device_id),
            col(DataCollector.operator_id),
            col(DataCollector.name),
            tally.c.tasks,
            tally.c.done,
            tally.c.failed,
            tally.c.cancelled,
        )
        .select_from(Batch)
        .join(newest, newest.c.id == col(Batch.id))
        .join(Order, col(Order.id) == col(Batch.order_id))
        .outerjoin(Scene, col(Scene.id) == col(Order.scene_id))
        .outerjoin(Workstation, col(Workstation.id) == col(Batch.workstation_id))
        .outerjoin(Robot, col(Robot.id) == col(Workstation.robot_id))
        .outerjoin(DataCollector, col(DataCollector.id) == col(Workstation.data_collector_id))
        .outerjoin(tally, tally.c.batch_id == col(Batch.id))
        .order_by(
            func.coalesce(col(Batch.started_at), col(Batch.created_at)).desc(), col(Batch.id).desc()
        )
    ).all()
    return [
        ActiveBatchItem(
            id=str(r[0]),
            batch_id=r[1],
            order_id=str(r[2]),
            order_name=_s(r[3]),
            scene_name=_s(r[4]),
            workstation_id=_s(r[5]),
            device_id=_s(r[6]),
            collector_operator_id=_s(r[7]),
            collector_name=_s(r[8]),
            task_count=_int(r[9]),
            completed_count=_int(r[10]),
            failed_count=_int(r[11]),
            cancelled_count=_int(r[12]),
        )
        for r in rows
    ]


def _scene_full(scene: Any, subscene: Any) -> str:
    parts = [p for p in (_s(scene).strip(), _s(subscene).strip()) if p]
    return "@".join(parts) if parts else "-"


def _active_tasks(session: Session, where: _Where, limit: int) -> list[ActiveTaskItem]:
    rows = session.execute(
        select(
            col(Task.task_id),
            col(Task.sop_id),
            _sop_label(col(SOP.slug), col(SOP.version)),
            col(Scene.name),
            col(Subscene.name),
            col(Robot.device_id),
            col(DataCollector.operator_id),
            col(DataCollector.name),
        )
        .select_from(Task)
        .outerjoin(SOP, col(SOP.id) == col(Task.sop_id))
        .outerjoin(Scene, col(Scene.id) == col(Task.scene_id))
        .outerjoin(Subscene, col(Subscene.id) == col(Task.subscene_id))
        .outerjoin(Robot, col(Robot.id) == col(Task.robot_id))
        .outerjoin(DataCollector, col(DataCollector.id) == col(Task.data_collector_id))
        .where(*where.tasks(), col(Task.status) == TaskStatus.IN_PROGRESS)
        .order_by(
            func.coalesce(col(Task.started_at), col(Task.assigned_at), col(Task.created_at)).desc(),
            col(Task.id).desc(),
        )
        .limit(limit)
    ).all()
    return [
        ActiveTaskItem(
            id=task_id,
            sop_id=_s(sop_id),
            sop_label=_s(sop) or "Unclassified",
            scene_full=_scene_full(scene, subscene),
            device_id=_s(device),
            collector_operator_id=_s(operator),
            collector_name=_s(collector),
        )
        for task_id, sop_id, sop, scene, subscene, device, operator, collector in rows
    ]


def _first_task_day(session: Session, where: _Where, offset: int) -> dt.date | None:
    """The local day production began: the first task ever assigned (deleted ones too, so
    ``MIN`` is read off the (factory_id, assigned_at) index)."""
    first = session.execute(
        select(func.min(col(Task.assigned_at))).where(*where.tasks(live=False))
    ).scalar()
    if first is None:
        return None
    return (clock.as_utc(first) + dt.timedelta(minutes=offset)).date()


def _today(
    session: Session, where: _Where, sqlite: bool, offset: int, now: dt.datetime
) -> tuple[TodayProduction, _EpisodeTotals]:
    day = local_today(offset, now)
    start, end = local_day_window(offset, day)
    produced = _episode_totals(
        session,
        where,
        col(Episode.recording_date) >= start.date(),
        col(Episode.recording_date) <= end.date(),
        recorded_at(sqlite) >= start,
        recorded_at(sqlite) < end,
    )
    completed = int(
        session.execute(
            select(func.count()).where(
                *where.tasks(),
                col(Task.status) == TaskStatus.COMPLETED,
                col(Task.completed_at) >= start,
                col(Task.completed_at) < end,
            )
        ).scalar_one()
    )
    return (
        TodayProduction(
            date=day,
            tasks_completed=completed,
            episodes=sum(produced.counts.values()),
            duration_sec=produced.duration_sec,
            size_bytes=produced.size_bytes,
            approved=sum(produced.counts.get(s, 0) for s in SUCCESS),
        ),
        produced,
    )


def snapshot(session: Session, scope: Scope, q: DashboardQuery, *, heartbeat_s: float) -> Snapshot:
    """The factory right now: live counts, queues, devices, stations, today's production."""
    now = clock.now()
    where, shown = _dashboard_where(scope, q)
    sqlite = _is_sqlite(session)
    offset = local_offset(session, scope, explicit=q.timezone_offset, factory_id=q.factory_id)
    tasks = _task_counts(session, where)
    totals = _episode_totals(session, where)
    stations = _stations(session, where)
    first = _first_task_day(session, where, offset)
    today, _produced = _today(session, where, sqlite, offset, now)
    batches = _active_batches(session, where, q.active_limit)
    return Snapshot(
        generated_at=now,
        scope=shown,
        timezone_offset=format_offset(offset),
        tasks=tasks,
        episodes=EpisodeCounts(
            total=sum(totals.counts.values()),
            **{s.value: totals.counts.get(s, 0) for s in EpisodeStatus},
        ),
        trend=_task_trend(session, where, sqlite, offset, _days(offset, q.trend_days, now)),
        distributions=Distributions(
            scene=_distribution(session, where, "scene", q.distribution_limit),
            sop=_distribution(session, where, "sop", q.distribution_limit),
        ),
        quality=_quality(totals),
        queues=_queues(session, where, tasks, totals),
        devices=_devices(session, where, heartbeat_s),
        system=SystemStatus(
            operating_days=0 if first is None else (local_today(offset, now) - first).days + 1,
            total_data_duration_sec=totals.duration_sec,
            online_stations=sum(1 for s in stations if s.status == "active"),
        ),
        today=today,
        stations=stations,
        active_batches=batches,
        active_tasks=_active_tasks(session, where, q.active_limit),
    )


def _overview_trend(
    session: Session, where: _Where, sqlite: bool, offset: int, days: list[dt.date]
) -> list[OverviewTrendItem]:
    start, _ = local_day_window(offset, days[0])
    _, end = local_day_window(offset, days[-1])
    at = recorded_at(sqlite)
    day = bucket_of(sqlite, at, "day", offset).label("day")
    success = col(Episode.status).in_([s.value for s in SUCCESS])
    failed = col(Episode.status).in_([s.value for s in FAILED])
    rows = session.execute(
        select(
            day,
            func.count(),
            func.sum(case((success, 1), else_=0)),
            func.sum(case((failed, 1), else_=0)),
            func.sum(col(Episode.duration_sec)),
            func.sum(col(Episode.file_size_bytes)),
        )
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .where(
            *where.episodes(),
            col(Episode.recording_date) >= start.date(),
            col(Episode.recording_date) <= end.date(),
            at >= start,
            at < end,
        )
        .group_by(day)
    ).all()
    by_day = {str(r[0]): r for r in rows}
    items = []
    for d in days:
        r = by_day.get(d.isoformat())
        items.append(
            OverviewTrendItem(
                date=d.strftime("%m-%d"),
                day=d,
                total=int(r[1]) if r else 0,
                approved=_int(r[2]) if r else 0,
                rejected=_int(r[3]) if r else 0,
                duration_sec=float(r[4] or 0) if r else 0.0,
                size_bytes=_int(r[5]) if r else 0,
            )
        )
    return items


def _recent_failures(session: Session, where: _Where, limit: int) -> list[RecentFailure]:
    rows = session.execute(
        select(
            col(Episode.id),
            col(Episode.episode_id),
            col(Episode.quality_flag),
            col(Episode.updated_at),
        )
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .where(*where.episodes(), col(Episode.status).in_([s.value for s in FAILED]))
        .order_by(col(Episode.updated_at).desc(), col(Episode.id).desc())
        .limit(limit)
    ).all()
    return [
        RecentFailure(id=str(pk), title=public, reason=_s(flag), created_at=_iso(at))
        for pk, public, flag, at in rows
    ]


def _recent_tasks(session: Session, where: _Where, limit: int) -> list[RecentTaskItem]:
    changed = func.coalesce(col(Task.updated_at), col(Task.created_at))
    rows = session.execute(
        select(
            col(Task.id),
            col(Task.task_id),
            col(Task.status),
            col(Robot.name),
            col(Robot.device_id),
            col(Workstation.name),
            col(Batch.batch_id),
            col(Scene.name),
            col(Subscene.name),
            _sop_label(col(SOP.slug), col(SOP.version)),
            col(Episode.episode_id),
            col(Task.created_at),
            col(Task.updated_at),
        )
        .select_from(Task)
        .join(Batch, col(Batch.id) == col(Task.batch_id))
        .outerjoin(Robot, col(Robot.id) == col(Task.robot_id))
        .outerjoin(Workstation, col(Workstation.id) == col(Task.workstation_id))
        .outerjoin(Scene, col(Scene.id) == col(Task.scene_id))
        .outerjoin(Subscene, col(Subscene.id) == col(Task.subscene_id))
        .outerjoin(SOP, col(SOP.id) == col(Task.sop_id))
        .outerjoin(Episode, col(Episode.task_id) == col(Task.id))
        .where(*where.tasks())
        .order_by(changed.desc(), col(Task.id).desc())
        .limit(limit)
    ).all()
    out = []
    for (
        pk,
        task_id,
        status,
        robot,
        device,
        station,
        batch,
        scene,
        sub,
        sop,
        episode,
        made,
        moved,
    ) in rows:
        status = TaskStatus(status)
        name = _scene_full(scene, sub).replace("@", " / ")
        out.append(
            RecentTaskItem(
                id=str(pk),
                task_id=task_id,
                task_name=name if name != "-" else (_s(sop) or task_id),
                status=status,
                status_text=TASK_STATUS_LABELS[status],
                robot_name=_s(robot) or _s(device),
                station_name=_s(station),
                batch_id=_s(batch),
                scene_name=_s(scene),
                sop_label=_s(sop) or "Unclassified",
                episode_id=_s(episode),
                created_at=_iso(made),
                updated_at=_iso(moved),
            )
        )
    return out


def _previews(session: Session, where: _Where, limit: int) -> list[PreviewItem]:
    rows = session.execute(
        select(
            col(Episode.id),
            col(Scene.name),
            col(Subscene.name),
            _sop_label(col(SOP.slug), col(SOP.version)),
            col(RobotType.name),
            col(Episode.device_id),
            col(Workstation.name),
            col(Episode.status),
            col(Episode.duration_sec),
            col(Episode.created_at),
            col(Episode.episode_id),
            col(Task.task_id),
            col(Episode.meta),
        )
        .select_from(Episode)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .outerjoin(Scene, col(Scene.id) == col(Task.scene_id))
        .outerjoin(Subscene, col(Subscene.id) == col(Task.subscene_id))
        .outerjoin(SOP, col(SOP.id) == col(Task.sop_id))
        .outerjoin(Robot, col(Robot.id) == col(Episode.robot_id))
        .outerjoin(RobotType, col(RobotType.id) == col(Robot.robot_type_id))
        .outerjoin(Workstation, col(Workstation.id) == col(Task.workstation_id))
        .where(*where.episodes())
        .order_by(col(Episode.created_at).desc(), col(Episode.id).desc())
        .limit(limit)
    ).all()
    out = []
    for pk, scene, sub, sop, rtype, device, station, status, dur, made, public, task, meta in rows:
        link = f"/api/v1/episodes/{pk}/presign"
        has_sheet = isinstance(meta, dict) and bool(meta.get("preview"))
        out.append(
            PreviewItem(
                id=str(pk),
                scene_name=_scene_full(scene, sub).replace("@", " / "),
                sop_label=_s(sop) or "Unclassified",
                device_type=_s(rtype),
                device_id=_s(device),
                station_name=_s(station),
                status=EpisodeStatus(status).value,
                video_url="",
                preview_url=f"{link}?kind=mcap",
                poster_url=f"{link}?kind=contact_sheet" if has_sheet else "",
                duration_seconds=float(dur or 0.0),
                created_at=_iso(made),
                episode_id=public,
                task_id=task,
            )
        )
    return out


def overview(session: Session, scope: Scope, q: DashboardQuery, *, heartbeat_s: float) -> Overview:
    """The big screen: all-time and today's totals, the last ``trend_days`` local days,
    quality, devices, stations, recent tasks and previews."""
    now = clock.now()
    where, shown = _dashboard_where(scope, q)
    sqlite = _is_sqlite(session)
    offset = local_offset(session, scope, explicit=q.timezone_offset, factory_id=q.factory_id)
    days = _days(offset, q.trend_days, now)
    tasks = _task_counts(session, where)
    totals = _episode_totals(session, where)
    today, produced = _today(session, where, sqlite, offset, now)
    start, end = local_day_window(offset, today.date)
    assigned = col(Task.assigned_at)
    today_assigned = session.execute(
        select(func.count()).where(*where.tasks(), assigned >= start, assigned < end)
    ).scalar_one()
    # Failed is final: its last change is when it failed.
    today_failed = session.execute(
        select(func.count()).where(
            *where.tasks(),
            col(Task.status) == TaskStatus.FAILED,
            col(Task.updated_at) >= start,
            col(Task.updated_at) < end,
        )
    ).scalar_one()
    trend = _overview_trend(session, where, sqlite, offset, days)
    quality = _quality(totals)
    devices = _devices(session, where, heartbeat_s)
    stations = _stations(session, where)
    station_summary = StationSummary(total=len(stations))
    for station in stations:
        if station.status == "active":
            station_summary.active += 1
        elif station.status == "inactive":
            station_summary.inactive += 1
        elif station.status == "break":
            station_summary.on_break += 1
        else:
            station_summary.offline += 1
    station_summary.online = (
        station_summary.active + station_summary.inactive + station_summary.on_break
    )
    station_summary.online_rate = percent(station_summary.online, station_summary.total)
    active_count = _active_batch_count(session, where)
    period_start = local_day_window(offset, days[0])[0]
    period = _episode_totals(
        session,
        where,
        col(Episode.recording_date) >= period_start.date(),
        col(Episode.recording_date) <= end.date(),
        recorded_at(sqlite) >= period_start,
        recorded_at(sqlite) < end,
    )
    approved = sum(period.counts.get(s, 0) for s in SUCCESS)
    rejected = period.counts.get(EpisodeStatus.REJECTED, 0)
    qa_failed = period.counts.get(EpisodeStatus.QA_FAILED, 0)
    return Overview(
        generated_at=now,
        scope=shown,
        timezone_offset=format_offset(offset),
        summary=OverviewSummary(
            total_tasks=tasks.total,
            total_episodes=sum(totals.counts.values()),
            today_tasks=_int(today_assigned),
            today_episodes=today.episodes,
            completed_tasks=today.tasks_completed,
            in_progress_tasks=tasks.in_progress,
            uploading_tasks=tasks.uploading,
            pending_tasks=tasks.pending,
            failed_tasks=_int(today_failed),
            cancelled_tasks=tasks.cancelled,
            active_batches=active_count,
            active_stations=station_summary.active,
            total_stations=station_summary.total,
            robot_online_rate=devices.online_rate,
            quality_pass_rate=quality.pass_rate,
            total_data_duration_sec=totals.duration_sec,
            total_data_size_bytes=totals.size_bytes,
            today_data_duration_sec=produced.duration_sec,
            today_data_size_bytes=produced.size_bytes,
        ),
        period=OverviewPeriod(
            start_date=days[0],
            end_date=days[-1],
            days=len(days),
            episodes=sum(period.counts.values()),
            duration_hours=period.duration_sec / 3600,
            size_bytes=period.size_bytes,
            approved=approved,
            rejected=rejected,
            qa_failed=qa_failed,
            pass_rate=percent(approved, approved + rejected + qa_failed),
        ),
        trend=trend,
        task_status_distribution=[
            StatusDistributionItem(status=s, label=TASK_STATUS_LABELS[s], value=v)
            for s in (
                TaskStatus.PENDING,
                TaskStatus.READY,
                TaskStatus.IN_PROGRESS,
                TaskStatus.UPLOADING,
                TaskStatus.COMPLETED,
                TaskStatus.FAILED,
                TaskStatus.CANCELLED,
            )
            if (v := getattr(tasks, s.value)) > 0
        ],
        quality=OverviewQuality(
            **quality.model_dump(),
            recent_failures=_recent_failures(session, where, q.recent_limit),
        ),
        devices=DevicesOverview(summary=devices),
        stations=StationsOverview(summary=station_summary),
        recent_tasks=_recent_tasks(session, where, q.recent_limit),
        previews=_previews(session, where, q.preview_limit),
    )
