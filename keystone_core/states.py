"""State machines of orders, batches, tasks, episode QA and sync: tables and the one updater.

Every status change in Keystone goes through :func:`transition` (or its per-machine
wrappers). It checks the transition table, then performs a conditional
``UPDATE … SET status=:new WHERE id=:id AND status=:current``; zero rows means somebody
else changed the row first and the caller gets :class:`TransitionConflict`. Final states
only change through the *requeue* transitions, which need an explicit flag and an actor
and are written to the audit log.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Table, select, update
from sqlmodel import Session, SQLModel

from keystone_core import clock
from keystone_core.errors import NotFoundError, TransitionConflict
from keystone_core.models import (
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
from keystone_core.services.audit import Actor, record_audit

S = TypeVar("S", bound=StrEnum)


def _edges(states: type[S], spec: Iterable[tuple[Any, Any]]) -> frozenset[tuple[S, S]]:
    """Expand ``(source or tuple of sources, target)`` pairs into edges of ``states``."""
    out: set[tuple[S, S]] = set()
    for sources, target in spec:
        for source in (sources,) if isinstance(sources, StrEnum) else sources:
            out.add((states(source), states(target)))
    return frozenset(out)


@dataclass(frozen=True)
class StateMachine(Generic[S]):
    """One machine: its states, ordinary transitions, audited requeues and final states."""

    name: str
    states: type[S]
    transitions: frozenset[tuple[S, S]]
    requeues: frozenset[tuple[S, S]] = field(default_factory=frozenset)
    final: frozenset[S] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        overlap = self.transitions & self.requeues
        if overlap:
            raise ValueError(f"{self.name}: transitions listed twice: {sorted(overlap)}")
        for source, _target in self.transitions:
            if source in self.final:
                raise ValueError(f"{self.name}: final state {source} has an ordinary exit")

    def is_allowed(self, source: S, target: S, *, requeue: bool = False) -> bool:
        if (source, target) in self.transitions:
            return True
        return requeue and (source, target) in self.requeues

    def targets(self, source: S, *, requeue: bool = False) -> set[S]:
        edges = self.transitions | self.requeues if requeue else self.transitions
        return {t for s, t in edges if s == source}

    def explain(self, source: S, target: S, *, requeue: bool) -> str:
        if (source, target) in self.requeues and not requeue:
            return (
                f"{self.name} {source} → {target} is a requeue: it needs an explicit "
                "requeue by an admin or ops and is audited"
            )
        allowed = ", ".join(sorted(self.targets(source, requeue=requeue))) or "none"
        return f"{self.name} cannot go from {source} to {target} (allowed: {allowed})"


_ORDER_OPEN = (OrderStatus.CREATED, OrderStatus.IN_PROGRESS, OrderStatus.PAUSED)
ORDER = StateMachine(
    name="order",
    states=OrderStatus,
    transitions=_edges(
        OrderStatus,
        [
            (OrderStatus.CREATED, OrderStatus.IN_PROGRESS),
            (OrderStatus.IN_PROGRESS, OrderStatus.PAUSED),
            (OrderStatus.PAUSED, OrderStatus.IN_PROGRESS),
            # Approvals keep arriving for a paused order, so it can complete while paused.
            ((OrderStatus.IN_PROGRESS, OrderStatus.PAUSED), OrderStatus.COMPLETED),
            (_ORDER_OPEN, OrderStatus.CANCELLED),
        ],
    ),
    final=frozenset({OrderStatus.COMPLETED, OrderStatus.CANCELLED}),
)

BATCH = StateMachine(
    name="batch",
    states=BatchStatus,
    transitions=_edges(
        BatchStatus,
        [
            (BatchStatus.PENDING, BatchStatus.ACTIVE),
            (BatchStatus.ACTIVE, BatchStatus.COMPLETED),
            ((BatchStatus.PENDING, BatchStatus.ACTIVE), BatchStatus.CANCELLED),
            (BatchStatus.ACTIVE, BatchStatus.RECALLED),
        ],
    ),
    # Recalling a completed batch reopens history: explicit and audited.
    requeues=_edges(BatchStatus, [(BatchStatus.COMPLETED, BatchStatus.RECALLED)]),
    final=frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.RECALLED}),
)

_TASK_OPEN = (TaskStatus.PENDING, TaskStatus.READY, TaskStatus.IN_PROGRESS, TaskStatus.UPLOADING)
TASK = StateMachine(
    name="task",
    states=TaskStatus,
    transitions=_edges(
        TaskStatus,
        [
            (TaskStatus.PENDING, TaskStatus.READY),
            (TaskStatus.READY, TaskStatus.IN_PROGRESS),
            (TaskStatus.IN_PROGRESS, TaskStatus.UPLOADING),
            (TaskStatus.UPLOADING, TaskStatus.COMPLETED),
            # Device signals can be lost: skip forward when a later one proves progress.
            (TaskStatus.READY, TaskStatus.UPLOADING),
            (TaskStatus.IN_PROGRESS, TaskStatus.COMPLETED),
            # The recorder dropped its config (a failed `begin`).
            (TaskStatus.READY, TaskStatus.PENDING),
            (_TASK_OPEN, TaskStatus.FAILED),
            (_TASK_OPEN, TaskStatus.CANCELLED),
        ],
    ),
    final=frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
)

_QA_RESULTS = (
    EpisodeStatus.AUTO_APPROVED,
    EpisodeStatus.NEEDS_INSPECTION,
    EpisodeStatus.QA_FAILED,
    EpisodeStatus.INSPECTOR_APPROVED,
    EpisodeStatus.REJECTED,
)
EPISODE = StateMachine(
    name="episode",
    states=EpisodeStatus,
    transitions=_edges(
        EpisodeStatus,
        [
            (EpisodeStatus.PENDING_QA, EpisodeStatus.QA_RUNNING),
            (EpisodeStatus.QA_RUNNING, EpisodeStatus.AUTO_APPROVED),
            (EpisodeStatus.QA_RUNNING, EpisodeStatus.NEEDS_INSPECTION),
            (EpisodeStatus.QA_RUNNING, EpisodeStatus.QA_FAILED),
            # A QA lease expired: the episode goes back to the queue.
            (EpisodeStatus.QA_RUNNING, EpisodeStatus.PENDING_QA),
            (EpisodeStatus.NEEDS_INSPECTION, EpisodeStatus.INSPECTOR_APPROVED),
            (EpisodeStatus.NEEDS_INSPECTION, EpisodeStatus.REJECTED),
        ],
    ),
    requeues=_edges(EpisodeStatus, [(_QA_RESULTS, EpisodeStatus.PENDING_QA)]),
    final=frozenset(
        {
            EpisodeStatus.AUTO_APPROVED,
            EpisodeStatus.QA_FAILED,
            EpisodeStatus.INSPECTOR_APPROVED,
            EpisodeStatus.REJECTED,
        }
    ),
)

SYNC = StateMachine(
    name="sync",
    states=SyncStatus,
    transitions=_edges(
        SyncStatus,
        [
            (SyncStatus.QUEUED, SyncStatus.IN_PROGRESS),
            (SyncStatus.IN_PROGRESS, SyncStatus.SYNCED),
            (SyncStatus.IN_PROGRESS, SyncStatus.RETRY_WAIT),
            (SyncStatus.RETRY_WAIT, SyncStatus.IN_PROGRESS),
            (SyncStatus.IN_PROGRESS, SyncStatus.FAILED),
        ],
    ),
    requeues=_edges(
        SyncStatus,
        [
            (SyncStatus.FAILED, SyncStatus.QUEUED),  # retry
            (SyncStatus.SYNCED, SyncStatus.QUEUED),  # resync
        ],
    ),
    final=frozenset({SyncStatus.SYNCED, SyncStatus.FAILED}),
)

MACHINES: Mapping[str, StateMachine[Any]] = {m.name: m for m in (ORDER, BATCH, TASK, EPISODE, SYNC)}


def transition(
    session: Session,
    machine: StateMachine[S],
    model: type[SQLModel],
    row_id: int,
    target: S,
    *,
    expected: Collection[S] | None = None,
    requeue: bool = False,
    actor: Actor | None = None,
    reason: str = "",
    values: Mapping[str, Any] | None = None,
) -> S:
    """Move row ``row_id`` of ``model`` to ``target``; return the state it left.

    ``expected`` narrows the allowed source states further (e.g. lease recovery only
    from ``qa_running``). ``values`` are other columns set in the same UPDATE. The
    change is part of the caller's transaction; nothing is committed here.
    """
    table = cast(Table, model.__table__)  # type: ignore[attr-defined]
    current_raw = session.execute(
        select(table.c.status).where(table.c.id == row_id)
    ).scalar_one_or_none()
    if current_raw is None:
        raise NotFoundError(f"{machine.name} {row_id} not found")
    current = machine.states(current_raw)
    if expected is not None and current not in expected:
        raise TransitionConflict(
            f"{machine.name} {row_id} is {current}, expected one of {', '.join(sorted(expected))}",
            current_status=str(current),
            target=str(target),
        )
    if not machine.is_allowed(current, target, requeue=requeue):
        raise TransitionConflict(
            machine.explain(current, target, requeue=requeue),
            current_status=str(current),
            target=str(target),
        )
    is_requeue = (current, target) in machine.requeues
    if is_requeue and actor is None:
        raise TransitionConflict(f"{machine.name} requeue needs an actor for the audit log")

    changes: dict[str, Any] = {"status": target.value, "updated_at": clock.now()}
    if values:
        changes.update(values)
    result = session.execute(
        update(table)
        .where(table.c.id == row_id, table.c.status == current.value)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise TransitionConflict(
            f"{machine.name} {row_id} changed concurrently (was {current})",
            current_status=str(current),
            target=str(target),
        )
    if is_requeue and actor is not None:
        factory_id = getattr(model, "factory_id", None)
        record_audit(
            session,
            actor,
            f"{machine.name}.requeue",
            entity_type=machine.name,
            entity_id=row_id,
            before={"status": current.value},
            after={"status": target.value, "reason": reason},
            factory_id=None if factory_id is None else _factory_of(session, table, row_id),
        )
    # Keep identity-mapped objects honest: the UPDATE bypassed the ORM.
    for obj in session.identity_map.values():
        if isinstance(obj, model) and getattr(obj, "id", None) == row_id:
            session.expire(obj)
    return current


def _factory_of(session: Session, table: Table, row_id: int) -> int | None:
    value = session.execute(select(table.c.factory_id).where(table.c.id == row_id)).scalar()
    return None if value is None else int(value)


def transition_order(
    session: Session, order_id: int, target: OrderStatus, **options: Any
) -> OrderStatus:
    return OrderStatus(transition(session, ORDER, Order, order_id, target, **options))


def transition_batch(
    session: Session, batch_id: int, target: BatchStatus, **options: Any
) -> BatchStatus:
    return BatchStatus(transition(session, BATCH, Batch, batch_id, target, **options))


def transition_task(
    session: Session, task_id: int, target: TaskStatus, **options: Any
) -> TaskStatus:
    return TaskStatus(transition(session, TASK, Task, task_id, target, **options))


def transition_episode(
    session: Session, episode_id: int, target: EpisodeStatus, **options: Any
) -> EpisodeStatus:
    return EpisodeStatus(transition(session, EPISODE, Episode, episode_id, target, **options))


def transition_sync(
    session: Session, sync_job_id: int, target: SyncStatus, **options: Any
) -> SyncStatus:
    return SyncStatus(transition(session, SYNC, SyncJob, sync_job_id, target, **options))
