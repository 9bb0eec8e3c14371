"""Webhooks (admins): registration, secrets, test pings and the delivery log.

The API records intent only (a webhook row, an outbox event, a delivery back to
``pending``); Dagster's ``deliver_webhooks`` job does the POSTs. A webhook of one factory
is visible to admins of that factory; a webhook of every factory only to admins of every
factory (others get 404).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from keystone_api.crud import CONFLICT, ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep
from keystone_api.schemas import MAX_ROW_ID, IdStr, Page, PartialUpdate, RowId
from keystone_core.models import (
    OutboxEvent,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDeliveryStatus,
)
from keystone_core.services import webhooks as svc
from keystone_core.services.outbox import ALL_EVENTS, EVENT_DESCRIPTIONS, SUBSCRIBABLE, EventType

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])

RowIdIn = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]
EventName = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]
EventTypes = Annotated[
    list[EventName],
    Field(
        min_length=1,
        max_length=32,
        description='Event types to receive (GET /webhooks/event-types), or ["*"] for all.',
    ),
]
Url = Annotated[
    str,
    Field(min_length=1, max_length=svc.MAX_URL_LENGTH, description="An http:// or https:// URL."),
]


class WebhookPublic(BaseModel):
    id: IdStr
    url: str
    description: str
    event_types: list[str]
    factory_id: IdStr | None = Field(description="null: events of every factory.")
    is_active: bool
    consecutive_failures: int = Field(description="Failed tries since the last success.")
    disabled_at: dt.datetime | None
    disabled_reason: str
    last_success_at: dt.datetime | None
    last_failure_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class WebhookWithSecret(WebhookPublic):
    secret: str = Field(
        description="The signing secret (HMAC-SHA256 key). Shown only in this answer."
    )


def _webhook(row: Webhook) -> WebhookPublic:
    return WebhookPublic.model_validate(row, from_attributes=True)


def _with_secret(row: Webhook) -> WebhookWithSecret:
    return WebhookWithSecret.model_validate(row, from_attributes=True)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    event_types: EventTypes
    factory_id: RowIdIn | None = Field(
        default=None,
        description=(
            "Only this factory's events. Omitted: every factory (admins of every factory), "
            "or the admin's one factory."
        ),
    )
    description: str = Field(default="", max_length=255)


class WebhookUpdate(PartialUpdate):
    nullable: ClassVar[frozenset[str]] = frozenset({"factory_id"})

    url: Url | None = None
    event_types: EventTypes | None = None
    factory_id: RowIdIn | None = None
    description: str | None = Field(default=None, max_length=255)
    is_active: bool | None = Field(
        default=None,
        description="false disables (waiting deliveries fail); true enables and resets "
        "consecutive_failures.",
    )


class EventTypePublic(BaseModel):
    name: str
    description: str
    subscribable: bool = Field(description='Can be listed in event_types ("*" means all these).')


class DeliveryPublic(BaseModel):
    id: IdStr
    webhook_id: IdStr
    event_id: IdStr
    event_type: str
    status: WebhookDeliveryStatus
    attempt_count: int = Field(description="Tries in the current round (reset by redeliver).")
    next_attempt_at: dt.datetime | None = Field(description="When a retry_wait one is due.")
    response_status: int | None = Field(description="HTTP status of the last try, if any.")
    last_error: str
    lease_owner: str | None = Field(description="The Dagster run delivering it right now.")
    delivered_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


def _delivery(row: WebhookDelivery) -> DeliveryPublic:
    assert row.id is not None
    return DeliveryPublic(
        id=row.id,
        webhook_id=row.webhook_id,
        event_id=row.event_id,
        event_type=row.event_type,
        status=row.status,
        attempt_count=row.attempts,
        next_attempt_at=row.next_attempt_at,
        response_status=row.response_status,
        last_error=row.last_error,
        lease_owner=row.lease_owner,
        delivered_at=row.delivered_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


class AttemptPublic(BaseModel):
    id: IdStr
    attempt_no: int
    started_at: dt.datetime
    duration_ms: float | None
    response_status: int | None
    response_body: str = Field(description="The first KiB of the answer.")
    error: str
    success: bool
    run_id: str | None


class EventPublic(BaseModel):
    id: IdStr
    type: str
    created_at: dt.datetime
    factory_id: IdStr | None
    request_id: str | None = Field(description="Sent as X-Request-ID.")
    data: dict[str, Any]


class DeliveryDetailPublic(DeliveryPublic):
    event: EventPublic = Field(description="The event; the body sent is this as JSON.")
    attempts: list[AttemptPublic] = Field(description="Every try, oldest first.")


def _event(row: OutboxEvent) -> EventPublic:
    assert row.id is not None
    return EventPublic(
        id=row.id,
        type=row.event_type,
        created_at=row.created_at,
        factory_id=row.factory_id,
        request_id=row.request_id,
        data=row.payload,
    )


def _attempt(row: WebhookAttempt) -> AttemptPublic:
    return AttemptPublic.model_validate(row, from_attributes=True)


@router.get(
    "/event-types",
    response_model=list[EventTypePublic],
    responses={**ERRORS},
    summary="The event catalogue",
)
def event_types() -> list[EventTypePublic]:
    return [
        EventTypePublic(
            name=e.value, description=EVENT_DESCRIPTIONS[e], subscribable=e in SUBSCRIBABLE
        )
        for e in EventType
    ] + [
        EventTypePublic(
            name=ALL_EVENTS, description="Every subscribable event type.", subscribable=True
        )
    ]


@router.post(
    "",
    status_code=201,
    response_model=WebhookWithSecret,
    responses={**ERRORS, **NOT_FOUND},
    summary="Register a webhook (the answer shows its signing secret, once)",
)
def create_webhook(
    body: WebhookCreate, principal: CurrentPrincipal, session: SessionDep
) -> WebhookWithSecret:
    row = svc.create_webhook(
        session,
        principal.scope,
        principal.actor,
        url=body.url,
        event_types=body.event_types,
        factory_id=body.factory_id,
        description=body.description,
    )
    return _with_secret(row)


@router.get(
    "",
    response_model=Page[WebhookPublic],
    responses={**ERRORS},
    summary="Webhooks in scope (no secrets)",
)
def list_webhooks(
    principal: CurrentPrincipal,
    session: SessionDep,
    factory_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    is_active: bool | None = None,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[WebhookPublic]:
    limit = min(limit, 100)
    rows, total = svc.list_webhooks(
        session,
        principal.scope,
        factory_id=factory_id,
        is_active=is_active,
        limit=limit,
        offset=offset,
    )
    return Page(items=[_webhook(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{id}",
    response_model=WebhookPublic,
    responses={**ERRORS, **NOT_FOUND},
    summary="One webhook (no secret)",
)
def get_webhook(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> WebhookPublic:
    return _webhook(svc.get_webhook(session, principal.scope, id))


@router.patch(
    "/{id}",
    response_model=WebhookPublic,
    responses={**ERRORS, **NOT_FOUND},
    summary="Change a webhook; is_active true re-enables it (audited)",
)
def update_webhook(
    id: RowId, body: WebhookUpdate, principal: CurrentPrincipal, session: SessionDep
) -> WebhookPublic:
    changes = body.model_dump(exclude_unset=True)
    row = svc.update_webhook(session, principal.scope, principal.actor, id, changes)
    return _webhook(row)


@router.delete(
    "/{id}",
    status_code=204,
    response_class=Response,
    responses={**ERRORS, **NOT_FOUND},
    summary="Delete a webhook and its delivery log (audited)",
)
def delete_webhook(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    svc.delete_webhook(session, principal.scope, principal.actor, id)
    return Response(status_code=204)


@router.post(
    "/{id}/rotate-secret",
    response_model=WebhookWithSecret,
    responses={**ERRORS, **NOT_FOUND},
    summary="Issue a new signing secret, used from the next try on (shown once; audited)",
)
def rotate_secret(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> WebhookWithSecret:
    return _with_secret(svc.rotate_secret(session, principal.scope, principal.actor, id))


@router.post(
    "/{id}/test",
    status_code=202,
    response_model=DeliveryPublic,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Queue a webhook.test ping for this webhook only (audited)",
)
def test_webhook(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> DeliveryPublic:
    return _delivery(svc.queue_test(session, principal.scope, principal.actor, id))


@router.get(
    "/{id}/deliveries",
    response_model=Page[DeliveryPublic],
    responses={**ERRORS, **NOT_FOUND},
    summary="The webhook's delivery log, newest first",
)
def list_deliveries(
    id: RowId,
    principal: CurrentPrincipal,
    session: SessionDep,
    status: WebhookDeliveryStatus | None = None,
    event_type: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[DeliveryPublic]:
    limit = min(limit, 100)
    rows, total = svc.deliveries_of(
        session,
        principal.scope,
        id,
        status=status,
        event_type=event_type,
        limit=limit,
        offset=offset,
    )
    return Page(items=[_delivery(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/{id}/deliveries/{delivery_id}",
    response_model=DeliveryDetailPublic,
    responses={**ERRORS, **NOT_FOUND},
    summary="One delivery with its event and every attempt",
)
def get_delivery(
    id: RowId, delivery_id: RowId, principal: CurrentPrincipal, session: SessionDep
) -> DeliveryDetailPublic:
    detail = svc.delivery_detail(session, principal.scope, id, delivery_id)
    return DeliveryDetailPublic(
        **_delivery(detail.delivery).model_dump(),
        event=_event(detail.event),
        attempts=[_attempt(a) for a in detail.attempts],
    )


@router.post(
    "/{id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=DeliveryPublic,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Send a delivered or failed delivery again (409 while it waits; audited)",
)
def redeliver(
    id: RowId, delivery_id: RowId, principal: CurrentPrincipal, session: SessionDep
) -> DeliveryPublic:
    row = svc.redeliver(session, principal.scope, principal.actor, id, delivery_id)
    return _delivery(row)
