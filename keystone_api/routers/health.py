"""Health: readiness of every dependency (503 when one is down) and plain liveness.

Components: ``database``, ``object_store``, ``migrations`` and — unless
``KEYSTONE_HEALTH_REQUIRE_DAGSTER=false`` — ``dagster_daemon``, judged by the heartbeat its
``keystone_heartbeat_sensor`` writes (``KEYSTONE_DAGSTER_HEARTBEAT_MAX_AGE_S``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_api.deps import SettingsDep, get_engine
from keystone_api.schemas import ComponentHealth, HealthResponse, LiveResponse
from keystone_core.db import check_database
from keystone_core.errors import KeystoneError
from keystone_core.migrate import migration_status
from keystone_core.services.heartbeats import DAGSTER_DAEMON, heartbeat_state
from keystone_core.settings import Settings
from keystone_core.storage import check_object_store

router = APIRouter(prefix="/api/v1/health", tags=["health"])


@router.get(
    "",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "a component is down"}},
)
def health(request: Request, settings: SettingsDep) -> JSONResponse:
    """Database, object store, migration level and the Dagster daemon's heartbeat; 503
    when any of them is not right."""
    engine = get_engine(request)
    components: dict[str, ComponentHealth] = {}
    migration: dict[str, str | None] = {"current": None, "head": None}
    try:
        check_database(engine)
        components["database"] = ComponentHealth(status="up")
    except KeystoneError as exc:
        components["database"] = ComponentHealth(status="down", detail=exc.message)
    try:
        check_object_store(request.app.state.s3_probe)
        components["object_store"] = ComponentHealth(status="up")
    except KeystoneError as exc:
        components["object_store"] = ComponentHealth(status="down", detail=exc.message)
    if components["database"].status == "up":
        try:
            status = migration_status(engine)
            migration = {"current": status.current, "head": status.head}
            components["migrations"] = (
                ComponentHealth(status="up")
                if status.up_to_date
                else ComponentHealth(
                    status="down", detail=f"database at {status.current}, code at {status.head}"
                )
            )
        except Exception as exc:  # a broken alembic table must show up, not crash the probe
            components["migrations"] = ComponentHealth(status="down", detail=str(exc)[:200])
    else:
        components["migrations"] = ComponentHealth(status="down", detail="database is down")
    if settings.health_require_dagster:
        components[DAGSTER_DAEMON] = _dagster_daemon(engine, settings, components)
    healthy = all(c.status == "up" for c in components.values())
    body = HealthResponse(
        status="ok" if healthy else "degraded", components=components, migration=migration
    )
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


def _dagster_daemon(
    engine: Engine, settings: Settings, components: dict[str, ComponentHealth]
) -> ComponentHealth:
    if components["database"].status != "up":
        return ComponentHealth(status="down", detail="database is down")
    try:
        with Session(engine) as session:
            state = heartbeat_state(
                session, DAGSTER_DAEMON, max_age_s=settings.dagster_heartbeat_max_age_s
            )
    except Exception as exc:  # e.g. the table is missing before migrations: report, not 500
        return ComponentHealth(status="down", detail=f"heartbeat unreadable: {str(exc)[:160]}")
    if not state.up:
        return ComponentHealth(status="down", detail=state.detail or "")
    return ComponentHealth(
        status="up", detail=f"last heartbeat {max(0.0, state.age_s or 0.0):.0f} s ago"
    )


@router.get(
    "/live",
    response_model=LiveResponse,
)
def live() -> LiveResponse:
    """The process answers; says nothing about its dependencies."""
    return LiveResponse(status="ok")
