"""Data-production statistics: summary, trend, breakdown, details and CSV export.

``/admin/statistics/data-production/…`` serve admins and production managers over their
factories; ``/operator/statistics/data-production/…`` serve a data collector its own
episodes. Paths, parameters and JSON fields follow the Go implementation Synapse calls
(``start_time``/``end_time``, ``granularity``, ``timezone_offset``, ``dimension``,
``robot_device_id``, ``collector_operator_id``, ``hasNext``…); the numbers are defined in
``docs/statistics.md``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from keystone_api.crud import ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep, get_engine
from keystone_api.schemas import MAX_ROW_ID
from keystone_core.db import session_scope
from keystone_core.errors import ValidationFailed
from keystone_core.models import EpisodeStatus
from keystone_core.services import statistics as svc
from keystone_core.services.scope import Scope

admin = APIRouter(prefix="/api/v1/admin/statistics/data-production", tags=["statistics"])
operator = APIRouter(prefix="/api/v1/operator/statistics/data-production", tags=["statistics"])

MAX_LIST_VALUES = 100
RowIdQuery = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)]
ListValue = Annotated[str, StringConstraints(max_length=1024)]
ListQuery = Annotated[
    list[ListValue] | None,
    Query(
        max_length=MAX_LIST_VALUES,
        description="Repeat the parameter or separate values with commas.",
    ),
]
StartTime = Annotated[
    dt.datetime | None,
    Query(description="Inclusive start, RFC 3339 (UTC if no offset); default: end - 7 days."),
]
EndTime = Annotated[dt.datetime | None, Query(description="Exclusive end, RFC 3339. Default: now.")]
Offset = Annotated[
    str | None,
    Query(
        max_length=16,
        description="UTC offset of local buckets, e.g. +08:00. Default: the factory's "
        "time zone (one factory asked for or in scope), else UTC.",
    ),
]
Limit = Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")]
PageOffset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
CSV_NAME = "data-production-statistics.csv"


def _values(name: str, raw: list[str] | None) -> tuple[str, ...]:
    values: list[str] = []
    for item in raw or []:
        for part in item.split(","):
            part = part.strip()
            if part and part not in values:
                values.append(part)
    if len(values) > MAX_LIST_VALUES:
        raise ValidationFailed(
            f"{name} takes at most {MAX_LIST_VALUES} values", code="invalid_filter", field=name
        )
    if any(len(v) > 128 for v in values):
        raise ValidationFailed(
            f"{name} values are at most 128 characters", code="invalid_filter", field=name
        )
    return tuple(values)


def _ids(name: str, raw: list[str] | None) -> tuple[int, ...]:
    out = []
    for value in _values(name, raw):
        if not value.isdigit() or not 1 <= int(value) <= MAX_ROW_ID:
            raise ValidationFailed(
                f"{name} must be positive integer ids", code="invalid_filter", field=name
            )
        out.append(int(value))
    return tuple(out)


def _statuses(raw: list[str] | None) -> tuple[EpisodeStatus, ...]:
    known = {s.value for s in EpisodeStatus}
    values = _values("qa_status", raw)
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ValidationFailed(
            f"qa_status must be one of {', '.join(sorted(known))}",
            code="invalid_filter",
            field="qa_status",
        )
    return tuple(EpisodeStatus(v) for v in values)


@dataclass(frozen=True)
class ProductionParams:
    """The filters every data-production route takes, before the range is checked."""

    start_time: dt.datetime | None
    end_time: dt.datetime | None
    filters: dict[str, Any]

    def build(self, scope: Scope, granularity: svc.Granularity = "day") -> svc.ProductionFilter:
        start, end = svc.time_range(self.start_time, self.end_time, granularity=granularity)
        svc.check_factory(scope, self.filters["factory_id"])
        return svc.ProductionFilter(start=start, end=end, **self.filters)


def production_params(
    start_time: StartTime = None,
    end_time: EndTime = None,
    factory_id: RowIdQuery = None,
    order_id: RowIdQuery = None,
    batch_id: RowIdQuery = None,
    workstation_id: RowIdQuery = None,
    skill_id: RowIdQuery = None,
    scene_id: ListQuery = None,
    sop_id: ListQuery = None,
    robot_type_id: ListQuery = None,
    robot_device_id: ListQuery = None,
    qa_status: Annotated[
        list[ListValue] | None,
        Query(
            max_length=MAX_LIST_VALUES,
            description="Episode statuses (pending_qa, …, rejected); repeat or comma-separate.",
        ),
    ] = None,
    cloud_synced: Annotated[
        bool | None, Query(description="Only episodes with (true) / without a cloud copy.")
    ] = None,
    task_id: Annotated[str | None, Query(max_length=64, description="A task's public id.")] = None,
) -> ProductionParams:
    """Go's filter names, plus Keystone's order, batch, workstation and skill ids."""
    return ProductionParams(
        start_time,
        end_time,
        {
            "factory_id": factory_id,
            "order_id": order_id,
            "batch_id": batch_id,
            "workstation_id": workstation_id,
            "skill_id": skill_id,
            "scene_ids": _ids("scene_id", scene_id),
            "sop_ids": _ids("sop_id", sop_id),
            "robot_type_ids": _ids("robot_type_id", robot_type_id),
            "robot_device_ids": _values("robot_device_id", robot_device_id),
            "qa_statuses": _statuses(qa_status),
            "cloud_synced": cloud_synced,
            "task_id": task_id.strip() if task_id and task_id.strip() else None,
        },
    )


def admin_params(
    base: Annotated[ProductionParams, Depends(production_params)],
    collector_operator_id: ListQuery = None,
) -> ProductionParams:
    """Admin routes also filter by data collectors (their operator ids)."""
    collectors = _values("collector_operator_id", collector_operator_id)
    return ProductionParams(
        base.start_time, base.end_time, {**base.filters, "collector_operator_ids": collectors}
    )


AdminFilters = Annotated[ProductionParams, Depends(admin_params)]
OperatorFilters = Annotated[ProductionParams, Depends(production_params)]


def _offset(
    session: SessionDep, scope: Scope, f: svc.ProductionFilter, explicit: str | None
) -> int:
    return svc.local_offset(session, scope, explicit=explicit, factory_id=f.factory_id, at=f.start)


def _own(scope: Scope, f: svc.ProductionFilter) -> svc.ProductionFilter:
    """Operator routes: the caller's episodes, whatever collector filter was asked for."""
    return replace(f, data_collector_id=svc.own_collector(scope), collector_operator_ids=())


