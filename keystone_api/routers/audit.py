"""The audit log: every write, who made it (role, route, request) and what changed."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import AfterValidator, AwareDatetime, BaseModel
from sqlalchemy import ColumnElement, func, select
from sqlmodel import col

from keystone_api.crud import ERRORS
from keystone_api.deps import CurrentPrincipal, SessionDep
from keystone_api.schemas import IdStr, Page
from keystone_core.clock import as_utc
from keystone_core.models import AuditLog
from keystone_core.services import crud
from keystone_core.services.crud import Family

router = APIRouter(prefix="/api/v1", tags=["audit"])


def _utc(value: datetime) -> datetime:
    # 0001-01-01T00:00+14:00 is valid ISO but has no UTC equivalent; refuse it here (422)
    # rather than when the database driver converts it (a 500).
    try:
        return as_utc(value)
    except OverflowError:
        raise ValueError("datetime out of range once converted to UTC") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]

# Rows without a factory (accounts, the global catalog) are shown to every admin.
AUDIT = Family(model=AuditLog, entity="audit", factory_column="factory_id")


class AuditPublic(BaseModel):
    id: IdStr
    occurred_at: datetime
    actor_type: str
    actor_id: str
    actor_account: str
    actor_role: str
    route: str
    action: str
    entity_type: str
    entity_id: str
    factory_id: IdStr | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    request_id: str | None


class AuditQuery:
    """Filters of the audit list; ``since``/``until`` need a time zone (e.g. ``Z``)."""

    def __init__(
        self,
        limit: Annotated[
            int, Query(ge=1, description="Page size; values above 100 give 100.")
        ] = 50,
        # Bounded: MariaDB rejects an OFFSET beyond 2**64 - 1 with a syntax error (a 500).
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
        entity_type: Annotated[str | None, Query(max_length=64)] = None,
        entity_id: Annotated[str | None, Query(max_length=64)] = None,
        actor_account: Annotated[str | None, Query(max_length=128)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        factory_id: int | None = None,
        since: Annotated[UtcDatetime | None, Query(description="occurred_at ≥ since")] = None,
        until: Annotated[UtcDatetime | None, Query(description="occurred_at < until")] = None,
        request_id: Annotated[str | None, Query(max_length=64)] = None,
    ) -> None:
        self.limit = crud.clamp_limit(limit)
        self.offset = offset
        where: list[ColumnElement[bool]] = []
        for column, value in (
            (AuditLog.entity_type, entity_type),
            (AuditLog.entity_id, entity_id),
            (AuditLog.actor_account, actor_account),
            (AuditLog.action, action),
            (AuditLog.request_id, request_id),
        ):
            if value is not None:
                where.append(col(column) == value)
        if factory_id is not None:
            where.append(col(AuditLog.factory_id) == factory_id)
        if since is not None:
            where.append(col(AuditLog.occurred_at) >= since)
        if until is not None:
            where.append(col(AuditLog.occurred_at) < until)
        self.where = where


@router.get(
    "/audit",
    response_model=Page[AuditPublic],
    summary="List audit rows, newest first",
    responses=ERRORS,
    name="audit.list",
)
def list_audit(
    principal: CurrentPrincipal,
    session: SessionDep,
    query: Annotated[AuditQuery, Depends()],
) -> Page[AuditPublic]:
    rows = crud.scoped(AUDIT, principal.scope).where(*query.where)
    total = session.execute(select(func.count()).select_from(rows.subquery())).scalar_one()
    # id breaks ties between rows written in the same microsecond (one request's writes).
    newest_first = (col(AuditLog.occurred_at).desc(), col(AuditLog.id).desc())
    items = session.execute(
        rows.order_by(*newest_first).limit(query.limit).offset(query.offset)
    ).scalars()
    return Page[AuditPublic](
        items=[AuditPublic.model_validate(row, from_attributes=True) for row in items],
        total=int(total),
        limit=query.limit,
        offset=query.offset,
    )
