"""Orders, batches (task groups, quota, reuse, cancel, recall) and tasks."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import ColumnElement
from sqlmodel import Session, col

from keystone_api.crud import CONFLICT, ERRORS, NOT_FOUND, Paging, PagingDep, equal_to
from keystone_api.deps import CurrentPrincipal, Principal, SessionDep, SettingsDep
from keystone_api.schemas import IdStr, Page, RowId
from keystone_core.errors import ValidationFailed
from keystone_core.models import (
    Batch,
    BatchStatus,
    Order,
    OrderPriority,
    OrderStatus,
    Task,
    TaskStatus,
)
from keystone_core.services import crud, device_tasks
from keystone_core.services import production as svc
from keystone_core.services.devices import endpoints as device_endpoints
from keystone_core.services.production import BATCHES, ORDERS, TASKS, TaskGroup

router = APIRouter(prefix="/api/v1", tags=["production"])

READ = {**ERRORS, **NOT_FOUND}
WRITE = {**ERRORS, **NOT_FOUND, **CONFLICT}


class Body(BaseModel):
    """Request bodies: unknown fields are refused; only ``NULLABLE`` fields may be null."""

    model_config = ConfigDict(extra="forbid")
    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # `exclude_unset` keeps an explicit null, which would hit a NOT NULL column.
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key in cls.model_fields and key not in cls.NULLABLE:
                    raise ValueError(f"{key} must not be null")
        return data


# --- orders -----------------------------------------------------------------------------


class OrderCreate(Body):
    NULLABLE = frozenset({"scene_id", "deadline"})

    factory_id: int
    name: str = Field(min_length=1, max_length=128)
    scene_id: int | None = None
    target_count: int = Field(ge=1, le=10_000_000)
    priority: OrderPriority = OrderPriority.NORMAL
    deadline: AwareDatetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class OrderUpdate(Body):
    """Fields to change; ``status`` goes through the order state machine."""

    NULLABLE = frozenset({"scene_id", "deadline"})

    name: str | None = Field(default=None, min_length=1, max_length=128)
    scene_id: int | None = None
    target_count: int | None = Field(default=None, ge=1, le=10_000_000)
    priority: OrderPriority | None = None
    status: OrderStatus | None = None
    deadline: AwareDatetime | None = None
    metadata: dict[str, Any] | None = None


class OrderPublic(BaseModel):
    id: IdStr
    factory_id: IdStr
    name: str
    scene_id: IdStr | None
    scene_name: str
    target_count: int
    task_count: int = Field(description="Tasks planned (not deleted), in any status.")
    completed_count: int
    cancelled_count: int
    failed_count: int
    episode_count: int = Field(description="Verified uploads.")
    approved_count: int = Field(description="Auto- or inspector-approved episodes.")
    priority: OrderPriority
    status: OrderStatus
    deadline: datetime | None
    metadata: dict[str, Any]
    created_by_user_id: IdStr | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def _orders_public(session: Session, orders: list[Order]) -> list[OrderPublic]:
    counts = svc.task_counts(session, "order_id", (o.id for o in orders if o.id is not None))
    scenes = svc.scene_names(session, (o.scene_id for o in orders))
    out = []
    for order in orders:
        assert order.id is not None
        c = counts.get(order.id, svc.TaskCounts())
        out.append(
            OrderPublic(
                id=order.id,
                factory_id=order.factory_id,
                name=order.name,
                scene_id=order.scene_id,
                scene_name=scenes.get(order.scene_id, "") if order.scene_id else "",
                target_count=order.target_count,
                task_count=c.task_count,
                completed_count=c.completed_count,
                cancelled_count=c.cancelled_count,
                failed_count=c.failed_count,
                episode_count=order.episode_count,
                approved_count=order.approved_count,
                priority=order.priority,
                status=order.status,
                deadline=order.deadline,
                metadata=order.meta,
                created_by_user_id=order.created_by_user_id,
                created_at=order.created_at,
                updated_at=order.updated_at,
                deleted_at=order.deleted_at,
            )
        )
    return out


def order_filters(
    factory_id: int | None = None,
    status: OrderStatus | None = None,
    priority: OrderPriority | None = None,
    scene_id: int | None = None,
) -> list[ColumnElement[bool]]:
    return equal_to(
        Order, factory_id=factory_id, status=status, priority=priority, scene_id=scene_id
    )


OrderFilters = Annotated[list[ColumnElement[bool]], Depends(order_filters)]


@router.get("/orders", response_model=Page[OrderPublic], responses=ERRORS, summary="List orders")
def list_orders(
    principal: CurrentPrincipal, session: SessionDep, paging: PagingDep, where: OrderFilters
) -> Page[OrderPublic]:
    page = paging.rows(session, ORDERS, principal.scope, where)
    return Page[OrderPublic](
        items=_orders_public(session, page.items),
        total=page.total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderPublic,
    responses=WRITE,
    summary="Create an order (status `created`)",
)
def create_order(
    body: OrderCreate, principal: CurrentPrincipal, session: SessionDep
) -> OrderPublic:
    order = svc.create_order(
        session,
        principal.scope,
        principal.actor,
        body.model_dump(exclude_unset=True),
        user_id=principal.user.id,
    )
    return _orders_public(session, [order])[0]


@router.get("/orders/{id}", response_model=OrderPublic, responses=READ, summary="Get one order")
def get_order(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> OrderPublic:
    order = crud.get_row(session, ORDERS, principal.scope, id)
    return _orders_public(session, [order])[0]


@router.put(
    "/orders/{id}",
    response_model=OrderPublic,
    responses=WRITE,
    summary="Update an order; a status change is checked by the order state machine",
)
def update_order(
    id: int, body: OrderUpdate, principal: CurrentPrincipal, session: SessionDep
) -> OrderPublic:
    order = svc.update_order(
        session, principal.scope, principal.actor, id, body.model_dump(exclude_unset=True)
    )
    return _orders_public(session, [order])[0]


@router.delete(
    "/orders/{id}",
    status_code=204,
    response_class=Response,
    responses=WRITE,
    summary="Delete an order (409 while it has batches)",
)
def delete_order(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    crud.delete_row(session, ORDERS, principal.scope, principal.actor, id)
    return Response(status_code=204)


# --- batches ----------------------------------------------------------------------------


class TaskGroupIn(Body):
    sop_id: int
    subscene_id: int
    quantity: int = Field(ge=1, le=svc.MAX_TASKS_PER_REQUEST)


class TaskGroupOut(BaseModel):
    sop_id: IdStr
    subscene_id: IdStr
    quantity: int


class BatchCreate(Body):
    order_id: int
    workstation_id: int
    name: str = Field(default="", max_length=128)
    notes: str = Field(default="", max_length=8192)
    task_groups: list[TaskGroupIn] = Field(min_length=1, max_length=100)
    metadata: dict[str, Any] = Field(default_factory=dict)


class BatchTasksAdd(Body):
    task_groups: list[TaskGroupIn] = Field(min_length=1, max_length=100)


class BatchPatch(Body):
    """``status`` accepts only `cancelled` (recall has its own route); other fields are text."""

    status: BatchStatus | None = None
    name: str | None = Field(default=None, max_length=128)
    notes: str | None = Field(default=None, max_length=8192)
    metadata: dict[str, Any] | None = None


class RecallRequest(Body):
    reason: str = Field(default="", max_length=1024)


class BatchPublic(BaseModel):
    id: IdStr
    batch_id: str = Field(description="Public id `batch_YYYYMMDD_HHMMSS_mmm_NN_<hex>`.")
    order_id: IdStr
    workstation_id: IdStr | None
    factory_id: IdStr
    name: str
    notes: str
    status: BatchStatus
    target_count: int = Field(description="Tasks planned in this batch over its lifetime.")
    task_count: int
    completed_count: int
    cancelled_count: int
    failed_count: int
    episode_count: int
    task_groups: list[TaskGroupOut] = Field(
        description="Tasks not cancelled, grouped by SOP and subscene."
    )
    started_at: datetime | None
    ended_at: datetime | None
    recalled_at: datetime | None
    recall_reason: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class TaskCreated(BaseModel):
    id: IdStr
    task_id: str
    sop_id: IdStr | None
    subscene_id: IdStr | None
    status: TaskStatus
    created_at: datetime


class BatchCreated(BaseModel):
    batch: BatchPublic
    tasks: list[TaskCreated]
    reused: bool = Field(
        description="True when an open batch of the same order and station got the tasks."
    )


class BatchTasksAdded(BaseModel):
    batch: BatchPublic
    created_tasks: list[TaskCreated]


class BatchRecalled(BaseModel):
    batch: BatchPublic
    cancelled_task_count: int
    labelled_episode_count: int


def _batches_public(session: Session, batches: list[Batch]) -> list[BatchPublic]:
    ids = [b.id for b in batches if b.id is not None]
    counts = svc.task_counts(session, "batch_id", ids)
    groups = svc.batch_task_groups(session, ids)
    out = []
    for batch in batches:
        assert batch.id is not None
        c = counts.get(batch.id, svc.TaskCounts())
        out.append(
            BatchPublic(
                id=batch.id,
                batch_id=batch.batch_id,
                order_id=batch.order_id,
                workstation_id=batch.workstation_id,
                factory_id=batch.factory_id,
                name=batch.name,
                notes=batch.notes,
                status=batch.status,
                target_count=batch.target_count,
                task_count=c.task_count,
                completed_count=c.completed_count,
                cancelled_count=c.cancelled_count,
                failed_count=c.failed_count,
                episode_count=batch.episode_count,
                task_groups=[
                    TaskGroupOut(sop_id=g.sop_id, subscene_id=g.subscene_id, quantity=g.quantity)
                    for g in groups.get(batch.id, [])
                ],
                started_at=batch.started_at,
                ended_at=batch.ended_at,
                recalled_at=batch.recalled_at,
                recall_reason=batch.recall_reason,
                metadata=batch.meta,
                created_at=batch.created_at,
                updated_at=batch.updated_at,
                deleted_at=batch.deleted_at,
            )
        )
    return out


def _created(tasks: list[Task]) -> list[TaskCreated]:
    return [
        TaskCreated(
            id=t.id,
            task_id=t.task_id,
            sop_id=t.sop_id,
            subscene_id=t.subscene_id,
            status=t.status,
            created_at=t.created_at,
        )
        for t in tasks
    ]


def _groups(items: list[TaskGroupIn]) -> list[TaskGroup]:
    return [
        TaskGroup(sop_id=g.sop_id, subscene_id=g.subscene_id, quantity=g.quantity) for g in items
    ]


def batch_filters(
    order_id: int | None = None,
    workstation_id: int | None = None,
    status: BatchStatus | None = None,
    factory_id: int | None = None,
) -> list[ColumnElement[bool]]:
    return equal_to(
        Batch,
        order_id=order_id,
        workstation_id=workstation_id,
        status=status,
        factory_id=factory_id,
    )


BatchFilters = Annotated[list[ColumnElement[bool]], Depends(batch_filters)]


@router.get(
    "/batches",
    response_model=Page[BatchPublic],
    responses=ERRORS,
    summary="List batches (a data collector sees its own stations' batches)",
)
def list_batches(
    principal: CurrentPrincipal, session: SessionDep, paging: PagingDep, where: BatchFilters
) -> Page[BatchPublic]:
    page = paging.rows(session, BATCHES, principal.scope, where)
    return Page[BatchPublic](
        items=_batches_public(session, page.items),
        total=page.total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post(
    "/batches",
    status_code=201,
    response_model=BatchCreated,
    responses={
        200: {"model": BatchCreated, "description": "tasks added to an existing open batch"},
        **WRITE,
    },
    summary="Plan tasks for a station: a new batch, or the open one of that order and station",
)
def create_batch(
    body: BatchCreate, principal: CurrentPrincipal, session: SessionDep, response: Response
) -> BatchCreated:
    result = svc.create_batch(
        session,
        principal.scope,
        principal.actor,
        order_id=body.order_id,
        workstation_id=body.workstation_id,
        task_groups=_groups(body.task_groups),
        name=body.name,
        notes=body.notes,
        metadata=body.metadata,
    )
    if result.reused:
        response.status_code = 200
    return BatchCreated(
        batch=_batches_public(session, [result.batch])[0],
        tasks=_created(result.tasks),
        reused=result.reused,
    )


@router.get("/batches/{id}", response_model=BatchPublic, responses=READ, summary="Get one batch")
def get_batch(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> BatchPublic:
    batch = crud.get_row(session, BATCHES, principal.scope, id)
    return _batches_public(session, [batch])[0]


@router.patch(
    "/batches/{id}",
    response_model=BatchPublic,
    responses=WRITE,
    summary="Edit name/notes/metadata, or cancel (`status: cancelled`) with its unfinished tasks",
)
def patch_batch(
    id: int, body: BatchPatch, principal: CurrentPrincipal, session: SessionDep
) -> BatchPublic:
    changes = body.model_dump(exclude_unset=True)
    status = changes.pop("status", None)
    if status is not None and status is not BatchStatus.CANCELLED:
        raise ValidationFailed(
            "PATCH only sets status `cancelled`; use POST /api/v1/batches/{id}/recall to recall",
            code="unsupported_status",
            field="status",
        )
    batch = crud.get_row(session, BATCHES, principal.scope, id)
    if changes:
        batch = svc.update_batch(session, principal.scope, principal.actor, id, changes)
    if status is not None:
        batch = svc.cancel_batch(session, principal.scope, principal.actor, id).batch
    return _batches_public(session, [batch])[0]


@router.delete(
    "/batches/{id}",
    status_code=204,
    response_class=Response,
    responses=WRITE,
    summary="Delete a pending or cancelled batch and its tasks (409 once it has episodes)",
)
def delete_batch(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    svc.delete_batch(session, principal.scope, principal.actor, id)
    return Response(status_code=204)


@router.post(
    "/batches/{id}/recall",
    response_model=BatchRecalled,
    responses=WRITE,
    summary="Recall an active or completed batch: cancel unfinished tasks, label its episodes",
)
def recall_batch(
    id: int, body: RecallRequest, principal: CurrentPrincipal, session: SessionDep
) -> BatchRecalled:
    result = svc.recall_batch(session, principal.scope, principal.actor, id, body.reason)
    return BatchRecalled(
        batch=_batches_public(session, [result.batch])[0],
        cancelled_task_count=len(result.cancelled_task_ids),
        labelled_episode_count=len(result.labelled_episode_ids),
    )


@router.post(
    "/batches/{id}/tasks",
    status_code=201,
    response_model=BatchTasksAdded,
    responses=WRITE,
    summary="Add tasks to an open batch (same quota rule as creating a batch)",
)
def add_batch_tasks(
    id: int, body: BatchTasksAdd, principal: CurrentPrincipal, session: SessionDep
) -> BatchTasksAdded:
    result = svc.add_batch_tasks(
        session, principal.scope, principal.actor, id, _groups(body.task_groups)
    )
    return BatchTasksAdded(
        batch=_batches_public(session, [result.batch])[0], created_tasks=_created(result.tasks)
    )


# --- tasks ------------------------------------------------------------------------------


class TaskEpisodeRef(BaseModel):
    id: IdStr
    episode_id: str


class TaskPublic(BaseModel):
    id: IdStr
    task_id: str = Field(description="Public id the device sees (`task_…`).")
    batch_id: IdStr
    batch_public_id: str
    batch_name: str
    order_id: IdStr
    factory_id: IdStr
    workstation_id: IdStr | None
    robot_id: IdStr | None
    data_collector_id: IdStr | None
    sop_id: IdStr | None
    scene_id: IdStr | None
    scene_name: str
    subscene_id: IdStr | None
    subscene_name: str
    status: TaskStatus
    outcome_unknown: bool
    error_message: str
    min_duration_s: float | None
    max_duration_s: float | None
    assigned_at: datetime | None
    ready_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    upload_acked_at: datetime | None
    episode: TaskEpisodeRef | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def _tasks_public(session: Session, tasks: list[Task]) -> list[TaskPublic]:
    contexts = svc.task_contexts(session, tasks)
    out = []
    for task in tasks:
        assert task.id is not None
        ctx = contexts[task.id]
        episode = (
            TaskEpisodeRef(id=ctx.episode_row_id, episode_id=ctx.episode_id)
            if ctx.episode_row_id is not None and ctx.episode_id is not None
            else None
        )
        out.append(
            TaskPublic(
                id=task.id,
                task_id=task.task_id,
                batch_id=task.batch_id,
                batch_public_id=ctx.batch_public_id,
                batch_name=ctx.batch_name,
                order_id=task.order_id,
                factory_id=task.factory_id,
                workstation_id=task.workstation_id,
                robot_id=task.robot_id,
                data_collector_id=task.data_collector_id,
                sop_id=task.sop_id,
                scene_id=task.scene_id,
                scene_name=ctx.scene_name,
                subscene_id=task.subscene_id,
                subscene_name=ctx.subscene_name,
                status=task.status,
                outcome_unknown=task.outcome_unknown,
                error_message=task.error_message,
                min_duration_s=task.min_duration_s,
                max_duration_s=task.max_duration_s,
                assigned_at=task.assigned_at,
                ready_at=task.ready_at,
                started_at=task.started_at,
                completed_at=task.completed_at,
                upload_acked_at=task.upload_acked_at,
                episode=episode,
                metadata=task.meta,
                created_at=task.created_at,
                updated_at=task.updated_at,
                deleted_at=task.deleted_at,
            )
        )
    return out


def task_filters(
    batch_id: int | None = None,
    order_id: int | None = None,
    status: TaskStatus | None = None,
    workstation_id: int | None = None,
    factory_id: int | None = None,
) -> list[ColumnElement[bool]]:
    return equal_to(
        Task,
        batch_id=batch_id,
        order_id=order_id,
        status=status,
        workstation_id=workstation_id,
        factory_id=factory_id,
    )


TaskFilters = Annotated[list[ColumnElement[bool]], Depends(task_filters)]


def _task_page(
    session: Session, principal: Principal, paging: Paging, where: list[ColumnElement[bool]]
) -> Page[TaskPublic]:
    page = paging.rows(session, TASKS, principal.scope, where)
    return Page[TaskPublic](
        items=_tasks_public(session, page.items),
        total=page.total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get(
    "/batches/{id}/tasks",
    response_model=Page[TaskPublic],
    responses=READ,
    summary="List the tasks of one batch",
)
def list_batch_tasks(
    id: RowId,
    principal: CurrentPrincipal,
    session: SessionDep,
    paging: PagingDep,
    status: Annotated[TaskStatus | None, Query()] = None,
) -> Page[TaskPublic]:
    crud.get_row(session, BATCHES, principal.scope, id, include_deleted=paging.include_deleted)
    where: list[ColumnElement[bool]] = [col(Task.batch_id) == id]
    if status is not None:
        where.append(col(Task.status) == status)
    return _task_page(session, principal, paging, where)


@router.get(
    "/tasks",
    response_model=Page[TaskPublic],
    responses=ERRORS,
    summary="List tasks (a data collector sees its own stations' tasks)",
)
def list_tasks(
    principal: CurrentPrincipal, session: SessionDep, paging: PagingDep, where: TaskFilters
) -> Page[TaskPublic]:
    return _task_page(session, principal, paging, where)


@router.get(
    "/tasks/{id}", response_model=TaskPublic, responses=READ, summary="Get one task by numeric id"
)
def get_task(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> TaskPublic:
    task = crud.get_row(session, TASKS, principal.scope, id)
    return _tasks_public(session, [task])[0]


@router.delete(
    "/tasks/{id}",
    status_code=204,
    response_class=Response,
    responses=WRITE,
    summary="Cancel (unless finished) and delete a task; 409 once it has an episode",
)
def delete_task(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    svc.delete_task(session, principal.scope, principal.actor, id)
    return Response(status_code=204)


class TaskConfig(BaseModel):
    """The recorder's ``task_config`` (axon-protocol.md §4); unset optional keys are omitted."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    device_id: str
    order_id: str
    factory: str
    start_callback_url: str
    finish_callback_url: str
    user_token: str = Field(description="Authorises this task's callbacks only.")
    data_collector_id: str | None = None
    operator_name: str | None = None
    workstation_id: str | None = None
    scene: str | None = None
    subscene: str | None = None
    initial_scene_layout: str | None = None
    sop_id: str | None = None
    skills: list[str] | None = None
    topics: list[str] | None = None


@router.get(
    "/tasks/{id}/config",
    response_model=TaskConfig,
    response_model_exclude_none=True,
    responses={**READ, **CONFLICT},
    summary="The recorder task config of a task (what the config RPC sends)",
)
def get_task_config(
    id: RowId,
    request: Request,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    task = crud.get_row(session, TASKS, principal.scope, id)
    links = device_endpoints(settings, str(request.base_url))
    return device_tasks.task_config(session, settings, task, links)
