"""Webhooks: registration, fan-out of outbox events, and signed delivery with retries.

* **Registration** (admins): an http(s) URL, the event types it wants (``*`` for all) and
  optionally one factory. The signing secret is generated here and shown only by the
  create and rotate-secret answers. A webhook of every factory (``factory_id`` None) is
  visible only to admins of every factory.
* **Fan-out**: pending ``outbox`` rows are claimed (``FOR UPDATE SKIP LOCKED`` on
  MariaDB), one ``webhook_deliveries`` row is made per matching active webhook — the
  unique ``(webhook_id, event_id)`` makes it idempotent — and the event is marked
  ``delivered`` (dispatched). A webhook disabled at that moment gets nothing.
* **Delivery**: due deliveries are leased to a run (``lease_owner`` = the Dagster run id)
  and POSTed, one endpoint per worker thread so a slow endpoint holds up only its own
  deliveries. Every try is a ``webhook_attempts`` row. 2xx → ``delivered``; anything
  else (3xx included: redirects are not followed, a timeout, a refused connection) →
  ``retry_wait`` after ``min(cap, base·2ⁿ⁻¹)`` scaled by a jitter in [0.5, 1], or
  ``failed`` once ``KEYSTONE_WEBHOOK_MAX_ATTEMPTS`` tries are spent. After a failure the
  endpoint's other deliveries of the batch wait for the same retry time instead of being
  tried one after another against an endpoint that is down.
* **Auto-disable**: every failed try counts on the webhook's ``consecutive_failures``; a
  success resets it. At ``KEYSTONE_WEBHOOK_DISABLE_AFTER`` the webhook is disabled, its
  waiting deliveries fail with "webhook disabled", the change is audited
  (``webhook.disabled``) and an ``alert.raised`` event (``alert: webhook_disabled``) goes to
  the *other* webhooks. Enabling it again (``is_active: true``) resets the counter.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from prometheus_client import Counter, Histogram
from sqlalchemy import ColumnElement, and_, delete, or_, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, func, select

from keystone_core import clock
from keystone_core.db import is_retryable
from keystone_core.errors import ConflictError, NotFoundError, ValidationFailed
from keystone_core.models import (
    Factory,
    OutboxEvent,
    OutboxStatus,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryStatus,
)
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.outbox import ALL_EVENTS, SUBSCRIBABLE, EventType, emit, iso
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings
from keystone_core.webhooks.signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    REQUEST_ID_HEADER,
    SIGNATURE_HEADER,
    signature_header,
)

SessionScope = Callable[[], AbstractContextManager[Session]]
T = TypeVar("T")

MAX_URL_LENGTH = 2048
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
RESPONSE_KEEP_BYTES = 1024
WAITING = (WebhookDeliveryStatus.PENDING, WebhookDeliveryStatus.RETRY_WAIT)
FINISHED = (WebhookDeliveryStatus.DELIVERED, WebhookDeliveryStatus.FAILED)
DISABLED_ERROR = "webhook disabled"
SYSTEM = Actor.system("webhooks")


def _version() -> str:
    try:
        return metadata.version("keystone")
    except metadata.PackageNotFoundError:
        return "0"


USER_AGENT = f"Keystone-Webhooks/{_version()}"

DELIVERIES = Counter(
    "keystone_webhook_deliveries_total",
    "Webhook delivery tries by event type and outcome (delivered, retry, failed).",
    ["event_type", "outcome"],
)
DELIVERY_SECONDS = Histogram(
    "keystone_webhook_delivery_seconds",
    "Duration of one webhook POST, until the first KiB of the answer was read.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


# --- registration ------------------------------------------------------------------------


def new_secret() -> str:
    """A signing secret: ``whsec_`` + 43 URL-safe characters (256 random bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def validate_url(url: str) -> str:
    """An absolute http(s) URL with a host, at most 2048 characters; 422 ``invalid_url``."""
    value = url.strip()

    def refuse(why: str) -> ValidationFailed:
        return ValidationFailed(f"url {why}", code="invalid_url", field="url")

    if not value:
        raise refuse("is empty")
    if len(value) > MAX_URL_LENGTH:
        raise refuse(f"is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise refuse("contains whitespace or control characters")
    try:
        parts = urlsplit(value)
        _port = parts.port  # raises on a port that is not a number in range
    except ValueError:
        raise refuse("cannot be parsed") from None
    if parts.scheme not in {"http", "https"}:
        raise refuse("must start with http:// or https://")
    if not parts.hostname:
        raise refuse("has no host")
    return value


def redacted_url(url: str) -> str:
    """The URL without credentials or query (for audit rows and alerts)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = host if parts.port is None else f"{host}:{parts.port}"
    except ValueError:
        return ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def validate_event_types(values: Iterable[str]) -> list[str]:
    """Known, subscribable event types (or ``*``), deduplicated; 422 otherwise."""
    wanted = list(dict.fromkeys(v.strip() for v in values))
    if not wanted:
        raise ValidationFailed(
            'event_types must name at least one event type (or "*" for all)',
            code="invalid_event_types",
            field="event_types",
        )
    known = {e.value for e in SUBSCRIBABLE}
    unknown = [v for v in wanted if v != ALL_EVENTS and v not in known]
    if unknown:
        raise ValidationFailed(
            f"unknown event type(s): {', '.join(unknown)}",
            code="unknown_event_type",
            field="event_types",
            unknown=unknown,
            allowed=[*sorted(known), ALL_EVENTS],
        )
    return [ALL_EVENTS] if ALL_EVENTS in wanted else sorted(wanted)


def _sees(scope: Scope, webhook: Webhook) -> bool:
    if scope.factory_ids is None:
        return True
    return webhook.factory_id is not None and webhook.factory_id in scope.factory_ids


def _visible(scope: Scope) -> list[ColumnElement[bool]]:
    if scope.factory_ids is None:
        return []
    return [col(Webhook.factory_id).in_(sorted(scope.factory_ids))]


def _factory_for(session: Session, scope: Scope, factory_id: int | None) -> int | None:
    """The factory a webhook will belong to: the one given (it must be in scope), else
    every factory — which only an admin of every factory may register; an admin of one
    factory gets that factory."""
    if factory_id is None:
        if scope.factory_ids is None:
            return None
        if len(scope.factory_ids) == 1:
            return next(iter(scope.factory_ids))
        raise ValidationFailed(
            "give factory_id: only an admin of every factory can register a webhook for "
            "every factory",
            code="factory_id_required",
            field="factory_id",
        )
    factory = session.get(Factory, factory_id)
    if factory is None or factory.deleted_at is not None or not scope.can_see(factory_id):
        raise NotFoundError(
            f"factory {factory_id} not found", code="reference_not_found", field="factory_id"
        )
    return factory_id


def snapshot(webhook: Webhook) -> dict[str, Any]:
    """What the audit log keeps of a webhook (never the secret, nor URL credentials)."""
    return {
        "url": redacted_url(webhook.url),
        "event_types": list(webhook.event_types),
        "factory_id": webhook.factory_id,
        "is_active": webhook.is_active,
        "description": webhook.description,
    }


def create_webhook(
    session: Session,
    scope: Scope,
    actor: Actor,
    *,
    url: str,
    event_types: Iterable[str],
    factory_id: int | None = None,
    description: str = "",
) -> Webhook:
    """Register a webhook; the returned row holds the new secret (show it once)."""
    webhook = Webhook(
        url=validate_url(url),
        secret=new_secret(),
        event_types=validate_event_types(event_types),
        factory_id=_factory_for(session, scope, factory_id),
        description=description,
    )
    session.add(webhook)
    session.flush()
    assert webhook.id is not None
    record_audit(
        session,
        actor,
        "webhook.create",
        entity_type="webhook",
        entity_id=webhook.id,
        after=snapshot(webhook),
        factory_id=webhook.factory_id,
    )
    return webhook


def list_webhooks(
    session: Session,
    scope: Scope,
    *,
    factory_id: int | None = None,
    is_active: bool | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Webhook], int]:
    where = _visible(scope)
    if factory_id is not None:
        where.append(col(Webhook.factory_id) == factory_id)
    if is_active is not None:
        where.append(col(Webhook.is_active).is_(is_active))
    total = int(session.exec(select(func.count()).select_from(Webhook).where(*where)).one())
    rows = session.exec(
        select(Webhook).where(*where).order_by(col(Webhook.id)).offset(offset).limit(limit)
    ).all()
    return list(rows), total


def get_webhook(
    session: Session, scope: Scope, webhook_id: int, *, for_update: bool = False
) -> Webhook:
    """The webhook, or 404 when it does not exist or is outside the caller's scope."""
    query = select(Webhook).where(col(Webhook.id) == webhook_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    webhook = session.exec(query).one_or_none()
    if webhook is None or not _sees(scope, webhook):
        raise NotFoundError(f"webhook {webhook_id} not found")
    return webhook


def update_webhook(
    session: Session, scope: Scope, actor: Actor, webhook_id: int, changes: Mapping[str, Any]
) -> Webhook:
    """Change url, event_types, factory_id, description or is_active (audited).

    ``is_active: false`` disables it (its waiting deliveries fail); ``is_active: true``
    enables it and resets ``consecutive_failures``.
    """
    webhook = get_webhook(session, scope, webhook_id, for_update=True)
    before = snapshot(webhook)
    now = clock.now()
    if "url" in changes:
        webhook.url = validate_url(str(changes["url"]))
    if "event_types" in changes:
        webhook.event_types = validate_event_types(changes["event_types"])
    if "factory_id" in changes:
        webhook.factory_id = _factory_for(session, scope, changes["factory_id"])
    if "description" in changes:
        webhook.description = str(changes["description"])
    failed = 0
    if "is_active" in changes:
        if changes["is_active"]:
            webhook.is_active = True
            webhook.consecutive_failures = 0
            webhook.disabled_at = None
            webhook.disabled_reason = ""
        elif webhook.is_active:
            reason = f"disabled by {actor.account or actor.id or actor.type}"
            failed = _disable(session, webhook, reason=reason, now=now)
    webhook.updated_at = now
    session.add(webhook)
    session.flush()
    session.refresh(webhook)
    after = snapshot(webhook) | ({"failed_deliveries": failed} if failed else {})
    record_audit(
        session,
        actor,
        "webhook.update",
        entity_type="webhook",
        entity_id=webhook_id,
        before=before,
        after=after,
        factory_id=webhook.factory_id,
    )
    return webhook


def delete_webhook(session: Session, scope: Scope, actor: Actor, webhook_id: int) -> None:
    """Delete a webhook with its delivery log (the outbox events stay)."""
    webhook = get_webhook(session, scope, webhook_id, for_update=True)
    before = snapshot(webhook)
    factory_id = webhook.factory_id
    session.execute(
        delete(WebhookDelivery)
        .where(col(WebhookDelivery.webhook_id) == webhook_id)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(Webhook)
        .where(col(Webhook.id) == webhook_id)
        .execution_options(synchronize_session=False)
    )
    session.expunge(webhook)
    record_audit(
        session,
        actor,
        "webhook.delete",
        entity_type="webhook",
        entity_id=webhook_id,
        before=before,
        factory_id=factory_id,
    )


def rotate_secret(session: Session, scope: Scope, actor: Actor, webhook_id: int) -> Webhook:
    """A new signing secret, in effect for every try from now on (show it once)."""
    webhook = get_webhook(session, scope, webhook_id, for_update=True)
    webhook.secret = new_secret()
    webhook.updated_at = clock.now()
    session.add(webhook)
    session.flush()
    record_audit(
        session,
        actor,
        "webhook.rotate_secret",
        entity_type="webhook",
        entity_id=webhook_id,
        after={"rotated_at": iso(webhook.updated_at)},
        factory_id=webhook.factory_id,
    )
    return webhook


def queue_test(session: Session, scope: Scope, actor: Actor, webhook_id: int) -> WebhookDelivery:
    """A ``webhook.test`` event for this webhook only, queued for delivery like any other."""
    webhook = get_webhook(session, scope, webhook_id)
    if not webhook.is_active:
        raise ConflictError(
            f"webhook {webhook_id} is disabled; enable it first",
            code="webhook_disabled",
            disabled_reason=webhook.disabled_reason,
        )
    now = clock.now()
    event = emit(
        session,
        EventType.WEBHOOK_TEST,
        {
            "webhook_id": str(webhook_id),
            "message": "Test event from Keystone: this endpoint receives its webhooks.",
            "requested_by": actor.account or actor.id,
        },
        factory_id=webhook.factory_id,
        request_id=actor.request_id,
    )
    # Dispatched here, to this webhook alone: fan-out never sees it.
    event.status = OutboxStatus.DELIVERED
    event.delivered_at = now
    session.flush()
    assert event.id is not None
    delivery = WebhookDelivery(
        webhook_id=webhook_id, event_id=event.id, event_type=EventType.WEBHOOK_TEST.value
    )
    session.add(delivery)
    session.flush()
    assert delivery.id is not None
    record_audit(
        session,
        actor,
        "webhook.test",
        entity_type="webhook",
        entity_id=webhook_id,
        after={"event_id": str(event.id), "delivery_id": str(delivery.id)},
        factory_id=webhook.factory_id,
    )
    return delivery


# --- the delivery log ----------------------------------------------------------------------


def deliveries_of(
    session: Session,
    scope: Scope,
    webhook_id: int,
    *,
    status: WebhookDeliveryStatus | None = None,
    event_type: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[WebhookDelivery], int]:
    """A webhook's deliveries, newest first."""
    get_webhook(session, scope, webhook_id)
    where: list[ColumnElement[bool]] = [col(WebhookDelivery.webhook_id) == webhook_id]
    if status is not None:
        where.append(col(WebhookDelivery.status) == status)
    if event_type is not None:
        where.append(col(WebhookDelivery.event_type) == event_type)
    total = int(session.exec(select(func.count()).select_from(WebhookDelivery).where(*where)).one())
    rows = session.exec(
        select(WebhookDelivery)
        .where(*where)
        .order_by(col(WebhookDelivery.id).desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return list(rows), total


@dataclass(frozen=True)
class DeliveryDetail:
    delivery: WebhookDelivery
    event: OutboxEvent
    attempts: list[WebhookAttempt]


def _delivery(
    session: Session, scope: Scope, webhook_id: int, delivery_id: int, *, for_update: bool = False
) -> tuple[Webhook, WebhookDelivery]:
    webhook = get_webhook(session, scope, webhook_id)
    query = select(WebhookDelivery).where(
        col(WebhookDelivery.id) == delivery_id, col(WebhookDelivery.webhook_id) == webhook_id
    )
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    delivery = session.exec(query).one_or_none()
    if delivery is None:
        raise NotFoundError(f"delivery {delivery_id} of webhook {webhook_id} not found")
    return webhook, delivery


def delivery_detail(
    session: Session, scope: Scope, webhook_id: int, delivery_id: int
) -> DeliveryDetail:
    """One delivery with its event and every attempt (oldest first)."""
    _webhook, delivery = _delivery(session, scope, webhook_id, delivery_id)
    event = session.exec(select(OutboxEvent).where(col(OutboxEvent.id) == delivery.event_id)).one()
    attempts = session.exec(
        select(WebhookAttempt)
        .where(col(WebhookAttempt.delivery_id) == delivery_id)
        .order_by(col(WebhookAttempt.id))
    ).all()
    return DeliveryDetail(delivery=delivery, event=event, attempts=list(attempts))


def redeliver(
    session: Session, scope: Scope, actor: Actor, webhook_id: int, delivery_id: int
) -> WebhookDelivery:
    """A delivered or failed delivery goes back to ``pending`` with a fresh attempt
    budget (audited). 409 ``delivery_pending`` while it waits; 409 ``webhook_disabled``."""
    webhook, delivery = _delivery(session, scope, webhook_id, delivery_id, for_update=True)
    if delivery.status in WAITING:
        raise ConflictError(
            f"delivery {delivery_id} is {delivery.status.value}; it will be tried anyway",
            code="delivery_pending",
            current_status=delivery.status.value,
        )
    if not webhook.is_active:
        raise ConflictError(
            f"webhook {webhook_id} is disabled; enable it first",
            code="webhook_disabled",
            disabled_reason=webhook.disabled_reason,
        )
    before = delivery.status
    _move(
        session,
        delivery_id,
        WebhookDeliveryStatus.PENDING,
        expected=set(FINISHED),
        values={
            "attempts": 0,
            "next_attempt_at": None,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": "",
            "response_status": None,
            "delivered_at": None,
        },
    )
    record_audit(
        session,
        actor,
        "webhook.redeliver",
        entity_type="webhook_delivery",
        entity_id=delivery_id,
        before={"status": before.value},
        after={"status": WebhookDeliveryStatus.PENDING.value, "webhook_id": str(webhook_id)},
        factory_id=webhook.factory_id,
    )
    session.refresh(delivery)
    return delivery


def _move(
    session: Session,
    delivery_id: int,
    target: WebhookDeliveryStatus,
    *,
    expected: set[WebhookDeliveryStatus],
    values: Mapping[str, Any],
) -> bool:
    """``UPDATE … SET status=target WHERE id=… AND status IN expected``; True if it moved."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.id) == delivery_id,
            col(WebhookDelivery.status).in_([s.value for s in expected]),
        )
        .values(status=target.value, updated_at=clock.now(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- fan-out -------------------------------------------------------------------------------


def _skip_locked(session: Session) -> bool:
    return session.get_bind().dialect.name in {"mysql", "mariadb"}


def subscribes(webhook: Webhook, event: OutboxEvent) -> bool:
    """Does this active webhook want this event (type and factory)?"""
    if webhook.factory_id is not None and webhook.factory_id != event.factory_id:
        return False
    return ALL_EVENTS in webhook.event_types or event.event_type in webhook.event_types


@dataclass
class FanOut:
    events: int = 0
    deliveries: int = 0


def fan_out(session: Session, *, limit: int) -> FanOut:
    """Turn up to ``limit`` pending outbox events into deliveries for the active webhooks
    that want them, and mark the events dispatched. Safe to run concurrently and again."""
    query = (
        select(OutboxEvent)
        .where(col(OutboxEvent.status) == OutboxStatus.PENDING)
        .order_by(col(OutboxEvent.id))
        .limit(limit)
    )
    if _skip_locked(session):
        query = query.with_for_update(skip_locked=True)
    events = list(session.exec(query).all())
    if not events:
        return FanOut()
    ids = [e.id for e in events if e.id is not None]
    hooks = list(session.exec(select(Webhook).where(col(Webhook.is_active).is_(True))).all())
    existing = {
        (int(w), int(e))
        for w, e in session.exec(
            select(WebhookDelivery.webhook_id, WebhookDelivery.event_id).where(
                col(WebhookDelivery.event_id).in_(ids)
            )
        ).all()
    }
    made = 0
    for event in events:
        assert event.id is not None
        for hook in hooks:
            assert hook.id is not None
            if subscribes(hook, event) and (hook.id, event.id) not in existing:
                session.add(
                    WebhookDelivery(
                        webhook_id=hook.id, event_id=event.id, event_type=event.event_type
                    )
                )
                made += 1
    now = clock.now()
    session.execute(
        update(OutboxEvent)
        .where(col(OutboxEvent.id).in_(ids), col(OutboxEvent.status) == OutboxStatus.PENDING)
        .values(
            status=OutboxStatus.DELIVERED.value,
            delivered_at=now,
            attempts=col(OutboxEvent.attempts) + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return FanOut(events=len(events), deliveries=made)


# --- claims --------------------------------------------------------------------------------


def lease_for(settings: Settings) -> dt.timedelta:
    """How long a claim holds a delivery: long enough for a batch's other endpoints to be
    served first; extended again right before its POST."""
    return dt.timedelta(seconds=max(300.0, 10 * settings.webhook_timeout_s))


def _due(now: dt.datetime) -> ColumnElement[bool]:
    return and_(
        col(WebhookDelivery.status).in_([s.value for s in WAITING]),
        col(WebhookDelivery.lease_owner).is_(None),
        or_(
            col(WebhookDelivery.next_attempt_at).is_(None),
            col(WebhookDelivery.next_attempt_at) <= now,
        ),
    )


def has_pending_events(session: Session) -> bool:
    """Any outbox event waiting for fan-out (one indexed row read, never a list)."""
    row = session.exec(
        select(OutboxEvent.id).where(col(OutboxEvent.status) == OutboxStatus.PENDING).limit(1)
    ).first()
    return row is not None


def due_count(session: Session, *, cap: int = 1000) -> int:
    """Deliveries due now, counted up to ``cap``."""
    due = select(WebhookDelivery.id).where(_due(clock.now())).limit(cap).subquery()
    return int(session.exec(select(func.count()).select_from(due)).one())


@dataclass(frozen=True)
class DeliveryWork:
    """One claimed delivery with everything its POST needs (no DB access while sending)."""

    delivery_id: int
    webhook_id: int
    event_id: int
    event_type: str
    url: str
    secret: str
    body: bytes
    request_id: str | None
    attempt_no: int


def envelope(event: OutboxEvent) -> bytes:
    """The body of every delivery of ``event``: the same bytes on every try."""
    document = {
        "id": str(event.id),
        "type": event.event_type,
        "created_at": iso(event.created_at),
        "factory_id": None if event.factory_id is None else str(event.factory_id),
        "data": event.payload,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def recover_expired(session: Session, settings: Settings, *, limit: int = 500) -> int:
    """Deliveries whose run died (lease expired): the unknown try counts as a failed
    attempt; they wait for a retry now, or fail when that was the last one."""
    now = clock.now()
    query = (
        select(WebhookDelivery)
        .where(
            col(WebhookDelivery.status).in_([s.value for s in WAITING]),
            col(WebhookDelivery.lease_owner).is_not(None),
            col(WebhookDelivery.lease_expires_at) < now,
        )
        .order_by(col(WebhookDelivery.id))
        .limit(limit)
    )
    if _skip_locked(session):
        query = query.with_for_update(skip_locked=True)
    rows = list(session.exec(query).all())
    numbers = _next_attempt_numbers(session, [r.id for r in rows if r.id is not None])
    for delivery in rows:
        assert delivery.id is not None
        note = f"no outcome recorded: the lease of run {delivery.lease_owner} expired"
        session.add(
            WebhookAttempt(
                delivery_id=delivery.id,
                attempt_no=numbers.get(delivery.id, 1),
                started_at=now,
                error=note[:2048],
                run_id=(delivery.lease_owner or "")[:64] or None,
            )
        )
        attempts = delivery.attempts + 1
        spent = attempts >= settings.webhook_max_attempts
        _move(
            session,
            delivery.id,
            WebhookDeliveryStatus.FAILED if spent else WebhookDeliveryStatus.RETRY_WAIT,
            expected=set(WAITING),
            values={
                "attempts": attempts,
                "lease_owner": None,
                "lease_expires_at": None,
                "next_attempt_at": None if spent else now,
                "last_error": note[:2048],
            },
        )
    return len(rows)


def _next_attempt_numbers(session: Session, delivery_ids: list[int]) -> dict[int, int]:
    """Per delivery, the number of its next attempt row (1 + attempts so far, all rounds)."""
    if not delivery_ids:
        return {}
    rows = session.exec(
        select(WebhookAttempt.delivery_id, func.count())
        .where(col(WebhookAttempt.delivery_id).in_(delivery_ids))
        .group_by(col(WebhookAttempt.delivery_id))
    ).all()
    counts = {int(d): int(n) for d, n in rows}
    return {d: counts.get(d, 0) + 1 for d in delivery_ids}


def claim(
    session: Session,
    settings: Settings,
    *,
    owner: str,
    limit: int,
    delivery_ids: Iterable[int] | None = None,
) -> list[DeliveryWork]:
    """Lease up to ``limit`` due deliveries to ``owner`` (oldest first). Deliveries this
    owner already holds (a retried op of the same run) are taken back first."""
    now = clock.now()
    skip = _skip_locked(session)
    held = list(
        session.exec(
            select(WebhookDelivery)
            .where(
                col(WebhookDelivery.lease_owner) == owner,
                col(WebhookDelivery.status).in_([s.value for s in WAITING]),
            )
            .order_by(col(WebhookDelivery.id))
            .limit(limit)
            .with_for_update(skip_locked=skip)
        ).all()
    )
    fresh: list[WebhookDelivery] = []
    if len(held) < limit:
        query = (
            select(WebhookDelivery)
            .where(_due(now))
            .order_by(col(WebhookDelivery.id))
            .limit(limit - len(held))
        )
        if delivery_ids is not None:
            query = query.where(col(WebhookDelivery.id).in_(list(delivery_ids)))
        if skip:
            query = query.with_for_update(skip_locked=True)
        fresh = list(session.exec(query).all())
    rows = sorted(held + fresh, key=lambda d: d.id or 0)
    if not rows:
        return []
    ids = [d.id for d in rows if d.id is not None]
    hooks = {
        h.id: h
        for h in session.exec(
            select(Webhook).where(col(Webhook.id).in_(sorted({d.webhook_id for d in rows})))
        ).all()
    }
    events = {
        e.id: e
        for e in session.exec(
            select(OutboxEvent).where(col(OutboxEvent.id).in_(sorted({d.event_id for d in rows})))
        ).all()
    }
    session.execute(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.id).in_(ids))
        .values(lease_owner=owner, lease_expires_at=now + lease_for(settings), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    numbers = _next_attempt_numbers(session, ids)
    works = []
    for delivery in rows:
        assert delivery.id is not None
        hook = hooks.get(delivery.webhook_id)
        if hook is None or not hook.is_active:
            # Disabled while this delivery waited: it fails without a try.
            _move(
                session,
                delivery.id,
                WebhookDeliveryStatus.FAILED,
                expected=set(WAITING),
                values={
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "last_error": DISABLED_ERROR,
                },
            )
            continue
        event = events[delivery.event_id]
        works.append(
            DeliveryWork(
                delivery_id=delivery.id,
                webhook_id=delivery.webhook_id,
                event_id=delivery.event_id,
                event_type=delivery.event_type,
                url=hook.url,
                secret=hook.secret,
                body=envelope(event),
                request_id=event.request_id,
                attempt_no=numbers[delivery.id],
            )
        )
    return works


# --- one POST ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostResult:
    started_at: dt.datetime
    duration_s: float
    status_code: int | None = None
    body: str = ""
    error: str = ""

    @property
    def success(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _header_safe(value: str) -> str:
    return "".join(ch for ch in value if 0x20 <= ord(ch) < 0x7F)[:64]


def request_headers(work: DeliveryWork, *, timestamp: int) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: work.event_type,
        DELIVERY_HEADER: str(work.delivery_id),
        SIGNATURE_HEADER: signature_header(work.secret, work.body, timestamp=timestamp),
    }
    request_id = _header_safe(work.request_id or "")
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return headers


def post(client: httpx.Client, work: DeliveryWork) -> PostResult:
    """POST one delivery (signed now), keep the first KiB of the answer; never raises for
    what the network or the endpoint does."""
    started_at = clock.now()
    t0 = time.monotonic()
    headers = request_headers(work, timestamp=int(started_at.timestamp()))
    status: int | None = None
    kept = b""
    location = ""
    error = ""
    try:
        with client.stream("POST", work.url, content=work.body, headers=headers) as response:
            status = response.status_code
            location = response.headers.get("location", "")
            for chunk in response.iter_bytes():
                kept += chunk
                if len(kept) >= RESPONSE_KEEP_BYTES:
                    break
    except httpx.TimeoutException as exc:
        # After the status line only the answer's body was late: the status stands.
        error = f"timeout after {time.monotonic() - t0:.1f} s ({type(exc).__name__})"
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    duration = time.monotonic() - t0
    if status is not None and not 200 <= status < 300:
        error = f"HTTP {status}"
        if 300 <= status < 400:
            error += f" redirect to {location[:200] or '?'} not followed"
    DELIVERY_SECONDS.observe(duration)
    text = kept[:RESPONSE_KEEP_BYTES].decode("utf-8", "replace")[:RESPONSE_KEEP_BYTES]
    return PostResult(
        started_at=started_at,
        duration_s=duration,
        status_code=status,
        body=text.replace("\x00", ""),
        error=error[:2048],
    )


# --- outcomes ------------------------------------------------------------------------------


def backoff_seconds(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Delay after try ``attempt`` (1-based): ``min(cap, base·2ⁿ⁻¹)`` scaled by a jitter in
    [0.5, 1], so a burst of failures does not retry in lockstep."""
    ceiling = min(
        settings.webhook_backoff_cap_s,
        settings.webhook_backoff_base_s * 2 ** min(max(0, attempt - 1), 60),
    )
    draw: float = (rng or random).random()
    return float(ceiling * (0.5 + 0.5 * draw))


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_outcome` did: the delivery's new status (or ``lost_lease``,
    ``gone``) and, for ``retry_wait``, when it is due again."""

    status: str
    next_attempt_at: dt.datetime | None = None
    disabled: bool = False


def record_outcome(
    session: Session,
    settings: Settings,
    work: DeliveryWork,
    result: PostResult,
    *,
    owner: str,
    rng: random.Random | None = None,
) -> Recorded:
    """Log the try as an attempt row and move the delivery (if ``owner`` still holds it):
    ``delivered``, ``retry_wait`` with backoff, or ``failed`` once the budget is spent.
    Counts the webhook's consecutive failures and disables it at the threshold."""
    now = clock.now()
    # The webhook row first, then the delivery: the order every writer here keeps.
    webhook = session.exec(
        select(Webhook)
        .where(col(Webhook.id) == work.webhook_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    delivery = session.exec(
        select(WebhookDelivery)
        .where(col(WebhookDelivery.id) == work.delivery_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if webhook is None or delivery is None:
        return Recorded("gone")  # the webhook was deleted meanwhile (with its log)
    session.add(
        WebhookAttempt(
            delivery_id=work.delivery_id,
            attempt_no=work.attempt_no,
            started_at=result.started_at,
            duration_ms=round(result.duration_s * 1000, 3),
            response_status=result.status_code,
            response_body=result.body,
            error=result.error,
            success=result.success,
            run_id=owner[:64],
        )
    )
    if result.success:
        webhook.consecutive_failures = 0
        webhook.last_success_at = now
    else:
        webhook.consecutive_failures += 1
        webhook.last_failure_at = now
    webhook.updated_at = now
    session.add(webhook)
    held = delivery.lease_owner == owner and delivery.status in WAITING
    recorded = Recorded("lost_lease")
    if held:
        attempts = delivery.attempts + 1
        common = {
            "attempts": attempts,
            "lease_owner": None,
            "lease_expires_at": None,
            "response_status": result.status_code,
        }
        if result.success:
            _move(
                session,
                work.delivery_id,
                WebhookDeliveryStatus.DELIVERED,
                expected=set(WAITING),
                values={**common, "delivered_at": now, "next_attempt_at": None, "last_error": ""},
            )
            recorded = Recorded(WebhookDeliveryStatus.DELIVERED.value)
            DELIVERIES.labels(work.event_type, "delivered").inc()
        elif attempts >= settings.webhook_max_attempts:
            _move(
                session,
                work.delivery_id,
                WebhookDeliveryStatus.FAILED,
                expected=set(WAITING),
                values={**common, "next_attempt_at": None, "last_error": result.error},
            )
            recorded = Recorded(WebhookDeliveryStatus.FAILED.value)
            DELIVERIES.labels(work.event_type, "failed").inc()
        else:
            due = now + dt.timedelta(seconds=backoff_seconds(attempts, settings, rng))
            _move(
                session,
                work.delivery_id,
                WebhookDeliveryStatus.RETRY_WAIT,
                expected=set(WAITING),
                values={**common, "next_attempt_at": due, "last_error": result.error},
            )
            recorded = Recorded(WebhookDeliveryStatus.RETRY_WAIT.value, due)
            DELIVERIES.labels(work.event_type, "retry").inc()
    if (
        not result.success
        and webhook.is_active
        and webhook.consecutive_failures >= settings.webhook_disable_after
    ):
        reason = (
            f"{webhook.consecutive_failures} consecutive failed deliveries; last: {result.error}"
        )
        _disable(session, webhook, reason=reason, now=now, automatic=True)
        recorded = Recorded(recorded.status, recorded.next_attempt_at, disabled=True)
    session.flush()
    return recorded


def _disable(
    session: Session, webhook: Webhook, *, reason: str, now: dt.datetime, automatic: bool = False
) -> int:
    """Disable a webhook and fail its waiting deliveries; an automatic disable is audited
    as ``webhook.disabled`` and raises an alert for the other webhooks. Returns how many
    deliveries failed."""
    assert webhook.id is not None
    webhook.is_active = False
    webhook.disabled_at = now
    webhook.disabled_reason = reason[:255]
    webhook.updated_at = now
    session.add(webhook)
    result = session.execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.webhook_id) == webhook.id,
            col(WebhookDelivery.status).in_([s.value for s in WAITING]),
        )
        .values(
            status=WebhookDeliveryStatus.FAILED.value,
            last_error=DISABLED_ERROR,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    failed = int(result.rowcount)  # type: ignore[attr-defined]
    if automatic:
        details = {
            "webhook_id": str(webhook.id),
            "url": redacted_url(webhook.url),
            "consecutive_failures": webhook.consecutive_failures,
            "failed_deliveries": failed,
            "reason": reason[:500],
        }
        record_audit(
            session,
            SYSTEM,
            "webhook.disabled",
            entity_type="webhook",
            entity_id=webhook.id,
            before={"is_active": True},
            after={"is_active": False, **details},
            factory_id=webhook.factory_id,
        )
        # Fanned out later to the active webhooks only: never to the one just disabled.
        emit(
            session,
            EventType.ALERT_RAISED,
            {"alert": "webhook_disabled", "severity": "warning", **details},
            factory_id=webhook.factory_id,
        )
    return failed


def release(
    session: Session, works: Iterable[DeliveryWork], *, owner: str, until: dt.datetime | None
) -> int:
    """Give back claimed deliveries untried (no attempt counted); ``until``: not before."""
    ids = [w.delivery_id for w in works]
    if not ids:
        return 0
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    if until is not None:
        values["next_attempt_at"] = until
    result = session.execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.id).in_(ids),
            col(WebhookDelivery.lease_owner) == owner,
            col(WebhookDelivery.status).in_([s.value for s in WAITING]),
        )
        .values(**values, updated_at=clock.now())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def extend_lease(session: Session, settings: Settings, delivery_id: int, owner: str) -> bool:
    """Right before a POST: extend ``owner``'s lease on the delivery; False when the lease
    was lost meanwhile (recovered, disabled, deleted) — then it must not be sent."""
    now = clock.now()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.id) == delivery_id,
            col(WebhookDelivery.lease_owner) == owner,
            col(WebhookDelivery.status).in_([s.value for s in WAITING]),
        )
        .values(lease_expires_at=now + lease_for(settings))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def in_transaction(session_scope: SessionScope, work: Callable[[Session], T]) -> T:
    """Run ``work`` in its own transaction, again from the start after a deadlock (a
    disable touches the webhook's other deliveries while other runs claim them)."""
    for attempt in range(1, 5):
        try:
            with session_scope() as session:
                return work(session)
        except OperationalError as exc:
            if attempt == 4 or not is_retryable(exc):
                raise
            time.sleep(0.02 * attempt + random.random() * 0.03)  # noqa: S311 (jitter)
    raise AssertionError("unreachable")


# --- one batch, one run --------------------------------------------------------------------


@dataclass
class DeliveryOutcome:
    """What a batch (or a run) did, for run metadata."""

    recovered: int = 0
    events: int = 0
    created: int = 0
    claimed: int = 0
    delivered: int = 0
    retry: int = 0
    failed: int = 0
    deferred: int = 0
    lost: int = 0
    disabled: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    COUNTS: ClassVar[tuple[str, ...]] = (
        "recovered",
        "events",
        "created",
        "claimed",
        "delivered",
        "retry",
        "failed",
        "deferred",
        "lost",
        "disabled",
    )

    def absorb(self, other: DeliveryOutcome) -> None:
        for name in self.COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.rows.extend(other.rows)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COUNTS}


# A webhook's share of a batch ends after this long; its remaining deliveries go back to
# the queue, to be claimed again next to other webhooks' new ones.
GROUP_SLICE_S = 30.0


def deliver_batch(
    works: list[DeliveryWork],
    *,
    settings: Settings,
    session_scope: SessionScope,
    owner: str,
    client: httpx.Client | None = None,
    rng: random.Random | None = None,
) -> DeliveryOutcome:
    """POST claimed deliveries, one webhook per worker (``KEYSTONE_WEBHOOK_WORKERS`` at a
    time), each webhook's in event order; every outcome is its own short transaction."""
    outcome = DeliveryOutcome(claimed=len(works))
    started = time.monotonic()
    groups: dict[int, list[DeliveryWork]] = {}
    for work in sorted(works, key=lambda w: w.delivery_id):
        groups.setdefault(work.webhook_id, []).append(work)

    def run_group(group: list[DeliveryWork]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        began = time.monotonic()
        for i, work in enumerate(group):
            held = in_transaction(
                session_scope,
                partial(extend_lease, settings=settings, delivery_id=work.delivery_id, owner=owner),
            )
            if not held:
                rows.append(
                    {"delivery": work.delivery_id, "webhook": work.webhook_id, "status": "lost"}
                )
                continue
            result = post(http, work)
            recorded = in_transaction(
                session_scope,
                partial(
                    record_outcome,
                    settings=settings,
                    work=work,
                    result=result,
                    owner=owner,
                    rng=rng,
                ),
            )
            rows.append(
                {
                    "delivery": work.delivery_id,
                    "webhook": work.webhook_id,
                    "event": work.event_type,
                    "attempt": work.attempt_no,
                    "status": recorded.status,
                    "http": result.status_code,
                    "error": result.error[:200],
                    "disabled": recorded.disabled,
                }
            )
            rest = group[i + 1 :]
            if not rest:
                break
            failed = recorded.status != WebhookDeliveryStatus.DELIVERED.value
            if failed or time.monotonic() - began > GROUP_SLICE_S:
                # After a failure the endpoint's other deliveries wait as long as this one.
                until = recorded.next_attempt_at if failed else None
                if failed and until is None:
                    until = clock.now() + dt.timedelta(seconds=backoff_seconds(1, settings, rng))
                in_transaction(
                    session_scope, partial(release, works=rest, owner=owner, until=until)
                )
                rows.extend(
                    {"delivery": w.delivery_id, "webhook": w.webhook_id, "status": "deferred"}
                    for w in rest
                )
                break
        return rows

    http = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
    try:
        workers = max(1, min(settings.webhook_workers, len(groups)))
        with ThreadPoolExecutor(workers, thread_name_prefix="webhooks") as pool:
            for rows in pool.map(run_group, list(groups.values())):
                outcome.rows.extend(rows)
    finally:
        if client is None:
            http.close()
    for row in outcome.rows:
        status = row["status"]
        if status == WebhookDeliveryStatus.DELIVERED.value:
            outcome.delivered += 1
        elif status == WebhookDeliveryStatus.RETRY_WAIT.value:
            outcome.retry += 1
        elif status == WebhookDeliveryStatus.FAILED.value:
            outcome.failed += 1
        elif status == "deferred":
            outcome.deferred += 1
        else:
            outcome.lost += 1
        outcome.disabled += int(bool(row.get("disabled")))
    outcome.seconds = time.monotonic() - started
    return outcome


def deliver_pending(
    session_scope: SessionScope,
    settings: Settings,
    *,
    owner: str,
    budget_s: float,
    client: httpx.Client | None = None,
    rng: random.Random | None = None,
) -> DeliveryOutcome:
    """What one ``deliver_webhooks`` run does: recover expired leases, then fan out pending
    events and deliver due deliveries, batch after batch, until nothing is left to do or
    ``budget_s`` seconds are spent (the rest is the next run's)."""
    deadline = time.monotonic() + budget_s
    total = DeliveryOutcome()
    with session_scope() as session:
        total.recovered = recover_expired(session, settings)
    while True:
        with session_scope() as session:
            fanned = fan_out(session, limit=settings.webhook_batch_max)
        total.events += fanned.events
        total.created += fanned.deliveries
        with session_scope() as session:
            works = claim(session, settings, owner=owner, limit=settings.webhook_batch_max)
        if works:
            total.absorb(
                deliver_batch(
                    works,
                    settings=settings,
                    session_scope=session_scope,
                    owner=owner,
                    client=client,
                    rng=rng,
                )
            )
        if (not works and not fanned.events) or time.monotonic() >= deadline:
            break
    return total
