"""Production lifecycle: orders, batches with task quotas, tasks, episodes and progress."""

from __future__ import annotations

import itertools
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, false, func, select, update
from sqlmodel import Session, SQLModel, col

from keystone_core import clock
from keystone_core.errors import ConflictError, NotFoundError, ValidationFailed
from keystone_core.models import (
    SOP,
    Batch,
    BatchStatus,
    Episode,
    EpisodeStatus,
    Order,
    OrderStatus,
    Role,
    Scene,
    Subscene,
    SyncTarget,
    Task,
    TaskStatus,
    Workstation,
)
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.crud import (
    Family,
    Guard,
    create_row,
    get_row,
    snapshot,
    update_row,
)
from keystone_core.services.outbox import EventType, emit_episode_event, emit_order_completed
from keystone_core.services.scope import Scope
from keystone_core.services.sync import enqueue as enqueue_sync
from keystone_core.states import (
    TASK,
    transition_batch,
    transition_order,
    transition_task,
)

RECALLED_LABEL = "recalled_batch"

ORDER_OPEN = frozenset({OrderStatus.CREATED, OrderStatus.IN_PROGRESS, OrderStatus.PAUSED})
BATCH_OPEN = frozenset({BatchStatus.PENDING, BatchStatus.ACTIVE})
TASK_UNFINISHED = frozenset(TASK.states) - TASK.final
# Tasks that no longer consume an order's quota: they will never produce an episode.
# Failed tasks are final too, so counting them would block the order from ever being
# re-planned to its target.
TASK_RELEASED = frozenset({TaskStatus.CANCELLED, TaskStatus.FAILED})
APPROVED = frozenset({EpisodeStatus.AUTO_APPROVED, EpisodeStatus.INSPECTOR_APPROVED})

MAX_TASKS_PER_REQUEST = 10_000

_public_sequence = itertools.count()


def public_id(prefix: str) -> str:
    """``<prefix>_YYYYMMDD_HHMMSS_mmm_NN_<8 hex>``: the public id form Synapse and devices know."""
    now = clock.now()
    sequence = next(_public_sequence) % 100
    millis = now.microsecond // 1000
    return f"{prefix}_{now:%Y%m%d_%H%M%S}_{millis:03d}_{sequence:02d}_{secrets.token_hex(4)}"


# --- visibility -------------------------------------------------------------------------


def collector_stations(scope: Scope) -> Select[Any]:
    """Ids of the stations the scope's data collector currently works at."""
    return select(col(Workstation.id)).where(
        col(Workstation.data_collector_id) == scope.data_collector_id,
        col(Workstation.deleted_at).is_(None),
    )


def _own_station_rows(column: Any) -> Callable[[Scope], ColumnElement[bool] | None]:
    """A collector sees only rows of the stations it works at; other roles are unaffected."""

    def rule(scope: Scope) -> ColumnElement[bool] | None:
        if scope.role is not Role.DATA_COLLECTOR:
            return None
        if scope.data_collector_id is None:
            return false()  # a collector account not linked to an operator sees nothing
        return cast(ColumnElement[bool], column.in_(collector_stations(scope)))

    return rule


def _own_episodes(scope: Scope) -> ColumnElement[bool] | None:
    if scope.role is not Role.DATA_COLLECTOR:
        return None
    if scope.data_collector_id is None:
        return false()
    tasks = select(col(Task.id)).where(col(Task.workstation_id).in_(collector_stations(scope)))
    return col(Episode.task_id).in_(tasks)


# --- families ---------------------------------------------------------------------------


def live_task_count(session: Session, order_id: int) -> int:
    """Tasks of the order that count against its target (not deleted, cancelled or failed)."""
    query = select(func.count()).where(
        col(Task.order_id) == order_id,
        col(Task.deleted_at).is_(None),
        col(Task.status).not_in(sorted(TASK_RELEASED)),
    )
    return int(session.execute(query).scalar_one())


