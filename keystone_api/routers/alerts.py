"""Keystone's alerts: what the rules raised (firing) and cleared (resolved), and the rules.

The ``alerts_sensor`` in Dagster evaluates the rules (``keystone_core.services.alerts``);
this router only reads. ``alert.raised`` / ``alert.resolved`` reach webhooks through the
outbox.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from keystone_api.crud import ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep, SettingsDep
from keystone_api.schemas import MAX_ROW_ID, IdStr, Page, RowId
from keystone_core.models import Alert, AlertSeverity, AlertState
from keystone_core.services import alerts as svc

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])


class AlertPublic(BaseModel):
    id: IdStr
    rule: str
    severity: AlertSeverity
    state: AlertState
    factory_id: IdStr | None
    summary: str
    value: float | None = Field(description="The rule's value at the last evaluation.")
    threshold: float | None
    labels: dict[str, Any]
    started_at: dt.datetime
    last_evaluated_at: dt.datetime
    resolved_at: dt.datetime | None


class AlertRulePublic(BaseModel):
    name: str
    severity: AlertSeverity
    description: str
    threshold: float = Field(description="The value the rule must exceed (from settings).")


class AlertRulesPublic(BaseModel):
    interval_s: int = Field(description="How often the alerts sensor evaluates the rules.")
    rules: list[AlertRulePublic]


def _alert(alert: Alert) -> AlertPublic:
    assert alert.id is not None
    return AlertPublic(
        id=alert.id,
        rule=alert.rule,
        severity=alert.severity,
        state=alert.state,
        factory_id=alert.factory_id,
        summary=alert.summary,
        value=alert.value,
        threshold=alert.threshold,
        labels=alert.labels,
        started_at=alert.started_at,
        last_evaluated_at=alert.last_evaluated_at,
        resolved_at=alert.resolved_at,
    )


@router.get(
    "",
    response_model=Page[AlertPublic],
    responses={**ERRORS},
    summary="Alerts in scope, newest first (filter by state, factory, rule, severity)",
)
def list_alerts(
    principal: CurrentPrincipal,
    session: SessionDep,
    state: AlertState | None = None,
    factory_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    severity: AlertSeverity | None = None,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[AlertPublic]:
    limit = min(limit, 100)
    rows, total = svc.list_alerts(
        session,
        principal.scope,
        state=state,
        factory_id=factory_id,
        rule=rule,
        severity=severity,
        limit=limit,
        offset=offset,
    )
    return Page(items=[_alert(a) for a in rows], total=total, limit=limit, offset=offset)


@router.get(
    "/rules",
    response_model=AlertRulesPublic,
    responses={**ERRORS},
    summary="The alert rules and their thresholds in effect",
)
def alert_rules(settings: SettingsDep) -> AlertRulesPublic:
    return AlertRulesPublic(
        interval_s=settings.alerts_interval_s,
        rules=[
            AlertRulePublic(
                name=rule.name,
                severity=rule.severity,
                description=rule.description,
                threshold=float(rule.threshold(settings)),
            )
            for rule in svc.RULES
        ],
    )


@router.get(
    "/{id}",
    response_model=AlertPublic,
    responses={**ERRORS, **NOT_FOUND},
    summary="One alert",
)
def get_alert(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> AlertPublic:
    return _alert(svc.get_alert(session, principal.scope, id))
