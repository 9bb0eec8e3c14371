"""Row factories for tests: each adds a valid row (and any missing parents), flushes, returns it."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from sqlmodel import Session, SQLModel

from keystone_core.models import (
    SOP,
    Batch,
    DataCollector,
    Episode,
    Factory,
    Inspector,
    Order,
    Organization,
    Robot,
    RobotType,
    Scene,
    Skill,
    Subscene,
    SyncJob,
    Task,
    Workstation,
)

_sequence = itertools.count(1)


def _next() -> int:
    return next(_sequence)


def _add(session: Session, row: SQLModel) -> Any:
    session.add(row)
    session.flush()
    return row


def _parent(session: Session, model: type[SQLModel], row_id: int) -> Any:
    row = session.get(model, row_id)
    if row is None:
        raise LookupError(f"{model.__name__} {row_id} does not exist")
    return row


def make_organization(session: Session, **overrides: Any) -> Organization:
    n = _next()
    values: dict[str, Any] = {"name": f"Organization {n}", "slug": f"org-{n}"}
    values.update(overrides)
    return _add(session, Organization(**values))  # type: ignore[no-any-return]


def make_factory(session: Session, **overrides: Any) -> Factory:
    n = _next()
    if "organization_id" not in overrides:
        overrides["organization_id"] = make_organization(session).id
    values: dict[str, Any] = {"name": f"Factory {n}", "slug": f"factory-{n}"}
    values.update(overrides)
    return _add(session, Factory(**values))  # type: ignore[no-any-return]


def make_order(session: Session, **overrides: Any) -> Order:
    n = _next()
    if "factory_id" not in overrides:
        overrides["factory_id"] = make_factory(session).id
    values: dict[str, Any] = {"name": f"Order {n}", "target_count": 10}
    values.update(overrides)
    return _add(session, Order(**values))  # type: ignore[no-any-return]


def make_batch(session: Session, **overrides: Any) -> Batch:
    """A batch of ``order_id`` (a new order when not given), in the order's factory."""
    n = _next()
    if "order_id" in overrides:
        order = _parent(session, Order, overrides["order_id"])
    else:
        scope = {k: overrides[k] for k in ("factory_id",) if k in overrides}
        order = make_order(session, **scope)
    values: dict[str, Any] = {
        "batch_id": f"batch-{n}",
        "order_id": order.id,
        "factory_id": order.factory_id,
    }
    values.update(overrides)
    return _add(session, Batch(**values))  # type: ignore[no-any-return]


def make_task(session: Session, **overrides: Any) -> Task:
    """A task of ``batch_id`` (a new batch when not given), in the batch's order and factory."""
    n = _next()
    if "batch_id" in overrides:
        batch = _parent(session, Batch, overrides["batch_id"])
    else:
        scope = {k: overrides[k] for k in ("factory_id", "order_id") if k in overrides}
        batch = make_batch(session, **scope)
    values: dict[str, Any] = {
        "task_id": f"task-{n}",
        "batch_id": batch.id,
        "order_id": batch.order_id,
        "factory_id": batch.factory_id,
    }
    values.update(overrides)
    return _add(session, Task(**values))  # type: ignore[no-any-return]


def make_episode(session: Session, **overrides: Any) -> Episode:
    """The episode of ``task_id`` (a new task when not given); parents follow the task."""
    n = _next()
    if "task_id" in overrides:
        task = _parent(session, Task, overrides["task_id"])
    else:
        scope = {k: overrides[k] for k in ("factory_id", "order_id", "batch_id") if k in overrides}
        task = make_task(session, **scope)
    date = dt.date(2026, 1, 15)
    values: dict[str, Any] = {
        "episode_id": f"episode-{n}",
        "task_id": task.id,
        "factory_id": task.factory_id,
        "order_id": task.order_id,
        "batch_id": task.batch_id,
        "device_id": f"device-{n}",
        "recording_date": date,
        "bucket": f"edge-{task.factory_id}",
        "mcap_path": f"{task.factory_id}/device-{n}/{date.isoformat()}/{task.task_id}.mcap",
    }
    values.update(overrides)
    return _add(session, Episode(**values))  # type: ignore[no-any-return]


