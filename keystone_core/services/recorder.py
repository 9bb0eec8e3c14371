"""What the recorder's frames mean for Keystone (axon-protocol.md §2): state and replies.

The recorder sends exactly ``state_update``, ``config_applied`` and ``rpc_response``.
These functions turn them into task transitions (through :mod:`device_tasks`) and
presence state; the socket layer only parses frames and calls them in arrival order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sqlmodel import Session

from keystone_core.models import DeviceCommand, TaskStatus
from keystone_core.services import presence
from keystone_core.services.device_tasks import (
    advance_task,
    cancel_task,
    device_task,
    drop_config,
    fail_task,
    mark_outcome_unknown,
    open_device_tasks,
)
from keystone_core.services.devices import DeviceIdentity

log = logging.getLogger(__name__)

STATES = ("idle", "ready", "recording", "paused")
ACTIVE = ("recording", "paused")


def _event(
    session: Session,
    device: DeviceIdentity,
    kind: str,
    task_id: str | None,
    data: Mapping[str, Any],
) -> None:
    presence.record_device_event(session, device, kind, task_id, data)


def on_state_update(
    session: Session,
    device: DeviceIdentity,
    connection_id: str,
    *,
    previous: str,
    current: str,
    task_id: str | None,
    timestamp_ms: int | None,
) -> None:
    """A state change or the connect snapshot (``previous == current``)."""
    snapshot = previous == current
    device_paused = None
    if current == "paused" and previous == "recording":
        # No pause request outstanding: the disk or task-size guard paused it.
        device_paused = not presence.outstanding_action(session, device.robot_id, ("pause",))
    elif current in ("idle", "ready"):
        device_paused = False
    presence.set_state(
        session,
        connection_id,
        current=current,
        task_id=task_id,
        paused_by_device=device_paused,
    )
    _event(
        session,
        device,
        "recorder_state",
        task_id,
        {
            "current_state": current,
            "previous_state": previous,
            "snapshot": snapshot,
            "paused_by_device": bool(device_paused),
            "device_timestamp_ms": timestamp_ms,
            "source": "state_update",
        },
    )
    task = device_task(session, device, task_id) if task_id else None
    if task_id and task is None:
        log.info("recorder %s reports task %s Keystone did not send", device.device_id, task_id)

    if current == "ready" and task is not None:
        advance_task(session, task, TaskStatus.READY)
    elif current in ACTIVE and task is not None:
        advance_task(session, task, TaskStatus.IN_PROGRESS)
        if device_paused:
            _note(session, task, "paused_by_device", True)
    elif current == "idle" and task is not None:
        if previous in ACTIVE or (snapshot and task.status is TaskStatus.IN_PROGRESS):
            # Finished on the device (a lost finish reply or callback changes nothing).
            if presence.outstanding_action(session, device.robot_id, ("cancel",)):
                return  # the cancel reply decides
            advance_task(session, task, TaskStatus.UPLOADING)
        elif task.status is TaskStatus.READY:
            # ready→idle with the task id: a failed begin dropped the config.
            drop_config(session, task, "the recorder dropped the task config (begin failed)")
    elif current == "idle" and task_id is None:
        # A fresh process or a clear: nothing is cached on the device any more.
        for stale in open_device_tasks(session, device, (TaskStatus.READY,)):
            drop_config(session, stale, "the recorder holds no task config")
        if snapshot:
            for lost in open_device_tasks(session, device, (TaskStatus.IN_PROGRESS,)):
                mark_outcome_unknown(
                    session,
                    lost,
                    "recorder restarted while recording: finalised on the device, "
                    "outcome unknown until the transfer side reports the upload",
                )


def on_config_applied(
    session: Session, device: DeviceIdentity, connection_id: str, data: Mapping[str, Any]
) -> None:
    task_id = data.get("task_id")
    if not isinstance(task_id, str):
        return
    _event(session, device, "config_applied", task_id, {"echo": dict(data)})
    task = device_task(session, device, task_id)
    if task is None:
        return
    advance_task(session, task, TaskStatus.READY)
    # A re-config while ready replaced the previously cached task.
    for other in open_device_tasks(session, device, (TaskStatus.READY,)):
        if other.id != task.id:
            drop_config(session, other, f"replaced on the recorder by task {task_id}")


def on_reply(
    session: Session,
    device: DeviceIdentity,
    connection_id: str,
    command: DeviceCommand | None,
    reply: Mapping[str, Any],
) -> None:
    """Apply an ``rpc_response`` to its request's task (also a late or orphaned reply)."""
    success = reply.get("success") is True
    data = reply.get("data") if isinstance(reply.get("data"), Mapping) else {}
    assert isinstance(data, Mapping)
    state = data.get("state")
    if command is None:
        log.info(
            "recorder %s replied to unknown request %r", device.device_id, reply.get("request_id")
        )
        return
    if command.connection_id == connection_id and isinstance(state, str) and state in STATES:
        row = presence.current_connection(session, device.robot_id, presence.RECORDER)
        if row is not None and row.connection_id == connection_id:
            cached = data.get("task_id")
            presence.set_state(
                session,
                connection_id,
                current=state,
                task_id=cached if isinstance(cached, str) else row.task_id,
            )
    task_id = command.task_id or (
        data.get("task_id") if isinstance(data.get("task_id"), str) else None
    )
    task = device_task(session, device, task_id) if task_id else None
    action = command.action
    message = str(reply.get("message", ""))
    if not success:
        _event(
            session,
            device,
            "recorder_rpc_failed",
            task_id,
            {"action": action, "message": message, "data": dict(data)},
        )
    if task is None:
        if action == "clear" and success:
            for stale in open_device_tasks(session, device, (TaskStatus.READY,)):
                drop_config(session, stale, "cleared on the recorder")
        if action == "quit" and state in ACTIVE:
            for lost in open_device_tasks(session, device, (TaskStatus.IN_PROGRESS,)):
                mark_outcome_unknown(session, lost, "recorder quit while recording")
        return
    if action == "config":
        if success:
            advance_task(session, task, TaskStatus.READY)
        else:
            errors = data.get("validation_errors")
            _note(session, task, "config_rejected", {"message": message, "errors": errors})
    elif action == "begin":
        if success:
            advance_task(session, task, TaskStatus.IN_PROGRESS)
        elif state == "idle":
            if task.status is TaskStatus.READY:
                drop_config(session, task, f"begin failed: {message}")
            elif task.status in (TaskStatus.IN_PROGRESS, TaskStatus.UPLOADING):
                # Started (callback sent), then failed: the task id is burnt on the device.
                fail_task(session, task, f"begin failed after the recording started: {message}")
    elif action == "finish" and success:
        advance_task(session, task, TaskStatus.UPLOADING)
    elif action == "cancel" and success:
        cancel_task(session, task, "cancelled on the recorder")
    elif action == "clear" and success:
        drop_config(session, task, "cleared on the recorder")
    elif action == "quit" and state in ACTIVE:
        mark_outcome_unknown(session, task, "recorder quit while recording")


def _note(session: Session, task: Any, key: str, value: Any) -> None:
    meta = dict(task.meta or {})
    device_notes = dict(meta.get("recorder", {}))
    if device_notes.get(key) == value:
        return
    device_notes[key] = value
    meta["recorder"] = device_notes
    task.meta = meta
    session.add(task)
    session.flush()
