"""State machines: documented edges, refusals, audited requeues and model-based random walks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, select
from sqlmodel import Session, SQLModel

from keystone_core.errors import NotFoundError, TransitionConflict
from keystone_core.models import (
    AuditLog,
    Batch,
    BatchStatus,
    Episode,
    EpisodeStatus,
    Order,
    OrderStatus,
    SyncJob,
    SyncStatus,
    Task,
    TaskStatus,
)
from keystone_core.services.audit import Actor
from keystone_core.states import (
    BATCH,
    EPISODE,
    ORDER,
    SYNC,
    TASK,
    transition,
    transition_batch,
    transition_episode,
    transition_order,
    transition_sync,
    transition_task,
)
from tests.factories import make_batch, make_episode, make_order, make_sync_job, make_task

ADMIN = Actor(type="user", id="1", account="ops-admin", request_id="req-1")

# The tables below are written from DESIGN.md ("Domain"), not copied from states.py, so a
# change on either side shows up here.
Ord, Bat, Tsk, Epi, Syn = OrderStatus, BatchStatus, TaskStatus, EpisodeStatus, SyncStatus

# created → in_progress ⇄ paused → completed; any non-final → cancelled. An order completes
# when approved_count reaches target_count, which happens while in progress or paused.
ORDER_EDGES = {
    (Ord.CREATED, Ord.IN_PROGRESS),
    (Ord.IN_PROGRESS, Ord.PAUSED),
    (Ord.PAUSED, Ord.IN_PROGRESS),
    (Ord.IN_PROGRESS, Ord.COMPLETED),
    (Ord.PAUSED, Ord.COMPLETED),
    (Ord.CREATED, Ord.CANCELLED),
    (Ord.IN_PROGRESS, Ord.CANCELLED),
    (Ord.PAUSED, Ord.CANCELLED),
}
# pending → active → completed; pending|active → cancelled; active|completed → recalled.
# Recalling a *completed* batch reopens a final state, which DESIGN allows only through an
# explicit, audited transition: it is treated as a requeue.
BATCH_EDGES = {
    (Bat.PENDING, Bat.ACTIVE),
    (Bat.ACTIVE, Bat.COMPLETED),
    (Bat.PENDING, Bat.CANCELLED),
    (Bat.ACTIVE, Bat.CANCELLED),
    (Bat.ACTIVE, Bat.RECALLED),
}
BATCH_REQUEUES = {(Bat.COMPLETED, Bat.RECALLED)}
_TASK_OPEN = (Tsk.PENDING, Tsk.READY, Tsk.IN_PROGRESS, Tsk.UPLOADING)
TASK_EDGES = {
    (Tsk.PENDING, Tsk.READY),
    (Tsk.READY, Tsk.IN_PROGRESS),
    (Tsk.IN_PROGRESS, Tsk.UPLOADING),
    (Tsk.UPLOADING, Tsk.COMPLETED),
    # Forward skips: device signals can be lost.
    (Tsk.READY, Tsk.UPLOADING),
    (Tsk.IN_PROGRESS, Tsk.COMPLETED),
    # The recorder dropped its config (a failed `begin`).
    (Tsk.READY, Tsk.PENDING),
    *((s, Tsk.FAILED) for s in _TASK_OPEN),
    *((s, Tsk.CANCELLED) for s in _TASK_OPEN),
}
EPISODE_EDGES = {
    (Epi.PENDING_QA, Epi.QA_RUNNING),
    (Epi.QA_RUNNING, Epi.AUTO_APPROVED),
    (Epi.QA_RUNNING, Epi.NEEDS_INSPECTION),
    (Epi.QA_RUNNING, Epi.QA_FAILED),
    (Epi.NEEDS_INSPECTION, Epi.INSPECTOR_APPROVED),
    (Epi.NEEDS_INSPECTION, Epi.REJECTED),
    (Epi.QA_RUNNING, Epi.PENDING_QA),  # a stuck qa_running (lease expired)
}
# Requeue (rerun, backfill): any QA result state → pending_qa.
EPISODE_REQUEUES = {
    (s, Epi.PENDING_QA)
    for s in (
        Epi.AUTO_APPROVED,
        Epi.NEEDS_INSPECTION,
        Epi.QA_FAILED,
        Epi.INSPECTOR_APPROVED,
        Epi.REJECTED,
    )
}
SYNC_EDGES = {
    (Syn.QUEUED, Syn.IN_PROGRESS),
    (Syn.IN_PROGRESS, Syn.SYNCED),
    (Syn.IN_PROGRESS, Syn.RETRY_WAIT),
    (Syn.RETRY_WAIT, Syn.IN_PROGRESS),
    (Syn.IN_PROGRESS, Syn.FAILED),  # after the attempt budget
}
SYNC_REQUEUES = {(Syn.FAILED, Syn.QUEUED), (Syn.SYNCED, Syn.QUEUED)}  # retry, resync


@dataclass(frozen=True)
class Case:
    """One machine as the tests see it: its table (from DESIGN) and how to reach it."""

    name: str
    states: type[StrEnum]
    edges: set[Any]
    requeues: set[Any]
    move: Callable[..., Any]
    make: Callable[..., Any]
    model: type[SQLModel]

    @property
    def final(self) -> set[Any]:
        """States with no ordinary way out."""
        return {s for s in self.states if not any(src == s for src, _ in self.edges)}

    def allows(self, source: Any, target: Any, *, requeue: bool) -> bool:
        return (source, target) in self.edges or (requeue and (source, target) in self.requeues)

    def row(self, session: Session, status: Any) -> int:
        row = self.make(session, status=status)
        return int(row.id)


CASES = [
    Case("order", OrderStatus, ORDER_EDGES, set(), transition_order, make_order, Order),
    Case("batch", BatchStatus, BATCH_EDGES, BATCH_REQUEUES, transition_batch, make_batch, Batch),
    Case("task", TaskStatus, TASK_EDGES, set(), transition_task, make_task, Task),
    Case(
        "episode",
        EpisodeStatus,
        EPISODE_EDGES,
        EPISODE_REQUEUES,
        transition_episode,
        make_episode,
        Episode,
    ),
    Case("sync", SyncStatus, SYNC_EDGES, SYNC_REQUEUES, transition_sync, make_sync_job, SyncJob),
]
CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def db_status(session: Session, model: type[SQLModel], row_id: int) -> str:
    table = model.__table__  # type: ignore[attr-defined]
    value = session.execute(select(table.c.status).where(table.c.id == row_id)).scalar_one()
    return str(value)


def audit_rows(session: Session, action: str | None = None) -> list[AuditLog]:
    query = select(AuditLog).order_by(AuditLog.id)  # type: ignore[arg-type]
    if action is not None:
        query = query.where(AuditLog.action == action)  # type: ignore[arg-type]
    return list(session.execute(query).scalars())


# --- the table, edge by edge -------------------------------------------------------------


def test_final_states_are_those_without_an_ordinary_exit() -> None:
    machines = {"order": ORDER, "batch": BATCH, "task": TASK, "episode": EPISODE, "sync": SYNC}
    assert {c.name: c.final for c in CASES} == {n: set(m.final) for n, m in machines.items()}
    assert BY_NAME["episode"].final == {
        Epi.AUTO_APPROVED,
        Epi.QA_FAILED,
        Epi.INSPECTOR_APPROVED,
        Epi.REJECTED,
    }


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_documented_edge_is_allowed(session: Session, case: Case) -> None:
    refused = []
    for source, target in sorted(case.edges):
        row_id = case.row(session, source)
        try:
            left = case.move(session, row_id, target)
        except TransitionConflict as exc:
            refused.append(f"{source} → {target}: {exc}")
            continue
        assert left == source
        assert db_status(session, case.model, row_id) == target
    assert refused == []
    # Ordinary edges are not audited as requeues.
    assert audit_rows(session) == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_documented_requeue_needs_the_flag_and_then_succeeds(
    session: Session, case: Case
) -> None:
    problems = []
    for source, target in sorted(case.requeues):
        row_id = case.row(session, source)
        with pytest.raises(TransitionConflict) as refused:
            case.move(session, row_id, target)
        assert "requeue" in refused.value.message
        assert db_status(session, case.model, row_id) == source
        try:
            case.move(session, row_id, target, requeue=True, actor=ADMIN, reason="rerun")
        except TransitionConflict as exc:
            problems.append(f"{source} → {target}: {exc}")
            continue
        assert db_status(session, case.model, row_id) == target
    assert problems == []
    assert len(audit_rows(session, f"{case.name}.requeue")) == len(case.requeues)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_undocumented_pair_is_refused_even_as_a_requeue(session: Session, case: Case) -> None:
    problems = []
    for source in case.states:
        for target in case.states:
            if (source, target) in case.edges | case.requeues:
                continue
            row_id = case.row(session, source)
            try:
                case.move(session, row_id, target, requeue=True, actor=ADMIN)
            except TransitionConflict as exc:
                if exc.details != {"current_status": str(source), "target": str(target)}:
                    problems.append(f"{source} → {target}: refused without details")
            else:
                problems.append(f"{source} → {target}")
            assert db_status(session, case.model, row_id) == source
    assert problems == []
    assert audit_rows(session) == []


@pytest.mark.parametrize(
    ("case_name", "source", "target"),
    [
        ("task", Tsk.COMPLETED, Tsk.IN_PROGRESS),
        ("task", Tsk.UPLOADING, Tsk.READY),
        ("task", Tsk.UPLOADING, Tsk.IN_PROGRESS),
        ("task", Tsk.FAILED, Tsk.UPLOADING),
        ("episode", Epi.AUTO_APPROVED, Epi.QA_RUNNING),
        ("episode", Epi.PENDING_QA, Epi.AUTO_APPROVED),
        ("order", Ord.COMPLETED, Ord.IN_PROGRESS),
        ("order", Ord.CREATED, Ord.COMPLETED),
        ("batch", Bat.PENDING, Bat.RECALLED),
        ("sync", Syn.QUEUED, Syn.SYNCED),
        ("sync", Syn.RETRY_WAIT, Syn.SYNCED),
    ],
)
def test_illegal_moves_are_refused_with_a_reason(
    session: Session, case_name: str, source: Any, target: Any
) -> None:
    case = BY_NAME[case_name]
    row_id = case.row(session, source)
    with pytest.raises(TransitionConflict) as refused:
        case.move(session, row_id, target)
    assert refused.value.code == "invalid_transition"
    assert f"from {source} to {target}" in refused.value.message
    assert db_status(session, case.model, row_id) == source


@pytest.mark.parametrize("target", list(TaskStatus))
def test_a_cancelled_task_never_moves(session: Session, target: TaskStatus) -> None:
    task = make_task(session, status=Tsk.CANCELLED)
    assert task.id is not None
    with pytest.raises(TransitionConflict):
        transition_task(session, task.id, target, requeue=True, actor=ADMIN)
    assert db_status(session, Task, task.id) == Tsk.CANCELLED


def test_requeue_without_an_actor_is_refused_and_leaves_the_row(session: Session) -> None:
    episode = make_episode(session, status=Epi.AUTO_APPROVED)
    assert episode.id is not None
    with pytest.raises(TransitionConflict, match="actor"):
        transition_episode(session, episode.id, Epi.PENDING_QA, requeue=True)
    assert db_status(session, Episode, episode.id) == Epi.AUTO_APPROVED
    assert audit_rows(session) == []


def test_requeue_with_an_actor_writes_one_audit_row(session: Session) -> None:
    episode = make_episode(session, status=Epi.INSPECTOR_APPROVED)
    assert episode.id is not None
    left = transition_episode(
        session, episode.id, Epi.PENDING_QA, requeue=True, actor=ADMIN, reason="backfill 1-7 May"
    )
    session.commit()

    assert left is Epi.INSPECTOR_APPROVED
    [row] = audit_rows(session)
    assert row.action == "episode.requeue"
    assert (row.entity_type, row.entity_id) == ("episode", str(episode.id))
    assert (row.actor_type, row.actor_id, row.actor_account) == ("user", "1", "ops-admin")
    assert row.request_id == "req-1"
    assert row.factory_id == episode.factory_id
    assert row.before == {"status": "inspector_approved"}
    assert row.after == {"status": "pending_qa", "reason": "backfill 1-7 May"}


def test_sync_resync_is_audited_against_the_sync_job(session: Session) -> None:
    job = make_sync_job(session, status=Syn.SYNCED)
    assert job.id is not None
    transition_sync(session, job.id, Syn.QUEUED, requeue=True, actor=Actor.system("ops"))
    [row] = audit_rows(session)
    assert (row.action, row.entity_type, row.entity_id) == ("sync.requeue", "sync", str(job.id))
    assert row.actor_type == "system"
    assert row.factory_id == job.factory_id


def test_requeue_flag_on_an_ordinary_edge_is_not_audited(session: Session) -> None:
    episode = make_episode(session, status=Epi.QA_RUNNING)
    assert episode.id is not None
    transition_episode(session, episode.id, Epi.AUTO_APPROVED, requeue=True, actor=ADMIN)
    assert db_status(session, Episode, episode.id) == Epi.AUTO_APPROVED
    assert audit_rows(session) == []


def test_expected_narrows_the_allowed_sources(session: Session) -> None:
    episode = make_episode(session, status=Epi.QA_RUNNING)
    assert episode.id is not None
    # qa_running → auto_approved is a legal edge, but the caller only accepts pending_qa.
    with pytest.raises(TransitionConflict, match="expected one of pending_qa"):
        transition_episode(session, episode.id, Epi.AUTO_APPROVED, expected={Epi.PENDING_QA})
    assert db_status(session, Episode, episode.id) == Epi.QA_RUNNING

    left = transition_episode(
        session, episode.id, Epi.AUTO_APPROVED, expected={Epi.QA_RUNNING, Epi.PENDING_QA}
    )
    assert left is Epi.QA_RUNNING
    assert db_status(session, Episode, episode.id) == Epi.AUTO_APPROVED


def test_expected_does_not_widen_the_table(session: Session) -> None:
    episode = make_episode(session, status=Epi.PENDING_QA)
    assert episode.id is not None
    with pytest.raises(TransitionConflict):
        transition_episode(session, episode.id, Epi.AUTO_APPROVED, expected={Epi.PENDING_QA})
    assert db_status(session, Episode, episode.id) == Epi.PENDING_QA


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_a_missing_row_is_not_found(session: Session, case: Case) -> None:
    target = next(iter(case.edges))[1]
    with pytest.raises(NotFoundError, match=f"{case.name} 987654 not found"):
        case.move(session, 987654, target)


def test_values_are_set_in_the_same_update(session: Session, sqlite_engine: Engine) -> None:
    episode = make_episode(session, status=Epi.PENDING_QA)
    assert episode.id is not None
    session.commit()
    lease = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    updates: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE"):
            updates.append(statement)

    event.listen(sqlite_engine, "before_cursor_execute", capture)
    try:
        transition_episode(
            session,
            episode.id,
            Epi.QA_RUNNING,
            values={"qa_lease_owner": "run-42", "qa_lease_expires_at": lease},
        )
    finally:
        event.remove(sqlite_engine, "before_cursor_execute", capture)
    session.commit()

    assert len(updates) == 1
    assert "status" in updates[0]
    assert "qa_lease_owner" in updates[0]
    assert "qa_lease_expires_at" in updates[0]
    with Session(sqlite_engine) as fresh:
        stored = fresh.get(Episode, episode.id)
        assert stored is not None
        assert stored.status == Epi.QA_RUNNING
        assert stored.qa_lease_owner == "run-42"
        assert stored.qa_lease_expires_at == lease


def test_the_orm_object_in_the_session_sees_the_new_status(session: Session) -> None:
    order = make_order(session, status=Ord.CREATED)
    assert order.id is not None
    assert order.status == Ord.CREATED
    before = order.updated_at
    transition_order(session, order.id, Ord.IN_PROGRESS)
    assert order.status == Ord.IN_PROGRESS
    assert order.updated_at >= before
    same = session.get(Order, order.id)
    assert same is order


def test_pending_orm_changes_survive_a_transition(session: Session) -> None:
    """A caller that edits a row and then moves it keeps both changes."""
    episode = make_episode(session, status=Epi.QA_RUNNING)
    assert episode.id is not None
    session.commit()
    episode.qa_score = 0.95
    session.add(episode)
    transition_episode(session, episode.id, Epi.AUTO_APPROVED)
    session.commit()
    session.expire_all()
    assert episode.status == Epi.AUTO_APPROVED
    assert episode.qa_score == 0.95


def test_the_wrappers_return_the_enum_of_their_machine(session: Session) -> None:
    job = make_sync_job(session, status=Syn.QUEUED)
    assert job.id is not None
    left = transition_sync(session, job.id, Syn.IN_PROGRESS)
    assert left is Syn.QUEUED
    assert type(left) is SyncStatus
    left = transition(session, SYNC, SyncJob, job.id, Syn.RETRY_WAIT)
    assert left is Syn.IN_PROGRESS


def test_a_row_changed_behind_the_readers_back_is_a_conflict(
    session: Session, sqlite_engine: Engine
) -> None:
    """The UPDATE is conditional on the status that was read: zero rows → TransitionConflict."""
    job = make_sync_job(session, status=Syn.IN_PROGRESS)
    assert job.id is not None
    session.commit()
    fired = []

    def someone_else_wins(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and not fired:
            fired.append(True)
            conn.exec_driver_sql(
                "UPDATE sync_jobs SET status = 'retry_wait' WHERE id = ?", (job.id,)
            )

    event.listen(sqlite_engine, "before_cursor_execute", someone_else_wins)
    try:
        with pytest.raises(TransitionConflict, match="changed concurrently"):
            transition_sync(session, job.id, Syn.SYNCED)
    finally:
        event.remove(sqlite_engine, "before_cursor_execute", someone_else_wins)
    assert db_status(session, SyncJob, job.id) == Syn.RETRY_WAIT


# --- property: random walks against a pure model of the table ---------------------------


def walk_against_the_model(
    session: Session, case: Case, start: Any, walk: list[tuple[Any, bool]]
) -> None:
    """Apply ``walk`` to a fresh row in ``start``; after each step compare with the table."""
    try:
        row_id = case.row(session, start)
        base_audits = len(audit_rows(session))
        model_state, audited = start, 0
        for target, requeue in walk:
            should_move = case.allows(model_state, target, requeue=requeue)
            try:
                left = case.move(
                    session, row_id, target, requeue=requeue, actor=ADMIN if requeue else None
                )
            except TransitionConflict:
                moved = False
            else:
                moved = True
                assert left == model_state
            assert moved == should_move, f"{model_state} → {target} (requeue={requeue})"
            if moved:
                assert (model_state, target) in case.edges | case.requeues
                if model_state in case.final:
                    assert requeue
                    assert (model_state, target) in case.requeues
                audited += (model_state, target) in case.requeues
                model_state = target
            assert db_status(session, case.model, row_id) == model_state
        assert len(audit_rows(session)) - base_audits == audited
    finally:
        session.rollback()


def walks(states: type[StrEnum]) -> st.SearchStrategy[list[tuple[Any, bool]]]:
    return st.lists(st.tuples(st.sampled_from(list(states)), st.booleans()), max_size=30)


WALK_SETTINGS = hypothesis_settings(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@WALK_SETTINGS
@given(start=st.sampled_from(list(OrderStatus)), walk=walks(OrderStatus))
def test_order_walks_follow_the_table(
    session: Session, start: OrderStatus, walk: list[tuple[Any, bool]]
) -> None:
    walk_against_the_model(session, BY_NAME["order"], start, walk)


@WALK_SETTINGS
@given(start=st.sampled_from(list(BatchStatus)), walk=walks(BatchStatus))
def test_batch_walks_follow_the_table(
    session: Session, start: BatchStatus, walk: list[tuple[Any, bool]]
) -> None:
    walk_against_the_model(session, BY_NAME["batch"], start, walk)


@WALK_SETTINGS
@given(start=st.sampled_from(list(TaskStatus)), walk=walks(TaskStatus))
def test_task_walks_follow_the_table(
    session: Session, start: TaskStatus, walk: list[tuple[Any, bool]]
) -> None:
    walk_against_the_model(session, BY_NAME["task"], start, walk)


@WALK_SETTINGS
@given(start=st.sampled_from(list(EpisodeStatus)), walk=walks(EpisodeStatus))
def test_episode_walks_follow_the_table(
    session: Session, start: EpisodeStatus, walk: list[tuple[Any, bool]]
) -> None:
    walk_against_the_model(session, BY_NAME["episode"], start, walk)


@WALK_SETTINGS
@given(start=st.sampled_from(list(SyncStatus)), walk=walks(SyncStatus))
def test_sync_walks_follow_the_table(
    session: Session, start: SyncStatus, walk: list[tuple[Any, bool]]
) -> None:
    walk_against_the_model(session, BY_NAME["sync"], start, walk)
