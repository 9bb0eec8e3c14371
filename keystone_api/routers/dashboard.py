"""Dashboards: the production big screen (snapshot, overview) and the quality dashboard.

``/production/dashboard/{snapshot,overview}`` keep the Go implementation's paths,
parameters (``factory_id``, ``workstation_id``, ``organization_id``, ``timezone_offset``,
``trend_days`` and the list limits, clamped to their maxima as Go does) and JSON fields
that Synapse reads. ``/quality/dashboard`` is Keystone's own (Go has none). What each
number means: ``docs/statistics.md``.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query

from keystone_api.crud import ERRORS, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep, SettingsDep
from keystone_api.schemas import MAX_ROW_ID
from keystone_core.services import statistics as svc

router = APIRouter(prefix="/api/v1", tags=["dashboards"])

RowIdQuery = Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)]
Offset = Annotated[
    str | None,
    Query(
        max_length=16,
        description="UTC offset of local days, e.g. +08:00. Default: the factory's time zone "
        "(one factory asked for or in scope), else UTC.",
    ),
]


@router.get(
    "/production/dashboard/snapshot",
    response_model=svc.Snapshot,
    responses={**ERRORS, **NOT_FOUND},
    summary="The factory right now: tasks, episodes, queues, devices, stations, today",
)
def production_snapshot(
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    factory_id: RowIdQuery = None,
    workstation_id: RowIdQuery = None,
    organization_id: RowIdQuery = None,
    timezone_offset: Offset = None,
    trend_days: Annotated[int, Query(ge=1, description="Days of trend (above 31 give 31).")] = 7,
    distribution_limit: Annotated[
        int, Query(ge=1, description="Scenes/SOPs listed (above 100 give 100).")
    ] = 100,
    active_limit: Annotated[
        int, Query(ge=1, description="Active batches/tasks listed (above 100 give 100).")
    ] = 20,
) -> svc.Snapshot:
    query = svc.DashboardQuery(
        factory_id=factory_id,
        workstation_id=workstation_id,
        organization_id=organization_id,
        timezone_offset=timezone_offset,
        trend_days=min(trend_days, 31),
        distribution_limit=min(distribution_limit, 100),
        active_limit=min(active_limit, 100),
    )
    return svc.snapshot(session, principal.scope, query, heartbeat_s=settings.device_heartbeat_s)


@router.get(
    "/production/dashboard/overview",
    response_model=svc.Overview,
    responses={**ERRORS, **NOT_FOUND},
    summary="The big screen: totals, today, the last days, quality, devices, stations",
)
def production_overview(
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    factory_id: RowIdQuery = None,
    workstation_id: RowIdQuery = None,
    organization_id: RowIdQuery = None,
    timezone_offset: Offset = None,
    trend_days: Annotated[
        int, Query(ge=1, description="Days in the period and trend (above 31 give 31).")
    ] = 7,
    active_limit: Annotated[int, Query(ge=1, description="Accepted for Go parity.")] = 20,
    recent_limit: Annotated[
        int, Query(ge=1, description="Recent tasks and failures (above 50 give 50).")
    ] = 10,
    preview_limit: Annotated[
        int, Query(ge=1, description="Episode previews (above 20 give 20).")
    ] = 8,
) -> svc.Overview:
    query = svc.DashboardQuery(
        factory_id=factory_id,
        workstation_id=workstation_id,
        organization_id=organization_id,
        timezone_offset=timezone_offset,
        trend_days=min(trend_days, 31),
        active_limit=min(active_limit, 100),
        recent_limit=min(recent_limit, 50),
        preview_limit=min(preview_limit, 20),
    )
    return svc.overview(session, principal.scope, query, heartbeat_s=settings.device_heartbeat_s)


@router.get(
    "/quality/dashboard",
    response_model=svc.QualityDashboard,
    responses={**ERRORS, **NOT_FOUND},
    summary="QA pass rate, failing checks, inspector throughput, score distribution",
)
def quality_dashboard(
    principal: CurrentPrincipal,
    session: SessionDep,
    start_time: Annotated[
        dt.datetime | None,
        Query(description="Inclusive start, RFC 3339 (UTC if no offset); default: end - 7 days."),
    ] = None,
    end_time: Annotated[
        dt.datetime | None, Query(description="Exclusive end, RFC 3339; default: now.")
    ] = None,
    factory_id: RowIdQuery = None,
    order_id: RowIdQuery = None,
    batch_id: RowIdQuery = None,
    timezone_offset: Offset = None,
) -> svc.QualityDashboard:
    scope = principal.scope
    start, end = svc.time_range(start_time, end_time)
    svc.check_factory(scope, factory_id)
    f = svc.ProductionFilter(
        start=start, end=end, factory_id=factory_id, order_id=order_id, batch_id=batch_id
    )
    offset = svc.local_offset(
        session, scope, explicit=timezone_offset, factory_id=factory_id, at=start
    )
    return svc.quality_dashboard(session, scope, f, offset_minutes=offset)
