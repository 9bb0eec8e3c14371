"""State transitions on real MariaDB: racing writers, and aware UTC datetimes with microseconds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import StatementError
from sqlmodel import Session

from keystone_core.db import create_db_engine
from keystone_core.errors import TransitionConflict
from keystone_core.models import AuditLog, Episode, EpisodeStatus, SyncJob, SyncStatus
from keystone_core.services.audit import Actor
from keystone_core.settings import load_settings
from keystone_core.states import transition_episode, transition_sync
from tests.factories import make_episode, make_sync_job

pytestmark = pytest.mark.integration

ROUNDS = 20
BARRIER_TIMEOUT_S = 20


@pytest.fixture
def racer_engines(mariadb_engine: Engine) -> Iterator[tuple[Engine, Engine]]:
    """Two engines of their own (separate pools, separate connections) on the test database."""
    url = mariadb_engine.url.render_as_string(hide_password=False)
    settings = load_settings(env="test", database_url=url, database_pool_size=1)
    engines = (create_db_engine(settings), create_db_engine(settings))
    yield engines
    for engine in engines:
        engine.dispose()


@dataclass
class Outcome:
    won: bool = False
    conflict: TransitionConflict | None = None
    error: BaseException | None = None


def race(
    engines: tuple[Engine, Engine],
    move: Callable[[Session, int, Any], Any],
    row_id: int,
    targets: tuple[Any, Any],
) -> list[Outcome]:
    """Run two transitions of ``row_id`` at once; both read the status before either updates.

    A barrier in front of each connection's UPDATE holds both threads until both have done
    the SELECT inside ``transition``; only then do the two conditional UPDATEs meet.
    """
    barrier = threading.Barrier(2, timeout=BARRIER_TIMEOUT_S)
    outcomes = [Outcome(), Outcome()]

    def hold_updates(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            barrier.wait()

    def run(index: int) -> None:
        outcome = outcomes[index]
        try:
            with Session(engines[index], expire_on_commit=False) as session:
                try:
                    move(session, row_id, targets[index])
                except TransitionConflict as exc:
                    session.rollback()
                    outcome.conflict = exc
                else:
                    session.commit()
                    outcome.won = True
        except BaseException as exc:
            outcome.error = exc
            barrier.abort()

    for engine in engines:
        event.listen(engine, "before_cursor_execute", hold_updates)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a racing transition hung"
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", hold_updates)
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return outcomes


def status_of(engine: Engine, table: str, row_id: int) -> str:
    with engine.connect() as conn:
        value = conn.execute(
            text(f"SELECT status FROM {table} WHERE id = :id"),
            {"id": row_id},
        ).scalar_one()
    return str(value)


def assert_exactly_one_winner(
    outcomes: list[Outcome], targets: tuple[Any, Any], final_status: str
) -> None:
    winners = [i for i, o in enumerate(outcomes) if o.won]
    losers = [o for o in outcomes if not o.won]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1
    assert isinstance(losers[0].conflict, TransitionConflict)
    # Both passed the table check on the same read: the UPDATE's WHERE decided.
    assert "changed concurrently" in losers[0].conflict.message
    assert final_status == targets[winners[0]]


def new_episode(engine: Engine, status: EpisodeStatus) -> int:
    with Session(engine) as session:
        episode = make_episode(session, status=status)
        session.commit()
        assert episode.id is not None
        return episode.id


def new_sync_job(engine: Engine, status: SyncStatus) -> int:
    with Session(engine) as session:
        job = make_sync_job(session, status=status)
        session.commit()
        assert job.id is not None
        return job.id


@pytest.mark.parametrize(
    "targets",
    [
        (EpisodeStatus.AUTO_APPROVED, EpisodeStatus.AUTO_APPROVED),
        (EpisodeStatus.AUTO_APPROVED, EpisodeStatus.PENDING_QA),
        (EpisodeStatus.NEEDS_INSPECTION, EpisodeStatus.QA_FAILED),
    ],
    ids=["same-target", "finish-vs-lease-recovery", "two-verdicts"],
)
def test_two_writers_on_one_episode_exactly_one_wins(
    mariadb_engine: Engine,
    racer_engines: tuple[Engine, Engine],
    targets: tuple[EpisodeStatus, EpisodeStatus],
) -> None:
    for _ in range(ROUNDS):
        row_id = new_episode(mariadb_engine, EpisodeStatus.QA_RUNNING)
        outcomes = race(racer_engines, transition_episode, row_id, targets)
        assert_exactly_one_winner(outcomes, targets, status_of(mariadb_engine, "episodes", row_id))


@pytest.mark.parametrize(
    "targets",
    [
        (SyncStatus.SYNCED, SyncStatus.SYNCED),
        (SyncStatus.SYNCED, SyncStatus.RETRY_WAIT),
        (SyncStatus.FAILED, SyncStatus.RETRY_WAIT),
    ],
    ids=["same-target", "synced-vs-retry", "failed-vs-retry"],
)
def test_two_writers_on_one_sync_job_exactly_one_wins(
    mariadb_engine: Engine,
    racer_engines: tuple[Engine, Engine],
    targets: tuple[SyncStatus, SyncStatus],
) -> None:
    for _ in range(ROUNDS):
        row_id = new_sync_job(mariadb_engine, SyncStatus.IN_PROGRESS)
        outcomes = race(racer_engines, transition_sync, row_id, targets)
        assert_exactly_one_winner(outcomes, targets, status_of(mariadb_engine, "sync_jobs", row_id))


def test_a_requeue_race_writes_one_audit_row(
    mariadb_engine: Engine, racer_engines: tuple[Engine, Engine]
) -> None:
    actor = Actor(type="user", id="7", account="ops")

    def resync(session: Session, row_id: int, target: SyncStatus) -> Any:
        return transition_sync(session, row_id, target, requeue=True, actor=actor)

    row_id = new_sync_job(mariadb_engine, SyncStatus.SYNCED)
    targets = (SyncStatus.QUEUED, SyncStatus.QUEUED)
    outcomes = race(racer_engines, resync, row_id, targets)
    assert_exactly_one_winner(outcomes, targets, status_of(mariadb_engine, "sync_jobs", row_id))
    with Session(mariadb_engine) as session:
        rows = session.execute(
            select(AuditLog).where(AuditLog.action == "sync.requeue")  # type: ignore[arg-type]
        ).all()
    assert len(rows) == 1


# --- datetimes ------------------------------------------------------------------------------


def test_datetimes_round_trip_as_aware_utc_with_microseconds(mariadb_engine: Engine) -> None:
    started = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    # An aware non-UTC value is stored as the same instant in UTC.
    lease = datetime(2026, 5, 6, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=2)))
    with Session(mariadb_engine) as session:
        episode = make_episode(session, recording_started_at=started, qa_lease_expires_at=lease)
        session.commit()
        row_id = episode.id

    with Session(mariadb_engine) as session:
        stored = session.get(Episode, row_id)
        assert stored is not None
        assert stored.recording_started_at == started
        assert stored.recording_started_at.microsecond == 123456
        assert stored.recording_started_at.utcoffset() == timedelta(0)
        assert stored.qa_lease_expires_at == lease
        assert stored.qa_lease_expires_at.tzinfo is not None
        assert stored.qa_lease_expires_at.hour == 10
        assert stored.qa_lease_expires_at.microsecond == 1
        assert stored.created_at.tzinfo is not None

    with mariadb_engine.connect() as conn:
        raw = conn.execute(
            text("SELECT recording_started_at FROM episodes WHERE id = :id"), {"id": row_id}
        ).scalar_one()
    assert raw == datetime(2026, 5, 6, 7, 8, 9, 123456)  # stored as naive UTC


def test_datetime_columns_are_datetime6(mariadb_engine: Engine) -> None:
    with mariadb_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT table_name, column_name, datetime_precision FROM information_schema.columns"
                " WHERE table_schema = DATABASE() AND data_type = 'datetime'"
            )
        ).all()
    assert rows, "no DATETIME columns found"
    assert [r for r in rows if r[2] != 6] == []
    names = {(r[0], r[1]) for r in rows}
    assert ("episodes", "qa_lease_expires_at") in names
    assert ("sync_jobs", "synced_at") in names


def test_transition_values_keep_microseconds(mariadb_engine: Engine) -> None:
    synced_at = datetime(2026, 5, 6, 23, 59, 59, 999999, tzinfo=UTC)
    row_id = new_sync_job(mariadb_engine, SyncStatus.IN_PROGRESS)
    with Session(mariadb_engine) as session:
        transition_sync(session, row_id, SyncStatus.SYNCED, values={"synced_at": synced_at})
        session.commit()
    with Session(mariadb_engine) as session:
        job = session.get(SyncJob, row_id)
        assert job is not None
        assert job.synced_at == synced_at
        assert job.status == SyncStatus.SYNCED


def test_naive_datetimes_are_refused(mariadb_engine: Engine) -> None:
    with Session(mariadb_engine) as session, pytest.raises(StatementError, match="naive datetime"):
        make_episode(session, recording_started_at=datetime(2026, 5, 6, 7, 8, 9))