def _validate_order(session: Session, order: Order, scope: Scope) -> None:
    if order.scene_id is not None:
        scene = session.get(Scene, order.scene_id)
        if scene is not None and scene.factory_id not in (None, order.factory_id):
            raise ValidationFailed(
                f"scene {order.scene_id} belongs to factory {scene.factory_id}, "
                f"not to the order's factory {order.factory_id}",
                code="factory_mismatch",
                field="scene_id",
            )
    if order.id is not None:
        # update_row holds the order row lock here, so no batch can slip in meanwhile.
        used = live_task_count(session, order.id)
        if order.target_count < used:
            raise ConflictError(
                f"target_count {order.target_count} is below the {used} tasks already planned "
                f"for order {order.id}; cancel tasks first",
                code="quota_exceeded",
                target_count=order.target_count,
                task_count=used,
            )


ORDERS: Family[Order] = Family(
    model=Order,
    entity="order",
    unique=(("factory_id", "name"),),
    guards=(Guard(Batch, "order_id", "batches"),),
    validate=_validate_order,
    writable=frozenset(
        {
            "factory_id",
            "name",
            "scene_id",
            "target_count",
            "priority",
            "deadline",
            "meta",
            "created_by_user_id",
        }
    ),
    immutable=frozenset({"factory_id", "created_by_user_id"}),
)

BATCHES: Family[Batch] = Family(
    model=Batch,
    entity="batch",
    visibility=_own_station_rows(col(Batch.workstation_id)),
    writable=frozenset({"name", "notes", "meta"}),
)

TASKS: Family[Task] = Family(
    model=Task,
    entity="task",
    visibility=_own_station_rows(col(Task.workstation_id)),
    writable=frozenset(),
)

EPISODES: Family[Episode] = Family(
    model=Episode,
    entity="episode",
    visibility=_own_episodes,
    # Everything else on an episode is evidence (paths, checksums, QA) and never edited.
    writable=frozenset({"labels", "quality_flag", "meta"}),
)


# --- orders -----------------------------------------------------------------------------


def create_order(
    session: Session, scope: Scope, actor: Actor, values: Mapping[str, Any], *, user_id: int | None
) -> Order:
    # No `status` here (not writable): every order starts `created`.
    data = dict(values)
    if user_id is not None:
        data["created_by_user_id"] = user_id
    return create_row(session, ORDERS, scope, actor, data)


def update_order(
    session: Session, scope: Scope, actor: Actor, order_id: int, changes: Mapping[str, Any]
) -> Order:
    """Edit fields; a ``status`` goes through the order state machine (409 when refused)."""
    data = dict(changes)
    status = data.pop("status", None)
    order = update_row(session, ORDERS, scope, actor, order_id, data)
    if status is not None and OrderStatus(status) != order.status:
        change_order_status(session, scope, actor, order_id, OrderStatus(status))
    # A lowered target can make an order complete.
    complete_order_if_done(session, order_id)
    session.refresh(order)
    return order


def change_order_status(
    session: Session, scope: Scope, actor: Actor, order_id: int, target: OrderStatus
) -> OrderStatus:
    """Move the order to ``target``; cancelling it also cancels its open batches and tasks."""
    get_row(session, ORDERS, scope, order_id, for_update=True)
    before = transition_order(session, order_id, target, actor=actor)
    if target is OrderStatus.COMPLETED:
        emit_order_completed(session, order_id)
    cancelled_batches: list[int] = []
    if target is OrderStatus.CANCELLED:
        open_batches = session.execute(
            select(col(Batch.id))
            .where(
                col(Batch.order_id) == order_id,
                col(Batch.deleted_at).is_(None),
                col(Batch.status).in_(sorted(BATCH_OPEN)),
            )
            .order_by(col(Batch.id))
            .with_for_update()
        ).scalars()
        for batch_id in list(open_batches):
            transition_batch(session, batch_id, BatchStatus.CANCELLED, values=_ended())
            _cancel_unfinished_tasks(session, batch_id)
            cancelled_batches.append(batch_id)
    record_audit(
        session,
        actor,
        "order.status",
        entity_type="order",
        entity_id=order_id,
        before={"status": before.value},
        after={"status": target.value, "cancelled_batches": cancelled_batches},
        factory_id=_factory_id(session, Order, order_id),
    )
    return before


