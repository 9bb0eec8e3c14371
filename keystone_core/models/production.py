"""Production: orders are split into batches, batches into tasks (one episode each)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, Text
from sqlmodel import Field

from keystone_core.models.base import (
    SoftDeleted,
    double_field,
    enum_field,
    fk_field,
    id_field,
    metadata_field,
    utc_field,
)
from keystone_core.models.enums import BatchStatus, OrderPriority, OrderStatus, TaskStatus


class Order(SoftDeleted, table=True):
    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_factory_status", "factory_id", "status"),)

    id: int | None = id_field()
    factory_id: int = fk_field("factories.id")
    name: str = Field(max_length=128)
    scene_id: int | None = fk_field("scenes.id", nullable=True)
    target_count: int = Field(ge=1)
    # Verified uploads and approved episodes (auto or inspector); complete at target.
    episode_count: int = Field(default=0)
    approved_count: int = Field(default=0)
    priority: OrderPriority = enum_field(OrderPriority, OrderPriority.NORMAL)
    status: OrderStatus = enum_field(OrderStatus, OrderStatus.CREATED, index=True)
    deadline: datetime | None = utc_field()
    meta: dict[str, Any] = metadata_field()
    created_by_user_id: int | None = fk_field("users.id", nullable=True)


class Batch(SoftDeleted, table=True):
    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_order_status", "order_id", "status"),)

    id: int | None = id_field()
    batch_id: str = Field(max_length=64, unique=True)
    order_id: int = fk_field("orders.id")
    factory_id: int = fk_field("factories.id")
    workstation_id: int | None = fk_field("workstations.id", nullable=True)
    name: str = Field(default="", max_length=128)
    notes: str = Field(default="", sa_type=Text)
    target_count: int = Field(default=0, ge=0)
    episode_count: int = Field(default=0, ge=0)
    status: BatchStatus = enum_field(BatchStatus, BatchStatus.PENDING, index=True)
    started_at: datetime | None = utc_field()
    ended_at: datetime | None = utc_field()
    recalled_at: datetime | None = utc_field()
    recall_reason: str = Field(default="", max_length=1024)
    meta: dict[str, Any] = metadata_field()


class Task(SoftDeleted, table=True):
    """One recording assignment; ``task_id`` is the id the device sees (idempotency key)."""

    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_factory_status", "factory_id", "status"),
        Index("ix_tasks_batch_status", "batch_id", "status"),
        # Dashboards: tasks assigned and completed per local day (trend, "today").
        Index("ix_tasks_factory_assigned", "factory_id", "assigned_at"),
        Index("ix_tasks_factory_completed", "factory_id", "completed_at"),
    )

    id: int | None = id_field()
    task_id: str = Field(max_length=64, unique=True)
    batch_id: int = fk_field("batches.id")
    order_id: int = fk_field("orders.id")
    factory_id: int = fk_field("factories.id")
    workstation_id: int | None = fk_field("workstations.id", nullable=True)
    robot_id: int | None = fk_field("robots.id", nullable=True)
    data_collector_id: int | None = fk_field("data_collectors.id", nullable=True)
    scene_id: int | None = fk_field("scenes.id", nullable=True)
    subscene_id: int | None = fk_field("subscenes.id", nullable=True)
    skill_id: int | None = fk_field("skills.id", nullable=True)
    sop_id: int | None = fk_field("sops.id", nullable=True)
    status: TaskStatus = enum_field(TaskStatus, TaskStatus.PENDING, index=True)
    # Recorder quit mid-recording: the outcome is recovered through the transfer side.
    outcome_unknown: bool = Field(default=False)
    # The per-task callback token (task config ``user_token``), stored as SHA-256 only.
    user_token_hash: str | None = Field(default=None, max_length=64, unique=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    min_duration_s: float | None = double_field(ge=0)
    max_duration_s: float | None = double_field(ge=0)
    error_message: str = Field(default="", sa_type=Text)
    assigned_at: datetime | None = utc_field()
    ready_at: datetime | None = utc_field()
    started_at: datetime | None = utc_field()
    completed_at: datetime | None = utc_field()
    upload_acked_at: datetime | None = utc_field()
    meta: dict[str, Any] = metadata_field()
