"""Device sockets across API workers: presence rows, RPC rows and the device event feed.

A worker that holds a device's socket owns the device's ``device_connections`` row (its
``connection_id`` and ``worker_id``) and refreshes ``last_seen_at``; the newest socket of
a device wins and the worker of the older one closes it when it sees the row change. An
RPC is a ``device_commands`` row written by whichever worker serves the REST call; the
owning worker claims it (``pending`` → ``sent``), writes it to the socket and stores the
reply, so a REST call on one worker reaches a socket held by another.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, update
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import DeviceCommand, DeviceConnection, DeviceEvent, Robot
from keystone_core.services.devices import DeviceIdentity

RECORDER = "recorder"
TRANSFER = "transfer"
# Two replacements of one device's socket this close together: two processes share an id.
RAPID_REPLACEMENT = timedelta(seconds=10)


def new_request_id() -> str:
    return "ks-" + secrets.token_hex(12)


def new_connection_id() -> str:
    return secrets.token_hex(16)


def record_event(
    session: Session,
    kind: str,
    *,
    factory_id: int | None,
    robot_id: int | None,
    device_id: str,
    task_id: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> DeviceEvent:
    event = DeviceEvent(
        factory_id=factory_id,
        robot_id=robot_id,
        device_id=device_id[:64],
        kind=kind,
        task_id=task_id,
        data=dict(data or {}),
    )
    session.add(event)
    return event


def record_device_event(
    session: Session,
    device: DeviceIdentity,
    kind: str,
    task_id: str | None,
    data: Mapping[str, Any],
) -> DeviceEvent:
    """:func:`record_event` for a known device."""
    return record_event(
        session,
        kind,
        factory_id=device.factory_id,
        robot_id=device.robot_id,
        device_id=device.device_id,
        task_id=task_id,
        data=data,
    )


# --- presence -------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    row: DeviceConnection
    replaced_connection_id: str | None
    replaced_worker_id: str | None
    rapid_replacement: bool


def connect(
    session: Session,
    *,
    robot_id: int,
    factory_id: int,
    device_id: str,
    channel: str,
    connection_id: str,
    worker_id: str,
    remote_addr: str,
) -> Connected:
    """Make this socket the device's current one on ``channel``."""
    now = clock.now()
    row = session.exec(
        select(DeviceConnection)
        .where(col(DeviceConnection.robot_id) == robot_id, col(DeviceConnection.channel) == channel)
        .with_for_update()
    ).first()
    replaced = replaced_worker = None
    rapid = False
    if row is None:
        row = DeviceConnection(
            robot_id=robot_id,
            factory_id=factory_id,
            device_id=device_id,
            channel=channel,
            connection_id=connection_id,
            worker_id=worker_id,
            connected_at=now,
            last_seen_at=now,
        )
    else:
        if row.disconnected_at is None:
            replaced, replaced_worker = row.connection_id, row.worker_id
            last = row.last_replaced_at
            rapid = last is not None and now - last < RAPID_REPLACEMENT
            row.replaced_count += 1
            row.last_replaced_at = now
        row.factory_id = factory_id
        row.device_id = device_id
        row.connection_id = connection_id
        row.worker_id = worker_id
        row.connected_at = now
        row.last_seen_at = now
        row.disconnected_at = None
    row.remote_addr = remote_addr[:64]
    row.updated_at = now
    session.add(row)
    session.flush()
    record_event(
        session,
        "device_connection",
        factory_id=factory_id,
        robot_id=robot_id,
        device_id=device_id,
        data={
            "channel": channel,
            "connected": True,
            "source": f"{channel}_connected",
            "remote_addr": remote_addr,
            "replaced": replaced is not None,
            "rapid_replacement": rapid,
        },
    )
    return Connected(
        row=row,
        replaced_connection_id=replaced,
        replaced_worker_id=replaced_worker,
        rapid_replacement=rapid,
    )