def complete_order_if_done(session: Session, order_id: int) -> bool:
    """Complete a running or paused order once ``approved_count ≥ target_count``.

    Callers hold the order row (an UPDATE of its counters or a locking read), so the values
    read here cannot change before the transition.
    """
    row = session.execute(
        select(col(Order.approved_count), col(Order.target_count), col(Order.status)).where(
            col(Order.id) == order_id
        )
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"order {order_id} not found")
    approved, target, status = row
    if approved < target or OrderStatus(status) not in {
        OrderStatus.IN_PROGRESS,
        OrderStatus.PAUSED,
    }:
        return False
    transition_order(
        session,
        order_id,
        OrderStatus.COMPLETED,
        expected={OrderStatus.IN_PROGRESS, OrderStatus.PAUSED},
    )
    emit_order_completed(session, order_id)
    return True


# --- batches and tasks ------------------------------------------------------------------


@dataclass(frozen=True)
class TaskGroup:
    """``quantity`` tasks of one SOP in one subscene."""

    sop_id: int
    subscene_id: int
    quantity: int


@dataclass(frozen=True)
class _ResolvedGroup:
    group: TaskGroup
    scene_id: int


@dataclass
class BatchTasks:
    """A batch and the tasks just created in it; ``reused`` when the batch already existed."""

    batch: Batch
    tasks: list[Task]
    reused: bool = False


@dataclass
class BatchClosure:
    """Outcome of cancelling or recalling a batch."""

    batch: Batch
    cancelled_task_ids: list[int] = field(default_factory=list)
    labelled_episode_ids: list[int] = field(default_factory=list)


def _lock_order(session: Session, scope: Scope, order_id: int) -> Order:
    """Lock the order row: batch creation and task additions of one order are serialized."""
    order = get_row(session, ORDERS, scope, order_id, for_update=True)
    session.refresh(order)  # the row may sit in the identity map from an unlocked read
    if order.status not in ORDER_OPEN:
        raise ConflictError(
            f"order {order_id} is {order.status.value}; no tasks can be added",
            code="order_closed",
            current_status=order.status.value,
        )
    return order


def _station(session: Session, scope: Scope, order: Order, workstation_id: int) -> Workstation:
    station = session.get(Workstation, workstation_id)
    if station is None or station.deleted_at is not None or not scope.allows(station.factory_id):
        raise NotFoundError(
            f"workstation {workstation_id} not found",
            code="reference_not_found",
            field="workstation_id",
        )
    if station.factory_id != order.factory_id:
        raise ValidationFailed(
            f"workstation {workstation_id} is in factory {station.factory_id}, "
            f"the order in factory {order.factory_id}",
            code="factory_mismatch",
            field="workstation_id",
        )
    return station


def _resolve_groups(
    session: Session, scope: Scope, order: Order, groups: Sequence[TaskGroup]
) -> list[_ResolvedGroup]:
    if not groups:
        raise ValidationFailed("task_groups must not be empty", code="validation_error")
    seen: set[tuple[int, int]] = set()
    for group in groups:
        key = (group.sop_id, group.subscene_id)
        if key in seen:
            raise ValidationFailed(
                f"task group sop {group.sop_id} / subscene {group.subscene_id} is listed twice",
                code="duplicate_task_group",
                field="task_groups",
            )
        seen.add(key)
        if group.quantity < 1:
            raise ValidationFailed("quantity must be at least 1", field="quantity")
    if sum(g.quantity for g in groups) > MAX_TASKS_PER_REQUEST:
        raise ValidationFailed(
            f"at most {MAX_TASKS_PER_REQUEST} tasks per request", field="task_groups"
        )

    sop_ids = sorted({g.sop_id for g in groups})
    live_sops = set(
        session.execute(
            select(col(SOP.id)).where(col(SOP.id).in_(sop_ids), col(SOP.deleted_at).is_(None))
        ).scalars()
    )
    subscene_ids = sorted({g.subscene_id for g in groups})
    subscenes = {
        row.id: row
        for row in session.execute(
            select(col(Subscene.id), col(Subscene.scene_id), col(Scene.factory_id))
            .join(Scene, col(Scene.id) == col(Subscene.scene_id))
            .where(
                col(Subscene.id).in_(subscene_ids),
                col(Subscene.deleted_at).is_(None),
                col(Scene.deleted_at).is_(None),
            )
        )
    }
    resolved: list[_ResolvedGroup] = []
    for group in groups:
        if group.sop_id not in live_sops:
            raise NotFoundError(
                f"sop {group.sop_id} not found", code="reference_not_found", field="sop_id"
            )
        sub = subscenes.get(group.subscene_id)
        if sub is None or not scope.allows(sub.factory_id):
            raise NotFoundError(
                f"subscene {group.subscene_id} not found",
                code="reference_not_found",
                field="subscene_id",
            )
        if sub.factory_id not in (None, order.factory_id):
            raise ValidationFailed(
                f"subscene {group.subscene_id} belongs to factory {sub.factory_id}, "
                f"the order to factory {order.factory_id}",
                code="factory_mismatch",
                field="subscene_id",
            )
        if order.scene_id is not None and sub.scene_id != order.scene_id:
            raise ValidationFailed(
                f"subscene {group.subscene_id} is not in the order's scene {order.scene_id}",
                code="scene_mismatch",
                field="subscene_id",
            )
        resolved.append(_ResolvedGroup(group=group, scene_id=int(sub.scene_id)))
    return resolved


