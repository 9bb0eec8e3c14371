"""The event outbox: :func:`emit` adds an event to the caller's transaction; the event catalogue.

An event is written in the same transaction as the change it reports, so it exists exactly
when the change was committed — a rolled-back approval leaves no ``episode.approved``
behind, and a committed one always has its event. Dagster's ``deliver_webhooks`` job fans
pending events out to the webhooks that subscribe to them (``services/webhooks.py``).

Payloads are small and self-contained: ids as strings, timestamps ISO 8601 in UTC, and
enough state (status, score, counts) for a consumer to act without calling back.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import Episode, Order, OutboxEvent, Task
from keystone_core.request_context import current_request_id

# A payload is a notification, not a document: beyond this it is a programming error.
MAX_PAYLOAD_BYTES = 16 * 1024


class EventType(StrEnum):
    """Every event Keystone writes to the outbox (the names are part of the webhook API)."""

    EPISODE_APPROVED = "episode.approved"
    EPISODE_REJECTED = "episode.rejected"
    EPISODE_QA_FAILED = "episode.qa_failed"
    EPISODE_NEEDS_INSPECTION = "episode.needs_inspection"
    EPISODE_SYNCED = "episode.synced"
    TASK_COMPLETED = "task.completed"
    ORDER_COMPLETED = "order.completed"
    ALERT_RAISED = "alert.raised"
    ALERT_RESOLVED = "alert.resolved"
    WEBHOOK_TEST = "webhook.test"


EVENT_DESCRIPTIONS: Mapping[EventType, str] = {
    EventType.EPISODE_APPROVED: "An episode was approved, by QA (auto_approved) or by an "
    "inspector (inspector_approved).",
    EventType.EPISODE_REJECTED: "An inspector rejected an episode.",
    EventType.EPISODE_QA_FAILED: "QA failed an episode (hard failure or a score far below the "
    "threshold, or its object could not be read).",
    EventType.EPISODE_NEEDS_INSPECTION: "QA could not decide; the episode waits for an inspector.",
    EventType.EPISODE_SYNCED: "A verified copy of an approved episode reached the cloud target.",
    EventType.TASK_COMPLETED: "A task's upload was verified and acknowledged to the device.",
    EventType.ORDER_COMPLETED: "An order completed (approved episodes reached its target, or it "
    "was completed by hand).",
    EventType.ALERT_RAISED: "An alert started firing (a rule crossed its threshold, a sync job "
    "failed, a webhook was disabled).",
    EventType.ALERT_RESOLVED: "A firing alert resolved.",
    EventType.WEBHOOK_TEST: "A ping sent by POST /webhooks/{id}/test to that webhook only.",
}

# What a webhook may subscribe to (``*`` means all of these). ``webhook.test`` is sent only
# to the webhook it was asked for.
SUBSCRIBABLE: frozenset[EventType] = frozenset(EventType) - {EventType.WEBHOOK_TEST}
ALL_EVENTS = "*"


def emit(
    session: Session,
    event_type: EventType | str,
    payload: Mapping[str, Any],
    *,
    factory_id: int | None,
    request_id: str | None = None,
) -> OutboxEvent:
    """Add an outbox event to the caller's transaction (nothing is committed here).

    ``factory_id`` None is a Keystone-wide event (only webhooks of every factory get it).
    The event carries the id of the API request being served (``request_id`` overrides
    it), which the delivery sends as ``X-Request-ID``.
    """
    kind = EventType(event_type)  # an unknown name is a bug in the caller: ValueError
    data = dict(payload)
    size = len(json.dumps(data, separators=(",", ":"), default=_refuse))
    if size > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{kind} payload is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    event = OutboxEvent(
        event_type=kind.value,
        payload=data,
        factory_id=factory_id,
        request_id=(request_id or current_request_id() or None),
    )
    if event.request_id is not None:
        event.request_id = event.request_id[:64]
    session.add(event)
    return event


def _refuse(value: object) -> Any:
    raise TypeError(f"an event payload holds only JSON values, not {type(value).__name__}")


def iso(value: dt.datetime | None) -> str | None:
    """An ISO 8601 UTC timestamp (or None)."""
    return None if value is None else clock.as_utc(value).isoformat()


# --- payloads of the domain events ------------------------------------------------------------


def emit_episode_event(
    session: Session,
    event_type: EventType,
    episode_id: int,
    *,
    request_id: str | None = None,
    **extra: Any,
) -> OutboxEvent:
    """An ``episode.*`` event with the episode's state as it is now in this transaction
    (``extra`` is added to the payload)."""
    row = session.exec(
        select(Episode, Task.task_id)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .where(col(Episode.id) == episode_id)
        .execution_options(populate_existing=True)
    ).one()
    episode, task_public_id = row
    payload: dict[str, Any] = {
        "episode_id": episode.episode_id,
        "episode_row_id": str(episode.id),
        "task_id": str(task_public_id),
        "order_id": str(episode.order_id),
        "device_id": episode.device_id,
        "status": str(episode.status),
        "qa_score": episode.qa_score,
        "recording_date": episode.recording_date.isoformat(),
        "approved_at": iso(episode.approved_at),
        **extra,
    }
    return emit(session, event_type, payload, factory_id=episode.factory_id, request_id=request_id)


def emit_task_completed(session: Session, task_id: int) -> OutboxEvent:
    task = session.exec(
        select(Task).where(col(Task.id) == task_id).execution_options(populate_existing=True)
    ).one()
    episode = session.exec(
        select(Episode.episode_id).where(col(Episode.task_id) == task_id)
    ).first()
    payload = {
        "task_id": task.task_id,
        "task_row_id": str(task.id),
        "order_id": str(task.order_id),
        "batch_id": str(task.batch_id),
        "status": str(task.status),
        "episode_id": episode,
        "completed_at": iso(task.completed_at),
        "upload_acked_at": iso(task.upload_acked_at),
    }
    return emit(session, EventType.TASK_COMPLETED, payload, factory_id=task.factory_id)


def emit_order_completed(session: Session, order_id: int) -> OutboxEvent:
    order = session.exec(
        select(Order).where(col(Order.id) == order_id).execution_options(populate_existing=True)
    ).one()
    payload = {
        "order_id": str(order.id),
        "name": order.name,
        "status": str(order.status),
        "target_count": order.target_count,
        "approved_count": order.approved_count,
        "episode_count": order.episode_count,
        "completed_at": iso(order.updated_at),
    }
    return emit(session, EventType.ORDER_COMPLETED, payload, factory_id=order.factory_id)
