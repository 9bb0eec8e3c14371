"""Statistics on SQLite: the dialect's own bucketing (strftime/date modifiers), the
recording-date fallback, json_each over QA checks, the window-function p95, and the pure
range and offset rules. MariaDB runs the same routes in tests/integration/test_statistics.py."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_core.errors import ValidationFailed
from keystone_core.models import EpisodeStatus, QAResult, QATier
from keystone_core.services import statistics as svc
from keystone_core.services.scope import Scope
from tests.factories import make_episode, make_factory

UTC = dt.UTC
SUNDAY_EVENING = dt.datetime(2026, 3, 1, 15, 30, tzinfo=UTC)  # a Sunday, 15:30 UTC
EVERYTHING = Scope.everything()


@pytest.fixture
def factory_id(session: Session) -> int:
    factory = make_factory(session)
    assert factory.id is not None
    # Recorded at a known instant, and one whose device reported no start (its date is used).
    make_episode(
        session,
        factory_id=factory.id,
        recording_date=SUNDAY_EVENING.date(),
        recording_started_at=SUNDAY_EVENING,
        duration_sec=10.0,
        file_size_bytes=100,
        status=EpisodeStatus.AUTO_APPROVED,
    )
    make_episode(
        session,
        factory_id=factory.id,
        recording_date=dt.date(2026, 2, 28),
        duration_sec=30.0,
        file_size_bytes=300,
        status=EpisodeStatus.REJECTED,
    )
    session.commit()
    return factory.id


def non_empty(trend: svc.ProductionTrend) -> dict[str, int]:
    return {i.time: i.count.total for i in trend.items if i.count.total}


@pytest.mark.parametrize(
    ("granularity", "offset", "expected"),
    [
        # UTC days: the date-only episode counts from midnight UTC of its date.
        ("day", 0, {"2026-02-28T00:00:00Z": 1, "2026-03-01T00:00:00Z": 1}),
        # 15:30 UTC is 23:30 on Sunday at +08:00 and 00:30 on Monday at +09:00.
        ("day", 480, {"2026-02-27T16:00:00Z": 1, "2026-02-28T16:00:00Z": 1}),
        ("week", 480, {"2026-02-22T16:00:00Z": 2}),
        ("week", 540, {"2026-02-22T15:00:00Z": 1, "2026-03-01T15:00:00Z": 1}),
        # At -05:00 the date-only episode (midnight UTC) falls on the evening before.
        ("day", -300, {"2026-02-27T05:00:00Z": 1, "2026-03-01T05:00:00Z": 1}),
        ("month", -300, {"2026-02-01T05:00:00Z": 1, "2026-03-01T05:00:00Z": 1}),
        # 00:30 on 2 March at +09:00: March; midnight UTC of 28 February: February.
        ("month", 540, {"2026-01-31T15:00:00Z": 1, "2026-02-28T15:00:00Z": 1}),
        # Half-hour offsets: local hours start at :30 UTC.
        ("hour", 330, {"2026-02-27T23:30:00Z": 1, "2026-03-01T15:30:00Z": 1}),
    ],
)
def test_trend_buckets_follow_the_local_offset(
    session: Session,
    factory_id: int,
    granularity: svc.Granularity,
    offset: int,
    expected: dict[str, int],
) -> None:
    start, end = dt.datetime(2026, 2, 20, tzinfo=UTC), dt.datetime(2026, 3, 10, tzinfo=UTC)
    if granularity == "hour":
        start, end = dt.datetime(2026, 2, 27, tzinfo=UTC), dt.datetime(2026, 3, 3, tzinfo=UTC)
    f = svc.ProductionFilter(start=start, end=end, factory_id=factory_id)
    trend = svc.trend(session, EVERYTHING, f, granularity=granularity, offset_minutes=offset)
    assert non_empty(trend) == expected
    # Every bucket of the range is listed, in order, with no gaps.
    times = [dt.datetime.fromisoformat(i.time) for i in trend.items]
    assert times == sorted(times)
    assert times[0] <= start < times[1]


def test_the_range_is_exact_to_the_instant(session: Session, factory_id: int) -> None:
    def total(start: dt.datetime, end: dt.datetime) -> int:
        f = svc.ProductionFilter(start=start, end=end, factory_id=factory_id)
        return svc.summary(session, EVERYTHING, f).count.total

    assert total(SUNDAY_EVENING, SUNDAY_EVENING + dt.timedelta(seconds=1)) == 1
    assert total(SUNDAY_EVENING - dt.timedelta(seconds=1), SUNDAY_EVENING) == 0
    midnight = dt.datetime(2026, 2, 28, tzinfo=UTC)
    assert total(midnight, midnight + dt.timedelta(microseconds=1)) == 1
    assert total(midnight - dt.timedelta(hours=1), midnight) == 0


def test_p95_failing_checks_and_scores_on_sqlite(session: Session) -> None:
    factory = make_factory(session)
    day = dt.date(2026, 4, 2)
    at = dt.datetime(2026, 4, 2, 12, tzinfo=UTC)
    durations = [float(n) for n in range(1, 21)]  # 1 … 20 s: p95 is the 19th value
    for n, duration in enumerate(durations):
        episode = make_episode(
            session,
            factory_id=factory.id,
            recording_date=day,
            recording_started_at=at,
            duration_sec=duration,
            qa_score=n / 20,
            status=EpisodeStatus.NEEDS_INSPECTION,
        )
        assert episode.id is not None
        session.add(
            QAResult(
                episode_id=episode.id,
                tier=QATier.FAST,
                score=0.1,
                verdict=EpisodeStatus.QA_FAILED,
                checks=[{"name": "gaps", "passed": False}, {"name": "images", "passed": False}],
                started_at=at,
                finished_at=at,
            )
        )
        session.add(
            QAResult(
                episode_id=episode.id,
                tier=QATier.FAST,
                score=0.5,
                verdict=EpisodeStatus.NEEDS_INSPECTION,
                checks=[
                    {"name": "gaps", "passed": n % 4 != 0},
                    {"name": "images", "passed": None},
                    {"name": "topics", "passed": True},
                ],
                started_at=at,
                finished_at=at,
            )
        )
    session.commit()
    f = svc.ProductionFilter(
        start=at - dt.timedelta(hours=1), end=at + dt.timedelta(hours=1), factory_id=factory.id
    )
    result = svc.summary(session, EVERYTHING, f)
    assert result.duration.p95_ms == 19_000
    assert result.duration.max_ms == 20_000
    assert result.duration.avg_ms == 10_500
    board = svc.quality_dashboard(session, EVERYTHING, f, offset_minutes=0)
    # Only the newest result counts: 5 of 20 failed "gaps"; "images" did not apply.
    assert [(c.name, c.failed) for c in board.failing_checks] == [("gaps", 5)]
    assert board.checked_episodes == 20
    assert [b.count for b in board.score_distribution] == [2] * 10


def test_offsets_and_ranges_are_validated() -> None:
    assert svc.parse_offset("+08:00") == 480
    assert svc.parse_offset("-05:30") == -330
    assert svc.parse_offset("+14:00") == 840
    assert svc.parse_offset(None) is None
    for bad in ("+8", "08:00", "+14:30", "+05:60", "+aa:00", "Z"):
        with pytest.raises(ValidationFailed) as caught:
            svc.parse_offset(bad)
        assert caught.value.code == "invalid_timezone_offset"
    now = dt.datetime(2026, 4, 2, tzinfo=UTC)
    assert svc.time_range(None, None, now=now) == (now - dt.timedelta(days=7), now)
    naive = dt.datetime(2026, 4, 1)
    assert svc.time_range(naive, None, now=now)[0] == naive.replace(tzinfo=UTC)
    with pytest.raises(ValidationFailed) as caught:
        svc.time_range(now, now, now=now)
    assert caught.value.code == "invalid_time_range"
    with pytest.raises(ValidationFailed) as caught:
        svc.time_range(now - dt.timedelta(days=367), now)
    assert caught.value.code == "time_range_too_long"
    svc.time_range(now - dt.timedelta(days=366), now)
    with pytest.raises(ValidationFailed):
        svc.time_range(now - dt.timedelta(days=32), now, granularity="hour")
    assert svc.factory_offset("Asia/Shanghai", now) == 480
    assert svc.factory_offset("Not/AZone", now) == 0
    assert svc.factory_offset("America/New_York", dt.datetime(2026, 1, 5, tzinfo=UTC)) == -300
    assert svc.factory_offset("America/New_York", dt.datetime(2026, 7, 5, tzinfo=UTC)) == -240


def test_export_pages_through_equal_times_without_loss(
    session: Session, sqlite_engine: Engine, factory_id: int
) -> None:
    # A second episode at the same midnight as the date-only one: a tie the keyset breaks
    # by id.
    make_episode(session, factory_id=factory_id, recording_date=dt.date(2026, 2, 28))
    session.commit()
    f = svc.ProductionFilter(
        start=dt.datetime(2026, 2, 1, tzinfo=UTC), end=dt.datetime(2026, 3, 10, tzinfo=UTC)
    )

    @contextmanager
    def sessions() -> Iterator[Session]:
        with Session(sqlite_engine) as fresh:
            yield fresh

    chunks = list(svc.export_csv(sessions, EVERYTHING, f, offset_minutes=60, page_rows=1))
    rows = list(csv.reader(io.StringIO("".join(chunks))))
    assert rows[0] == list(svc.EXPORT_COLUMNS)
    assert [r[1] for r in rows[1:]] == [
        "2026-03-01 16:30:00",
        "2026-02-28 01:00:00",
        "2026-02-28 01:00:00",
    ]
    assert len({r[0] for r in rows[1:]}) == 3
    assert len(chunks) == 1 + 3  # the header, then one page per row (the last one short)