def disconnect(session: Session, connection_id: str, *, reason: str = "") -> bool:
    """Mark the socket gone if it is still the device's current one."""
    row = session.exec(
        select(DeviceConnection).where(col(DeviceConnection.connection_id) == connection_id)
    ).first()
    if row is None or row.disconnected_at is not None:
        return False
    now = clock.now()
    changed = session.execute(
        update(DeviceConnection)
        .where(
            col(DeviceConnection.connection_id) == connection_id,
            col(DeviceConnection.disconnected_at).is_(None),
        )
        .values(disconnected_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        return False
    record_event(
        session,
        "device_connection",
        factory_id=row.factory_id,
        robot_id=row.robot_id,
        device_id=row.device_id,
        data={
            "channel": row.channel,
            "connected": False,
            "source": f"{row.channel}_disconnected",
            "reason": reason,
        },
    )
    return True


def heartbeat(session: Session, connection_ids: Iterable[str]) -> None:
    ids = sorted(connection_ids)
    if not ids:
        return
    session.execute(
        update(DeviceConnection)
        .where(
            col(DeviceConnection.connection_id).in_(ids),
            col(DeviceConnection.disconnected_at).is_(None),
        )
        .values(last_seen_at=clock.now())
        .execution_options(synchronize_session=False)
    )


def superseded(session: Session, connection_ids: Iterable[str]) -> set[str]:
    """Which of these sockets are no longer their device's current one (or the robot is gone)."""
    ids = set(connection_ids)
    if not ids:
        return set()
    current = session.exec(
        select(col(DeviceConnection.connection_id))
        .join(Robot, col(Robot.id) == col(DeviceConnection.robot_id))
        .where(
            col(DeviceConnection.connection_id).in_(sorted(ids)),
            col(DeviceConnection.disconnected_at).is_(None),
            col(Robot.deleted_at).is_(None),
        )
    ).all()
    return ids - set(current)


def is_live(row: DeviceConnection, heartbeat_s: float, now: datetime | None = None) -> bool:
    now = now or clock.now()
    return row.disconnected_at is None and now - row.last_seen_at < timedelta(
        seconds=3 * heartbeat_s
    )


def current_connection(session: Session, robot_id: int, channel: str) -> DeviceConnection | None:
    return session.exec(
        select(DeviceConnection).where(
            col(DeviceConnection.robot_id) == robot_id, col(DeviceConnection.channel) == channel
        )
    ).first()


def set_state(
    session: Session,
    connection_id: str,
    *,
    current: str,
    task_id: str | None,
    paused_by_device: bool | None = None,
) -> DeviceConnection | None:
    now = clock.now()
    values: dict[str, Any] = {
        "state": current,
        "task_id": task_id,
        "state_at": now,
        "last_seen_at": now,
        "updated_at": now,
    }
    if paused_by_device is not None:
        values["paused_by_device"] = paused_by_device
    session.execute(
        update(DeviceConnection)
        .where(col(DeviceConnection.connection_id) == connection_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return session.exec(
        select(DeviceConnection).where(col(DeviceConnection.connection_id) == connection_id)
    ).first()


def list_connections(
    session: Session, channel: str, factory_ids: frozenset[int] | None
) -> list[DeviceConnection]:
    query = (
        select(DeviceConnection)
        .join(Robot, col(Robot.id) == col(DeviceConnection.robot_id))
        .where(col(DeviceConnection.channel) == channel, col(Robot.deleted_at).is_(None))
    )
    if factory_ids is not None:
        query = query.where(col(DeviceConnection.factory_id).in_(sorted(factory_ids)))
    return list(session.exec(query.order_by(col(DeviceConnection.device_id))).all())


# --- commands -------------------------------------------------------------------------


def create_command(
    session: Session,
    *,
    robot_id: int,
    connection_id: str,
    action: str,
    params: Mapping[str, Any] | None,
    task_id: str | None,
    timeout_s: float,
    requested_by: str,
) -> DeviceCommand:
    now = clock.now()
    command = DeviceCommand(
        request_id=new_request_id(),
        robot_id=robot_id,
        connection_id=connection_id,
        action=action,
        params=dict(params or {}),
        task_id=task_id,
        created_at=now,
        deadline_at=now + timedelta(seconds=timeout_s),
        requested_by=requested_by[:128],
    )
    session.add(command)
    session.flush()
    return command


def claim_commands(
    session: Session, connection_ids: Iterable[str], *, request_id: str | None = None
) -> list[DeviceCommand]:
    """Pending commands for these sockets, marked ``sent`` (claimed by exactly one worker)."""
    ids = sorted(connection_ids)
    if not ids:
        return []
    now = clock.now()
    query = select(DeviceCommand).where(
        col(DeviceCommand.connection_id).in_(ids), col(DeviceCommand.status) == "pending"
    )
    if request_id is not None:
        query = query.where(col(DeviceCommand.request_id) == request_id)
    rows = session.exec(query.order_by(col(DeviceCommand.id))).all()
    claimed = []
    for row in rows:
        if row.deadline_at <= now:
            _set_status(session, row.id, "pending", "expired")
            continue
        if _set_status(session, row.id, "pending", "sent", sent_at=now):
            claimed.append(row)
    return claimed


def _set_status(
    session: Session, command_id: int | None, expected: str, status: str, **values: Any
) -> bool:
    result = session.execute(
        update(DeviceCommand)
        .where(col(DeviceCommand.id) == command_id, col(DeviceCommand.status) == expected)
        .values(status=status, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def answer_command(
    session: Session, request_id: str, *, success: bool, response: Mapping[str, Any]
) -> DeviceCommand | None:
    """Store a reply; a reply that comes after the requester gave up is still stored."""
    row = session.exec(
        select(DeviceCommand).where(col(DeviceCommand.request_id) == request_id)
    ).first()
    if row is None or row.status == "answered":
        return row if row is not None and row.status == "answered" else None
    session.execute(
        update(DeviceCommand)
        .where(col(DeviceCommand.id) == row.id, col(DeviceCommand.status) != "answered")
        .values(
            status="answered", success=success, response=dict(response), answered_at=clock.now()
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(row)
    return row


def get_command(session: Session, request_id: str) -> DeviceCommand | None:
    return session.exec(
        select(DeviceCommand).where(col(DeviceCommand.request_id) == request_id)
    ).first()


def expire_command(session: Session, request_id: str) -> bool:
    """The requester stops waiting; a reply may still arrive and be applied."""
    result = session.execute(
        update(DeviceCommand)
        .where(
            col(DeviceCommand.request_id) == request_id,
            col(DeviceCommand.status).in_(("pending", "sent")),
        )
        .values(status="expired")
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def outstanding_action(session: Session, robot_id: int, actions: tuple[str, ...]) -> bool:
    """A request of one of ``actions`` was sent to the device and has no reply yet."""
    return (
        session.exec(
            select(DeviceCommand.id)
            .where(
                col(DeviceCommand.robot_id) == robot_id,
                col(DeviceCommand.action).in_(actions),
                col(DeviceCommand.status).in_(("pending", "sent", "expired")),
                col(DeviceCommand.answered_at).is_(None),
                col(DeviceCommand.created_at) > clock.now() - timedelta(hours=1),
            )
            .limit(1)
        ).first()
        is not None
    )


# --- the event feed -------------------------------------------------------------------


def events_since(
    session: Session,
    cursor: int,
    factory_ids: frozenset[int] | None,
    *,
    device_ids: frozenset[str] | None = None,
    limit: int = 500,
) -> list[DeviceEvent]:
    query = select(DeviceEvent).where(col(DeviceEvent.id) > cursor)
    if factory_ids is not None:
        query = query.where(col(DeviceEvent.factory_id).in_(sorted(factory_ids)))
    if device_ids:
        query = query.where(col(DeviceEvent.device_id).in_(sorted(device_ids)))
    return list(session.exec(query.order_by(col(DeviceEvent.id)).limit(limit)).all())


def latest_event_id(session: Session) -> int:
    row = session.exec(select(DeviceEvent.id).order_by(col(DeviceEvent.id).desc()).limit(1)).first()
    return int(row or 0)


def prune(session: Session, *, events_older_than: timedelta, commands_older_than: timedelta) -> int:
    """Drop old feed rows and finished RPC rows (retention); returns rows removed."""
    now = clock.now()
    removed = session.execute(
        delete(DeviceEvent).where(col(DeviceEvent.created_at) < now - events_older_than)
    ).rowcount  # type: ignore[attr-defined]
    removed += session.execute(
        delete(DeviceCommand).where(
            col(DeviceCommand.created_at) < now - commands_older_than,
            or_(
                col(DeviceCommand.status).in_(("answered", "expired")),
                col(DeviceCommand.deadline_at) < now - commands_older_than,
            ),
        )
    ).rowcount  # type: ignore[attr-defined]
    return int(removed)
