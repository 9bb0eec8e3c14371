"""Tasks as the recorder sees them: the task config, the callbacks, following device state.

Task status follows the device and accepts whichever signal arrives first, because any of
them can be lost (the recorder never retries a callback; a socket can drop before a
reply): ``ready`` once the config is applied, ``in_progress`` on the start callback or a
``recording`` state, ``uploading`` on the finish callback or the recorder going idle after
recording. A late or repeated signal never moves a task backwards or out of a final state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    TransitionConflict,
)
from keystone_core.models import (
    SOP,
    Batch,
    BatchStatus,
    DataCollector,
    Factory,
    Order,
    OrderStatus,
    Robot,
    RobotType,
    Scene,
    Skill,
    Subscene,
    Task,
    TaskStatus,
    Workstation,
)
from keystone_core.security import DEVICE_TOKEN_PREFIX, callback_token, callback_token_matches
from keystone_core.services.devices import (
    DeviceEndpoints,
    DeviceIdentity,
    authenticate_device_token,
)
from keystone_core.services.outbox import emit_task_completed
from keystone_core.services.presence import record_event
from keystone_core.settings import Settings
from keystone_core.states import TASK, transition_task

log = logging.getLogger(__name__)

# axon-protocol.md §4.2: what the devices can put in a file name and an object key.
DEVICE_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ASCII_TEXT = re.compile(r"^[\x20-\x7e]*$")

_FORWARD = (
    TaskStatus.PENDING,
    TaskStatus.READY,
    TaskStatus.IN_PROGRESS,
    TaskStatus.UPLOADING,
    TaskStatus.COMPLETED,
)
_RANK = {status: rank for rank, status in enumerate(_FORWARD)}
_STAMPS = {
    TaskStatus.READY: "ready_at",
    TaskStatus.IN_PROGRESS: "started_at",
    TaskStatus.COMPLETED: "completed_at",
}


def _device_text(value: str, limit: int, fallback: str) -> str:
    """ASCII the recorder keeps intact (it strips non-ASCII bytes and cuts by bytes)."""
    value = value.strip()
    if value and _ASCII_TEXT.match(value) and len(value) <= limit:
        return value
    return fallback


# --- following the device -------------------------------------------------------------


@dataclass(frozen=True)
class Advance:
    """What a device signal did to a task."""

    task: Task
    before: TaskStatus
    after: TaskStatus

    @property
    def changed(self) -> bool:
        return self.before is not self.after

    @property
    def ignored_as_late(self) -> bool:
        return not self.changed and self.before in TASK.final


def advance_task(session: Session, task: Task, target: TaskStatus, **values: Any) -> Advance:
    """Move ``task`` forward to ``target`` through the allowed edges; never backwards.

    A task already at or past ``target`` (or final) is left alone: late and repeated
    device signals are normal. ``values`` are set with the last step. Reaching
    ``completed`` writes the ``task.completed`` outbox event in the same transaction.
    """
    assert task.id is not None
    before = task.status
    for _attempt in range(3):
        session.refresh(task)
        current = task.status
        if current in TASK.final or _RANK[current] >= _RANK[target]:
            return Advance(task=task, before=before, after=current)
        step = target
        if not TASK.is_allowed(current, target):
            step = _FORWARD[_RANK[current] + 1]
        stamp = _STAMPS.get(step)
        changes: dict[str, Any] = dict(values) if step is target else {}
        if stamp and getattr(task, stamp) is None:
            changes[stamp] = clock.now()
        try:
            transition_task(session, task.id, step, expected={current}, values=changes)
        except TransitionConflict:
            continue  # somebody else moved it; look again
        if step is TaskStatus.COMPLETED:
            emit_task_completed(session, task.id)
    session.refresh(task)
    return Advance(task=task, before=before, after=task.status)


def drop_config(session: Session, task: Task, reason: str) -> bool:
    """The recorder no longer holds this ready task's config: back to ``pending``."""
    assert task.id is not None
    try:
        transition_task(
            session,
            task.id,
            TaskStatus.PENDING,
            expected={TaskStatus.READY},
            values={"ready_at": None, "error_message": reason[:2000]},
        )
    except TransitionConflict:
        return False
    session.refresh(task)
    return True


def _end_task(session: Session, task: Task, target: TaskStatus, values: dict[str, Any]) -> bool:
    """Move an open task to a final state; False when it is final already (or moved first)."""
    assert task.id is not None
    if task.status in TASK.final:
        return False
    try:
        transition_task(session, task.id, target, values=values)
    except TransitionConflict:
        return False
    session.refresh(task)
    return True


def fail_task(session: Session, task: Task, reason: str) -> bool:
    values = {"error_message": reason[:2000], "completed_at": clock.now()}
    return _end_task(session, task, TaskStatus.FAILED, values)


