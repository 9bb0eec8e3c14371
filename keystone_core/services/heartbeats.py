"""Heartbeats of components that have no port to probe: the Dagster daemon writes one row,
``/api/v1/health`` reads its age.

The daemon's ``keystone_heartbeat_sensor`` beats every 30 s or so. A fresh row proves more
than a running process: the daemon ticks sensors, loads Keystone's code location and
reaches Keystone's database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import ComponentHeartbeat

DAGSTER_DAEMON = "dagster_daemon"


def record_heartbeat(
    session: Session, name: str, detail: Mapping[str, Any] | None = None
) -> ComponentHeartbeat:
    """Upsert ``name``'s row with ``beat_at = now`` (two beaters racing both succeed)."""
    now = clock.now()
    values: dict[str, Any] = {"beat_at": now, "detail": dict(detail or {}), "updated_at": now}
    if _update(session, name, values):
        return _get(session, name)
    try:
        with session.begin_nested():
            session.add(ComponentHeartbeat(name=name, **values))
    except IntegrityError:  # inserted by another beater since our UPDATE
        _update(session, name, values)
    return _get(session, name)


def _update(session: Session, name: str, values: Mapping[str, Any]) -> bool:
    result = session.execute(
        update(ComponentHeartbeat)
        .where(col(ComponentHeartbeat.name) == name)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def _get(session: Session, name: str) -> ComponentHeartbeat:
    row = latest_heartbeat(session, name)
    assert row is not None
    return row


def latest_heartbeat(session: Session, name: str) -> ComponentHeartbeat | None:
    """The last beat of ``name``, or None if it never beat."""
    return session.exec(
        select(ComponentHeartbeat)
        .where(col(ComponentHeartbeat.name) == name)
        # A beat written by another process must not be answered from the session's cache.
        .execution_options(populate_existing=True)
    ).one_or_none()


@dataclass(frozen=True)
class HeartbeatState:
    """Whether a component is up by its heartbeat, with the reason when it is not."""

    up: bool
    detail: str | None
    beat_at: dt.datetime | None
    age_s: float | None


def heartbeat_state(
    session: Session, name: str, *, max_age_s: float, now: dt.datetime | None = None
) -> HeartbeatState:
    """Up when ``name`` beat less than ``max_age_s`` ago ("no heartbeat yet" / "last
    heartbeat 412 s ago (limit 180 s)" otherwise)."""
    row = latest_heartbeat(session, name)
    if row is None:
        return HeartbeatState(False, "no heartbeat yet", None, None)
    beat_at = clock.as_utc(row.beat_at)
    age = ((now or clock.now()) - beat_at).total_seconds()
    if age > max_age_s:
        detail = f"last heartbeat {age:.0f} s ago (limit {max_age_s:.0f} s)"
        return HeartbeatState(False, detail, beat_at, age)
    return HeartbeatState(True, None, beat_at, age)