# --- admin ---------------------------------------------------------------------------------

SUMMARY = "Totals of a time range: count, duration, size, QA, cloud sync, previous range"
TREND = "The range per local hour, day, week or month (every bucket, empty ones too)"
BREAKDOWN = "The range per value of a dimension, most episodes first"


@admin.get(
    "/summary",
    response_model=svc.ProductionSummary,
    responses={**ERRORS, **NOT_FOUND},
    summary=SUMMARY,
)
def admin_summary(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: AdminFilters,
) -> svc.ProductionSummary:
    scope = principal.scope
    return svc.summary(session, scope, params.build(scope))


@admin.get(
    "/trend",
    response_model=svc.ProductionTrend,
    responses={**ERRORS, **NOT_FOUND},
    summary=TREND,
)
def admin_trend(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: AdminFilters,
    granularity: svc.Granularity = "day",
    timezone_offset: Offset = None,
) -> svc.ProductionTrend:
    scope = principal.scope
    f = params.build(scope, granularity)
    return svc.trend(
        session,
        scope,
        f,
        granularity=granularity,
        offset_minutes=_offset(session, scope, f, timezone_offset),
    )


@admin.get(
    "/breakdown",
    response_model=svc.ProductionBreakdown,
    responses={**ERRORS, **NOT_FOUND},
    summary=BREAKDOWN,
)
def admin_breakdown(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: AdminFilters,
    dimension: svc.Dimension = "source",
    limit: Limit = 50,
    offset: PageOffset = 0,
) -> svc.ProductionBreakdown:
    scope = principal.scope
    return svc.breakdown(
        session,
        scope,
        params.build(scope),
        dimension=dimension,
        limit=min(limit, 100),
        offset=offset,
    )


@admin.get(
    "/details",
    response_model=svc.ProductionDetails,
    responses={**ERRORS, **NOT_FOUND},
    summary="The episodes behind the numbers, one page at a time",
)
def admin_details(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: AdminFilters,
    sort_by: svc.DetailSort = "time",
    sort_order: Literal["asc", "desc"] = "desc",
    limit: Limit = 50,
    offset: PageOffset = 0,
) -> svc.ProductionDetails:
    scope = principal.scope
    return svc.details(
        session,
        scope,
        params.build(scope),
        sort_by=sort_by,
        descending=sort_order == "desc",
        limit=min(limit, 100),
        offset=offset,
    )


@admin.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "The detail rows as CSV (UTF-8), newest first, streamed.",
        },
        **ERRORS,
        **NOT_FOUND,
    },
    summary="The details of the same filters as CSV, streamed page by page",
)
def admin_export(
    request: Request,
    principal: CurrentPrincipal,
    session: SessionDep,
    params: AdminFilters,
    timezone_offset: Offset = None,
) -> StreamingResponse:
    scope = principal.scope
    f = params.build(scope)
    minutes = _offset(session, scope, f, timezone_offset)
    rows = svc.export_csv(
        partial(session_scope, get_engine(request)), scope, f, offset_minutes=minutes
    )
    return StreamingResponse(
        rows,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{CSV_NAME}"'},
    )


# --- operator (the calling data collector) --------------------------------------------------


@operator.get(
    "/summary",
    response_model=svc.ProductionSummary,
    responses={**ERRORS, **NOT_FOUND},
    summary=f"{SUMMARY} (the caller's own episodes)",
)
def operator_summary(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: OperatorFilters,
) -> svc.ProductionSummary:
    scope = principal.scope
    return svc.summary(session, scope, _own(scope, params.build(scope)))


@operator.get(
    "/trend",
    response_model=svc.ProductionTrend,
    responses={**ERRORS, **NOT_FOUND},
    summary=f"{TREND} (the caller's own episodes)",
)
def operator_trend(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: OperatorFilters,
    granularity: svc.Granularity = "day",
    timezone_offset: Offset = None,
) -> svc.ProductionTrend:
    scope = principal.scope
    f = _own(scope, params.build(scope, granularity))
    return svc.trend(
        session,
        scope,
        f,
        granularity=granularity,
        offset_minutes=_offset(session, scope, f, timezone_offset),
    )


@operator.get(
    "/breakdown",
    response_model=svc.ProductionBreakdown,
    responses={**ERRORS, **NOT_FOUND},
    summary=f"{BREAKDOWN} (the caller's own episodes)",
)
def operator_breakdown(
    principal: CurrentPrincipal,
    session: SessionDep,
    params: OperatorFilters,
    dimension: svc.Dimension = "source",
    limit: Limit = 50,
    offset: PageOffset = 0,
) -> svc.ProductionBreakdown:
    scope = principal.scope
    return svc.breakdown(
        session,
        scope,
        _own(scope, params.build(scope)),
        dimension=dimension,
        limit=min(limit, 100),
        offset=offset,
    )