def cancel_task(session: Session, task: Task, reason: str) -> bool:
    return _end_task(session, task, TaskStatus.CANCELLED, {"error_message": reason[:2000]})


def mark_outcome_unknown(session: Session, task: Task, reason: str) -> None:
    """Recorder quit or restarted mid-recording: recovered later through the transfer side."""
    if task.status is TaskStatus.IN_PROGRESS and not task.outcome_unknown:
        task.outcome_unknown = True
        task.error_message = reason[:2000]
        task.updated_at = clock.now()
        session.add(task)
        session.flush()


def device_task(session: Session, device: DeviceIdentity, task_id: str) -> Task | None:
    """The live task ``task_id`` configured on this device (None for anything else)."""
    task = session.exec(
        select(Task).where(col(Task.task_id) == task_id, col(Task.deleted_at).is_(None))
    ).first()
    if task is None or task.robot_id != device.robot_id:
        return None
    return task


def open_device_tasks(
    session: Session, device: DeviceIdentity, statuses: tuple[TaskStatus, ...]
) -> list[Task]:
    return list(
        session.exec(
            select(Task).where(
                col(Task.robot_id) == device.robot_id,
                col(Task.status).in_(statuses),
                col(Task.deleted_at).is_(None),
            )
        ).all()
    )


# --- task config ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigContext:
    task: Task
    robot: Robot
    factory: Factory


def _station_robot(session: Session, task: Task) -> Robot | None:
    if task.robot_id is not None:
        return session.get(Robot, task.robot_id)
    if task.workstation_id is None:
        return None
    station = session.get(Workstation, task.workstation_id)
    if station is None or station.robot_id is None:
        return None
    return session.get(Robot, station.robot_id)


def task_config(
    session: Session,
    settings: Settings,
    task: Task,
    links: DeviceEndpoints,
    *,
    robot: Robot | None = None,
) -> dict[str, Any]:
    """The recorder's ``task_config`` (axon-protocol.md §4): unset keys omitted, never null.

    Text the recorder writes into the MCAP and sidecar is sent as ASCII codes; the
    human-readable names stay in Keystone's database.
    """
    robot = robot or _station_robot(session, task)
    if robot is None or robot.deleted_at is not None:
        raise ConflictError(
            f"task {task.task_id} has no robot: bind a robot to its station first",
            code="task_not_configurable",
            current_status=task.status.value,
        )
    if not DEVICE_SAFE_ID.match(task.task_id) or not DEVICE_SAFE_ID.match(robot.device_id):
        raise ConflictError(
            "task or device id is not safe for the device's file names",
            code="task_not_configurable",
            current_status=task.status.value,
        )
    factory = session.get(Factory, task.factory_id)
    assert factory is not None
    config: dict[str, Any] = {
        "task_id": task.task_id,
        "device_id": robot.device_id,
        "order_id": str(task.order_id),
        "factory": _device_text(factory.slug, 128, f"factory-{factory.id}"),
        "start_callback_url": links.start_callback_url,
        "finish_callback_url": links.finish_callback_url,
        "user_token": callback_token(settings, task.task_id),
    }
    if task.workstation_id is not None:
        config["workstation_id"] = str(task.workstation_id)
    collector_id = task.data_collector_id
    if collector_id is None and task.workstation_id is not None:
        station = session.get(Workstation, task.workstation_id)
        collector_id = station.data_collector_id if station else None
    if collector_id is not None:
        collector = session.get(DataCollector, collector_id)
        if collector is not None:
            code = _device_text(collector.operator_id, 128, f"collector-{collector.id}")
            config["data_collector_id"] = code
            config["operator_name"] = code
    if task.scene_id is not None:
        scene = session.get(Scene, task.scene_id)
        if scene is not None:
            config["scene"] = _device_text(scene.name, 128, f"scene-{scene.id}")
    if task.subscene_id is not None:
        subscene = session.get(Subscene, task.subscene_id)
        if subscene is not None:
            config["subscene"] = _device_text(subscene.name, 128, f"subscene-{subscene.id}")
            if subscene.initial_scene_layout:
                config["initial_scene_layout"] = subscene.initial_scene_layout
    if task.sop_id is not None:
        sop = session.get(SOP, task.sop_id)
        if sop is not None:
            config["sop_id"] = _device_text(sop.slug, 128, f"sop-{sop.id}")
            skills = _skill_slugs(session, sop.skill_sequence)
            if skills:
                config["skills"] = skills
    robot_type = session.get(RobotType, robot.robot_type_id)
    if robot_type is not None and robot_type.ros_topics:
        config["topics"] = [t for t in robot_type.ros_topics if isinstance(t, str) and t]
    return config