def make_sync_job(session: Session, **overrides: Any) -> SyncJob:
    """A sync job of ``episode_id`` (a new episode when not given), in the episode's factory."""
    if "episode_id" in overrides:
        episode = _parent(session, Episode, overrides["episode_id"])
    else:
        scope = {k: overrides[k] for k in ("factory_id",) if k in overrides}
        episode = make_episode(session, **scope)
    values: dict[str, Any] = {"episode_id": episode.id, "factory_id": episode.factory_id}
    values.update(overrides)
    return _add(session, SyncJob(**values))  # type: ignore[no-any-return]


def make_robot_type(session: Session, **overrides: Any) -> RobotType:
    n = _next()
    values: dict[str, Any] = {"name": f"Robot type {n}", "model": f"model-{n}"}
    values.update(overrides)
    return _add(session, RobotType(**values))  # type: ignore[no-any-return]


def make_robot(session: Session, **overrides: Any) -> Robot:
    """A robot in ``factory_id`` (a new factory when not given) of a new or given type."""
    n = _next()
    if "factory_id" not in overrides:
        overrides["factory_id"] = make_factory(session).id
    if "robot_type_id" not in overrides:
        overrides["robot_type_id"] = make_robot_type(session).id
    values: dict[str, Any] = {"device_id": f"device-{n}", "name": f"Robot {n}"}
    values.update(overrides)
    return _add(session, Robot(**values))  # type: ignore[no-any-return]


def make_data_collector(session: Session, **overrides: Any) -> DataCollector:
    n = _next()
    if "factory_id" not in overrides:
        overrides["factory_id"] = make_factory(session).id
    values: dict[str, Any] = {"name": f"Collector {n}", "operator_id": f"op-{n}"}
    values.update(overrides)
    return _add(session, DataCollector(**values))  # type: ignore[no-any-return]


def make_workstation(session: Session, **overrides: Any) -> Workstation:
    """A station in ``factory_id`` (a new factory when not given); no robot or collector."""
    n = _next()
    if "factory_id" not in overrides:
        overrides["factory_id"] = make_factory(session).id
    values: dict[str, Any] = {"name": f"Station {n}"}
    values.update(overrides)
    return _add(session, Workstation(**values))  # type: ignore[no-any-return]


def make_inspector(session: Session, **overrides: Any) -> Inspector:
    n = _next()
    if "factory_id" not in overrides:
        overrides["factory_id"] = make_factory(session).id
    values: dict[str, Any] = {"name": f"Inspector {n}", "inspector_id": f"qa-{n}"}
    values.update(overrides)
    return _add(session, Inspector(**values))  # type: ignore[no-any-return]


def make_scene(session: Session, **overrides: Any) -> Scene:
    """A scene of ``factory_id`` (global when given None; a new factory when not given)."""
    n = _next()
    if "factory_id" not in overrides:
        overrides["factory_id"] = make_factory(session).id
    values: dict[str, Any] = {"name": f"Scene {n}"}
    values.update(overrides)
    return _add(session, Scene(**values))  # type: ignore[no-any-return]


def make_subscene(session: Session, **overrides: Any) -> Subscene:
    n = _next()
    if "scene_id" not in overrides:
        overrides["scene_id"] = make_scene(session).id
    values: dict[str, Any] = {"name": f"Subscene {n}"}
    values.update(overrides)
    return _add(session, Subscene(**values))  # type: ignore[no-any-return]


def make_skill(session: Session, **overrides: Any) -> Skill:
    n = _next()
    values: dict[str, Any] = {"slug": f"skill-{n}"}
    values.update(overrides)
    return _add(session, Skill(**values))  # type: ignore[no-any-return]


def make_sop(session: Session, **overrides: Any) -> SOP:
    """An SOP; its ``skill_sequence`` defaults to one new skill."""
    n = _next()
    if "skill_sequence" not in overrides:
        overrides["skill_sequence"] = [make_skill(session).slug]
    values: dict[str, Any] = {"slug": f"sop-{n}"}
    values.update(overrides)
    return _add(session, SOP(**values))  # type: ignore[no-any-return]