def _check_quota(session: Session, order: Order, adding: int) -> None:
    assert order.id is not None
    used = live_task_count(session, order.id)
    if used + adding > order.target_count:
        available = max(order.target_count - used, 0)
        raise ConflictError(
            f"order {order.id} has target_count {order.target_count} and {used} planned tasks; "
            f"{adding} more would exceed it (at most {available} can be added)",
            code="quota_exceeded",
            target_count=order.target_count,
            task_count=used,
            requested=adding,
            available=available,
        )


def _add_tasks(
    session: Session, order: Order, batch: Batch, resolved: Sequence[_ResolvedGroup]
) -> list[Task]:
    assert batch.id is not None
    assert order.id is not None
    tasks = [
        Task(
            task_id=public_id("task"),
            batch_id=batch.id,
            order_id=order.id,
            factory_id=order.factory_id,
            workstation_id=batch.workstation_id,
            scene_id=item.scene_id,
            subscene_id=item.group.subscene_id,
            sop_id=item.group.sop_id,
        )
        for item in resolved
        for _ in range(item.group.quantity)
    ]
    session.add_all(tasks)
    session.flush()
    session.execute(
        update(Batch)
        .where(col(Batch.id) == batch.id)
        .values(target_count=col(Batch.target_count) + len(tasks), updated_at=clock.now())
        .execution_options(synchronize_session=False)
    )
    session.expire(batch)
    return tasks


def _start_order(session: Session, order: Order) -> None:
    """The first batch puts a fresh order in production."""
    assert order.id is not None
    if order.status is OrderStatus.CREATED:
        transition_order(session, order.id, OrderStatus.IN_PROGRESS)