def _skill_slugs(session: Session, sequence: list[str]) -> list[str]:
    """A SOP's skill sequence (skill ids or slugs) as device-safe slugs, order kept."""
    ids = [int(s) for s in sequence if str(s).isdigit()]
    by_id = {
        str(s.id): s.slug
        for s in session.exec(select(Skill).where(col(Skill.id).in_(ids))).all()
        if ids
    }
    out = []
    for entry in sequence:
        slug = by_id.get(str(entry), str(entry))
        if slug and _ASCII_TEXT.match(slug):
            out.append(slug[:64])
    return out


def check_configurable(session: Session, task: Task, robot: Robot) -> None:
    """A task can be sent to ``robot``: pending or ready, its order and batch running."""
    if task.deleted_at is not None:
        raise NotFoundError(f"task {task.id} not found", code="task_not_found")
    if task.status not in (TaskStatus.PENDING, TaskStatus.READY):
        raise ConflictError(
            f"task {task.task_id} is {task.status.value}; only pending tasks can be configured",
            code="task_not_configurable",
            current_status=task.status.value,
        )
    if task.factory_id != robot.factory_id:
        raise ConflictError(
            f"task {task.task_id} belongs to another factory than device {robot.device_id}",
            code="task_not_configurable",
            current_status=task.status.value,
        )
    if task.robot_id is not None and task.robot_id != robot.id:
        raise ConflictError(
            f"task {task.task_id} is assigned to another robot",
            code="task_not_configurable",
            current_status=task.status.value,
        )
    if task.workstation_id is not None:
        station = session.get(Workstation, task.workstation_id)
        if station is None or station.robot_id != robot.id:
            raise ConflictError(
                f"task {task.task_id} belongs to a station where device "
                f"{robot.device_id} is not bound",
                code="task_not_configurable",
                current_status=task.status.value,
            )
    batch = session.get(Batch, task.batch_id)
    order = session.get(Order, task.order_id)
    if batch is None or batch.status not in (BatchStatus.PENDING, BatchStatus.ACTIVE):
        raise ConflictError(
            f"task {task.task_id}'s batch is not open",
            code="task_not_configurable",
            current_status=task.status.value,
        )
    if order is None or order.status not in (OrderStatus.CREATED, OrderStatus.IN_PROGRESS):
        raise ConflictError(
            f"task {task.task_id}'s order is not in production",
            code="task_not_configurable",
            current_status=task.status.value,
        )


def next_station_task(session: Session, robot: Robot) -> Task:
    """The oldest pending task of an open batch at the station where ``robot`` stands."""
    station = session.exec(
        select(Workstation).where(
            col(Workstation.robot_id) == robot.id, col(Workstation.deleted_at).is_(None)
        )
    ).first()
    if station is None:
        raise ConflictError(
            f"device {robot.device_id} is not bound to a station",
            code="task_not_configurable",
            current_status="not_found",
        )
    task = session.exec(
        select(Task)
        .join(Batch, col(Batch.id) == col(Task.batch_id))
        .join(Order, col(Order.id) == col(Task.order_id))
        .where(
            col(Task.workstation_id) == station.id,
            col(Task.status) == TaskStatus.PENDING,
            col(Task.deleted_at).is_(None),
            col(Batch.status).in_((BatchStatus.PENDING, BatchStatus.ACTIVE)),
            col(Order.status).in_((OrderStatus.CREATED, OrderStatus.IN_PROGRESS)),
        )
        .order_by(col(Task.id))
    ).first()
    if task is None:
        raise ConflictError(
            f"station {station.id} has no pending task",
            code="task_not_configurable",
            current_status="not_found",
        )
    return task


def assign_task(session: Session, task: Task, robot: Robot) -> None:
    """Bind the task to the robot (and the station's collector) before the config is sent."""
    changed = False
    if task.robot_id != robot.id:
        task.robot_id = robot.id
        changed = True
    if task.data_collector_id is None and task.workstation_id is not None:
        station = session.get(Workstation, task.workstation_id)
        if station is not None and station.data_collector_id is not None:
            task.data_collector_id = station.data_collector_id
            changed = True
    if task.assigned_at is None:
        task.assigned_at = clock.now()
        changed = True
    if changed:
        task.updated_at = clock.now()
        session.add(task)
        session.flush()


# --- callbacks ------------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackCaller:
    """Who sent a callback: by the task's own token or by the device's token."""

    task: Task
    device: DeviceIdentity
    via: str  # "task_token" | "device_token"
    token_expired: bool


def authenticate_callback(
    session: Session, settings: Settings, task_id: str, bearer: str | None
) -> CallbackCaller:
    """The task of a callback and the credential that may speak for it.

    Unknown task → 404. A task token of another task, or a device token of another
    device → 403. An expired task token for the matching task is accepted and flagged:
    the recorder never retries, and a rejected callback would be lost for good.
    """
    task = session.exec(
        select(Task).where(col(Task.task_id) == task_id, col(Task.deleted_at).is_(None))
    ).first()
    if task is None:
        raise NotFoundError(f"task {task_id} not found", code="task_not_found")
    if not bearer:
        raise AuthenticationError(
            "missing bearer token (the task config's user_token)", code="missing_token"
        )
    robot = None if task.robot_id is None else session.get(Robot, task.robot_id)
    if bearer.startswith(DEVICE_TOKEN_PREFIX):
        device = authenticate_device_token(session, bearer)
        if robot is None or robot.id != device.robot_id:
            raise PermissionDeniedError(
                f"task {task_id} is not a task of device {device.device_id}",
                code="task_of_another_device",
            )
        return CallbackCaller(task=task, device=device, via="device_token", token_expired=False)
    if not callback_token_matches(settings, task.task_id, bearer):
        raise PermissionDeniedError(
            f"the token is not the callback token of task {task_id}", code="token_not_for_task"
        )
    if robot is None or robot.deleted_at is not None:
        raise PermissionDeniedError(
            f"task {task_id} is not configured on any device", code="task_not_configured"
        )
    expired = False
    if task.status in TASK.final:
        ended = task.completed_at or task.updated_at
        expired = clock.now() - ended > timedelta(hours=settings.callback_token_grace_hours)
    assert robot.id is not None
    device = DeviceIdentity(
        robot_id=robot.id,
        factory_id=robot.factory_id,
        device_id=robot.device_id,
        robot_type_id=robot.robot_type_id,
    )
    return CallbackCaller(task=task, device=device, via="task_token", token_expired=expired)


FINISH_FIELDS = (
    "started_at",
    "finished_at",
    "duration_sec",
    "message_count",
    "file_size_bytes",
    "output_path",
    "sidecar_path",
    "sidecar_enabled",
    "sidecar_generated",
)


def on_start_callback(session: Session, caller: CallbackCaller, body: Mapping[str, Any]) -> Advance:
    result = advance_task(session, caller.task, TaskStatus.IN_PROGRESS)
    _callback_event(session, caller, "callback_start", body, result)
    return result


def on_finish_callback(
    session: Session, caller: CallbackCaller, body: Mapping[str, Any]
) -> Advance:
    """The recording is final on the device: ``uploading``; a repeat changes nothing."""
    task = caller.task
    finish = {k: body.get(k) for k in FINISH_FIELDS if k in body}
    recorded = dict(task.meta or {})
    if recorded.get("device_finish") != finish and task.status not in TASK.final:
        recorded["device_finish"] = finish
        task.meta = recorded
        session.add(task)
        session.flush()
    result = advance_task(session, task, TaskStatus.UPLOADING)
    _callback_event(session, caller, "callback_finish", body, result)
    return result


def _callback_event(
    session: Session,
    caller: CallbackCaller,
    kind: str,
    body: Mapping[str, Any],
    result: Advance,
) -> None:
    flags = []
    if caller.token_expired:
        flags.append("expired_token")
    if result.ignored_as_late:
        flags.append("late")
    if body.get("device_id") not in (None, caller.device.device_id):
        flags.append("device_id_mismatch")
    if flags:
        log.warning(
            "callback %s for task %s flagged %s", kind, caller.task.task_id, ",".join(flags)
        )
    record_event(
        session,
        kind,
        factory_id=caller.device.factory_id,
        robot_id=caller.device.robot_id,
        device_id=caller.device.device_id,
        task_id=caller.task.task_id,
        data={
            "via": caller.via,
            "flags": flags,
            "task_status": result.after.value,
            "previous_task_status": result.before.value,
            "body_device_id": body.get("device_id"),
        },
    )


def record_orphan_callback(
    session: Session, kind: str, task_id: str, body: Mapping[str, Any], client_ip: str | None
) -> None:
    """A callback for a task Keystone does not know: kept for an operator, nothing changes."""
    device_id = body.get("device_id")
    robot = None
    if isinstance(device_id, str) and device_id:
        robot = session.exec(select(Robot).where(col(Robot.device_id) == device_id)).first()
    record_event(
        session,
        f"{kind}_orphan",
        factory_id=robot.factory_id if robot else None,
        robot_id=robot.id if robot else None,
        device_id=device_id if isinstance(device_id, str) else "",
        task_id=task_id[:128],
        data={"client_ip": client_ip, "body": {k: body[k] for k in list(body)[:32]}},
    )