def create_batch(
    session: Session,
    scope: Scope,
    actor: Actor,
    *,
    order_id: int,
    workstation_id: int,
    task_groups: Sequence[TaskGroup],
    name: str = "",
    notes: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> BatchTasks:
    """Plan tasks for a station; an open batch of the same order and station is reused.

    The order row is locked for the whole check-and-insert so two concurrent requests
    cannot both pass the quota check (nor both create a batch for the same station).
    """
    order = _lock_order(session, scope, order_id)
    _station(session, scope, order, workstation_id)
    resolved = _resolve_groups(session, scope, order, task_groups)
    _check_quota(session, order, sum(item.group.quantity for item in resolved))

    batch = session.execute(
        select(Batch)
        .where(
            col(Batch.order_id) == order_id,
            col(Batch.workstation_id) == workstation_id,
            col(Batch.deleted_at).is_(None),
            col(Batch.status).in_(sorted(BATCH_OPEN)),
        )
        .order_by(col(Batch.id))
        .limit(1)
        # Locked so a concurrent cancel cannot close it while tasks are added.
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    reused = batch is not None
    if batch is None:
        batch = Batch(
            batch_id=public_id("batch"),
            order_id=order_id,
            factory_id=order.factory_id,
            workstation_id=workstation_id,
            name=name,
            notes=notes,
            meta=dict(metadata or {}),
        )
        session.add(batch)
        session.flush()
    assert batch.id is not None
    tasks = _add_tasks(session, order, batch, resolved)
    _start_order(session, order)
    record_audit(
        session,
        actor,
        "batch.tasks_add" if reused else "batch.create",
        entity_type="batch",
        entity_id=batch.id,
        after={
            **({} if reused else snapshot(batch)),
            "reused": reused,
            "task_ids": [t.task_id for t in tasks],
        },
        factory_id=order.factory_id,
    )
    session.refresh(batch)
    return BatchTasks(batch=batch, tasks=tasks, reused=reused)


def add_batch_tasks(
    session: Session, scope: Scope, actor: Actor, batch_id: int, task_groups: Sequence[TaskGroup]
) -> BatchTasks:
    """Add tasks to an open batch under the same quota rule as batch creation."""
    found = get_row(session, BATCHES, scope, batch_id)
    # Lock order first, then batch: the same order create_batch takes them in.
    order = _lock_order(session, scope, found.order_id)
    batch = get_row(session, BATCHES, scope, batch_id, for_update=True)
    session.refresh(batch)
    if batch.status not in BATCH_OPEN:
        raise ConflictError(
            f"batch {batch_id} is {batch.status.value}; tasks can only be added to a pending "
            "or active batch",
            code="batch_closed",
            current_status=batch.status.value,
        )
    resolved = _resolve_groups(session, scope, order, task_groups)
    _check_quota(session, order, sum(item.group.quantity for item in resolved))
    tasks = _add_tasks(session, order, batch, resolved)
    _start_order(session, order)
    record_audit(
        session,
        actor,
        "batch.tasks_add",
        entity_type="batch",
        entity_id=batch_id,
        after={"task_ids": [t.task_id for t in tasks]},
        factory_id=batch.factory_id,
    )
    session.refresh(batch)
    return BatchTasks(batch=batch, tasks=tasks, reused=True)


def update_batch(
    session: Session, scope: Scope, actor: Actor, batch_id: int, changes: Mapping[str, Any]
) -> Batch:
    return update_row(session, BATCHES, scope, actor, batch_id, changes)


def _ended() -> dict[str, Any]:
    return {"ended_at": clock.now()}


def _cancel_unfinished_tasks(session: Session, batch_id: int) -> list[int]:
    """Cancel every unfinished task of the batch (locked first: devices may move them too)."""
    task_ids = list(
        session.execute(
            select(col(Task.id))
            .where(
                col(Task.batch_id) == batch_id,
                col(Task.deleted_at).is_(None),
                col(Task.status).in_(sorted(TASK_UNFINISHED)),
            )
            .order_by(col(Task.id))
            .with_for_update()
        ).scalars()
    )
    for task_id in task_ids:
        transition_task(session, task_id, TaskStatus.CANCELLED, expected=TASK_UNFINISHED)
    return task_ids


def cancel_batch(session: Session, scope: Scope, actor: Actor, batch_id: int) -> BatchClosure:
    """pending|active → cancelled, with its unfinished tasks, in the caller's transaction."""
    batch = get_row(session, BATCHES, scope, batch_id, for_update=True)
    before = transition_batch(session, batch_id, BatchStatus.CANCELLED, values=_ended())
    cancelled = _cancel_unfinished_tasks(session, batch_id)
    record_audit(
        session,
        actor,
        "batch.cancel",
        entity_type="batch",
        entity_id=batch_id,
        before={"status": before.value},
        after={"status": BatchStatus.CANCELLED.value, "cancelled_task_ids": cancelled},
        factory_id=batch.factory_id,
    )
    session.refresh(batch)
    return BatchClosure(batch=batch, cancelled_task_ids=cancelled)


def recall_batch(
    session: Session, scope: Scope, actor: Actor, batch_id: int, reason: str = ""
) -> BatchClosure:
    """active|completed → recalled: cancel unfinished tasks, label the batch's episodes.

    Recalling a completed batch reopens history, so it is the audited requeue transition.
    """
    batch = get_row(session, BATCHES, scope, batch_id, for_update=True)
    session.refresh(batch)
    now = clock.now()
    before = transition_batch(
        session,
        batch_id,
        BatchStatus.RECALLED,
        requeue=batch.status is BatchStatus.COMPLETED,
        actor=actor,
        reason=reason,
        values={"recalled_at": now, "recall_reason": reason, "ended_at": batch.ended_at or now},
    )
    cancelled = _cancel_unfinished_tasks(session, batch_id)
    episodes = session.execute(
        select(Episode)
        .where(col(Episode.batch_id) == batch_id)
        .order_by(col(Episode.id))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalars()
    labelled: list[int] = []
    for episode in episodes:
        if RECALLED_LABEL in episode.labels:
            continue
        # A new list, so the JSON column is seen as changed.
        episode.labels = [*episode.labels, RECALLED_LABEL]
        episode.updated_at = now
        session.add(episode)
        assert episode.id is not None
        labelled.append(episode.id)
    session.flush()
    record_audit(
        session,
        actor,
        "batch.recall",
        entity_type="batch",
        entity_id=batch_id,
        before={"status": before.value},
        after={
            "status": BatchStatus.RECALLED.value,
            "reason": reason,
            "cancelled_task_ids": cancelled,
            "labelled_episode_ids": labelled,
        },
        factory_id=batch.factory_id,
    )
    session.refresh(batch)
    return BatchClosure(batch=batch, cancelled_task_ids=cancelled, labelled_episode_ids=labelled)


def delete_batch(session: Session, scope: Scope, actor: Actor, batch_id: int) -> None:
    """Soft-delete a pending or cancelled batch with its tasks; 409 once it has episodes."""
    batch = get_row(session, BATCHES, scope, batch_id, for_update=True)
    if batch.status not in {BatchStatus.PENDING, BatchStatus.CANCELLED}:
        raise ConflictError(
            f"batch {batch_id} is {batch.status.value}; only pending or cancelled batches can "
            "be deleted (cancel or recall it first)",
            code="batch_in_use",
            current_status=batch.status.value,
        )
    episodes = session.execute(
        select(func.count()).where(col(Episode.batch_id) == batch_id)
    ).scalar_one()
    if episodes:
        raise ConflictError(
            f"batch {batch_id} is still referenced by {episodes} episodes",
            code="still_referenced",
            referenced_by="episodes",
            count=int(episodes),
        )
    before = snapshot(batch)
    if batch.status is BatchStatus.PENDING:
        transition_batch(session, batch_id, BatchStatus.CANCELLED, values=_ended())
        _cancel_unfinished_tasks(session, batch_id)
    now = clock.now()
    session.execute(
        update(Task)
        .where(col(Task.batch_id) == batch_id, col(Task.deleted_at).is_(None))
        .values(deleted_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Batch)
        .where(col(Batch.id) == batch_id)
        .values(deleted_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    _expire(session, Batch, batch_id)
    record_audit(
        session,
        actor,
        "batch.delete",
        entity_type="batch",
        entity_id=batch_id,
        before=before,
        factory_id=batch.factory_id,
    )


def delete_task(session: Session, scope: Scope, actor: Actor, task_id: int) -> None:
    """Cancel (unless already final) and soft-delete a task; 409 once it has an episode."""
    task = get_row(session, TASKS, scope, task_id, for_update=True)
    episode = session.execute(
        select(col(Episode.episode_id)).where(col(Episode.task_id) == task_id)
    ).scalar_one_or_none()
    if episode is not None:
        raise ConflictError(
            f"task {task_id} has episode {episode}; it cannot be deleted",
            code="still_referenced",
            referenced_by="episodes",
            count=1,
        )
    before = snapshot(task)
    if task.status in TASK_UNFINISHED:
        transition_task(session, task_id, TaskStatus.CANCELLED, expected=TASK_UNFINISHED)
        session.refresh(task)
    task.deleted_at = clock.now()
    task.updated_at = task.deleted_at
    session.add(task)
    session.flush()
    record_audit(
        session,
        actor,
        "task.delete",
        entity_type="task",
        entity_id=task_id,
        before=before,
        after={"status": task.status.value, "deleted_at": task.deleted_at.isoformat()},
        factory_id=task.factory_id,
    )


# --- progress ---------------------------------------------------------------------------


def _expire(session: Session, model: type[SQLModel], row_id: int) -> None:
    """Expire an identity-mapped row after an UPDATE that bypassed the ORM."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, model) and getattr(obj, "id", None) == row_id:
            session.expire(obj)


def _episode_parents(session: Session, episode_id: int) -> tuple[EpisodeStatus, int, int]:
    row = session.execute(
        select(col(Episode.status), col(Episode.order_id), col(Episode.batch_id)).where(
            col(Episode.id) == episode_id
        )
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"episode {episode_id} not found")
    return EpisodeStatus(row[0]), int(row[1]), int(row[2])


def record_verified_upload(session: Session, episode_id: int) -> None:
    """Count one verified upload on the episode's order and batch.

    Call it once per episode, in the transaction that marks the upload verified. The
    increments are SQL expressions, so concurrent verifications never lose a count.
    """
    _status, order_id, batch_id = _episode_parents(session, episode_id)
    session.execute(
        update(Order)
        .where(col(Order.id) == order_id)
        .values(episode_count=col(Order.episode_count) + 1)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Batch)
        .where(col(Batch.id) == batch_id)
        .values(episode_count=col(Batch.episode_count) + 1)
        .execution_options(synchronize_session=False)
    )
    _expire(session, Order, order_id)
    _expire(session, Batch, batch_id)


def record_approval(
    session: Session,
    episode_id: int,
    *,
    sync_target: SyncTarget | None,
    details: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> bool:
    """Count an approved episode on its order, complete the order at its target, queue
    the episode's cloud sync (``sync_target`` None: sync is off) and write its
    ``episode.approved`` event (``details`` added to the payload, e.g. the inspector;
    ``request_id``: the request that caused it, when not the one being served).

    Call it once, in the transaction that moved the episode into ``auto_approved`` or
    ``inspector_approved`` (that conditional transition is what makes it happen once), so
    the sync job and the event commit with the approval — there is no approved episode
    without a job. Any other status (rejected, failed, pending) is not counted: returns
    False.
    """
    status, order_id, _batch_id = _episode_parents(session, episode_id)
    if status not in APPROVED:
        return False
    enqueue_sync(session, episode_id, sync_target, request_id=request_id)
    emit_episode_event(
        session,
        EventType.EPISODE_APPROVED,
        episode_id,
        request_id=request_id,
        **dict(details or {}),
    )
    # The UPDATE takes the order row lock, which complete_order_if_done relies on.
    session.execute(
        update(Order)
        .where(col(Order.id) == order_id)
        .values(approved_count=col(Order.approved_count) + 1)
        .execution_options(synchronize_session=False)
    )
    complete_order_if_done(session, order_id)
    _expire(session, Order, order_id)
    return True


# --- read models for the API ------------------------------------------------------------


@dataclass(frozen=True)
class TaskCounts:
    task_count: int = 0
    completed_count: int = 0
    cancelled_count: int = 0
    failed_count: int = 0


def task_counts(session: Session, column: str, ids: Iterable[int]) -> dict[int, TaskCounts]:
    """Live task counts per order or batch (``column`` is ``order_id`` or ``batch_id``)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    key = col(getattr(Task, column))
    rows = session.execute(
        select(key, col(Task.status), func.count())
        .where(key.in_(wanted), col(Task.deleted_at).is_(None))
        .group_by(key, col(Task.status))
    )
    per: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for owner, status, count in rows:
        per[int(owner)][TaskStatus(status).value] += int(count)
    return {
        owner: TaskCounts(
            task_count=sum(counts.values()),
            completed_count=counts[TaskStatus.COMPLETED.value],
            cancelled_count=counts[TaskStatus.CANCELLED.value],
            failed_count=counts[TaskStatus.FAILED.value],
        )
        for owner, counts in per.items()
    }


def batch_task_groups(session: Session, batch_ids: Iterable[int]) -> dict[int, list[TaskGroup]]:
    """Live (not cancelled, not deleted) tasks of each batch grouped by (sop, subscene)."""
    wanted = sorted(set(batch_ids))
    if not wanted:
        return {}
    rows = session.execute(
        select(col(Task.batch_id), col(Task.sop_id), col(Task.subscene_id), func.count())
        .where(
            col(Task.batch_id).in_(wanted),
            col(Task.deleted_at).is_(None),
            col(Task.status) != TaskStatus.CANCELLED,
        )
        .group_by(col(Task.batch_id), col(Task.sop_id), col(Task.subscene_id))
        .order_by(col(Task.batch_id), col(Task.sop_id), col(Task.subscene_id))
    )
    out: dict[int, list[TaskGroup]] = defaultdict(list)
    for batch_id, sop_id, subscene_id, count in rows:
        out[int(batch_id)].append(
            TaskGroup(sop_id=int(sop_id or 0), subscene_id=int(subscene_id or 0), quantity=count)
        )
    return out


def scene_names(session: Session, ids: Iterable[int | None]) -> dict[int, str]:
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    rows = session.execute(select(col(Scene.id), col(Scene.name)).where(col(Scene.id).in_(wanted)))
    return {int(i): str(n) for i, n in rows}


def subscene_names(session: Session, ids: Iterable[int | None]) -> dict[int, str]:
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    rows = session.execute(
        select(col(Subscene.id), col(Subscene.name)).where(col(Subscene.id).in_(wanted))
    )
    return {int(i): str(n) for i, n in rows}


@dataclass(frozen=True)
class TaskContext:
    """Names and links shown with a task (one query per page, not per row)."""

    batch_public_id: str = ""
    batch_name: str = ""
    scene_name: str = ""
    subscene_name: str = ""
    episode_row_id: int | None = None
    episode_id: str | None = None


def task_contexts(session: Session, tasks: Sequence[Task]) -> dict[int, TaskContext]:
    if not tasks:
        return {}
    batch_ids = sorted({t.batch_id for t in tasks})
    batches = {
        int(i): (str(b), str(n))
        for i, b, n in session.execute(
            select(col(Batch.id), col(Batch.batch_id), col(Batch.name)).where(
                col(Batch.id).in_(batch_ids)
            )
        )
    }
    scenes = scene_names(session, (t.scene_id for t in tasks))
    subscenes = subscene_names(session, (t.subscene_id for t in tasks))
    task_ids = [t.id for t in tasks if t.id is not None]
    episodes = {
        int(t): (int(i), str(e))
        for i, e, t in session.execute(
            select(col(Episode.id), col(Episode.episode_id), col(Episode.task_id)).where(
                col(Episode.task_id).in_(task_ids)
            )
        )
    }
    out: dict[int, TaskContext] = {}
    for task in tasks:
        assert task.id is not None
        batch_public, batch_name = batches.get(task.batch_id, ("", ""))
        episode = episodes.get(task.id)
        out[task.id] = TaskContext(
            batch_public_id=batch_public,
            batch_name=batch_name,
            scene_name=scenes.get(task.scene_id, "") if task.scene_id else "",
            subscene_name=subscenes.get(task.subscene_id, "") if task.subscene_id else "",
            episode_row_id=episode[0] if episode else None,
            episode_id=episode[1] if episode else None,
        )
    return out


@dataclass(frozen=True)
class EpisodeContext:
    """The task, SOP and scene an episode was recorded for."""

    task_public_id: str = ""
    sop_id: int | None = None
    sop_slug: str = ""
    sop_version: str = ""
    scene_id: int | None = None
    scene_name: str = ""
    subscene_id: int | None = None
    subscene_name: str = ""
    workstation_id: int | None = None


def episode_contexts(session: Session, episodes: Sequence[Episode]) -> dict[int, EpisodeContext]:
    task_ids = sorted({e.task_id for e in episodes})
    if not task_ids:
        return {}
    rows = session.execute(
        select(
            col(Task.id),
            col(Task.task_id),
            col(Task.sop_id),
            col(SOP.slug),
            col(SOP.version),
            col(Task.scene_id),
            col(Scene.name),
            col(Task.subscene_id),
            col(Subscene.name),
            col(Task.workstation_id),
        )
        .outerjoin(SOP, col(SOP.id) == col(Task.sop_id))
        .outerjoin(Scene, col(Scene.id) == col(Task.scene_id))
        .outerjoin(Subscene, col(Subscene.id) == col(Task.subscene_id))
        .where(col(Task.id).in_(task_ids))
    )
    by_task = {
        int(r[0]): EpisodeContext(
            task_public_id=str(r[1]),
            sop_id=r[2],
            sop_slug=r[3] or "",
            sop_version=r[4] or "",
            scene_id=r[5],
            scene_name=r[6] or "",
            subscene_id=r[7],
            subscene_name=r[8] or "",
            workstation_id=r[9],
        )
        for r in rows
    }
    return {e.id: by_task.get(e.task_id, EpisodeContext()) for e in episodes if e.id is not None}


def _factory_id(session: Session, model: type[SQLModel], row_id: int) -> int | None:
    table = model.__table__  # type: ignore[attr-defined]
    value = session.execute(select(table.c.factory_id).where(table.c.id == row_id)).scalar()
    return None if value is None else int(value)
