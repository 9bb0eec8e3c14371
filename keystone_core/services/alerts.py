"""Keystone's alert rules: evaluated over the factory signals, stored, raised and cleared.

The rules are the same conditions as ``docs/alerts/keystone.rules.yml`` (Prometheus), read
from the same signals (``services/signals.py``), so a factory without Prometheus still gets
them: the ``alerts_sensor`` calls :func:`evaluate`, which opens an :class:`Alert` row when a
rule starts firing for a factory and resolves it when the rule stops, writing
``alert.raised`` / ``alert.resolved`` outbox events (delivered by webhooks) in the same
transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, func
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import NotFoundError
from keystone_core.models import Alert, AlertSeverity, AlertState
from keystone_core.services import outbox
from keystone_core.services.scope import Scope
from keystone_core.services.signals import FactorySignals, read_signals
from keystone_core.settings import Settings


@dataclass(frozen=True)
class AlertRule:
    """Fires for a factory when ``applies`` and ``value`` > ``threshold``."""

    name: str
    severity: AlertSeverity
    description: str
    value: Callable[[FactorySignals], float]
    threshold: Callable[[Settings], float]
    summary: Callable[[float, float], str]
    applies: Callable[[FactorySignals, Settings], bool] = lambda s, c: True

    def firing(self, signals: FactorySignals, settings: Settings) -> bool:
        return self.applies(signals, settings) and self.value(signals) > self.threshold(settings)


RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="upload_queue_high",
        severity=AlertSeverity.WARNING,
        description="More tasks in `uploading` than KEYSTONE_ALERT_UPLOAD_QUEUE_MAX.",
        value=lambda s: s.upload_queue,
        threshold=lambda c: c.alert_upload_queue_max,
        summary=lambda v, t: f"{v:.0f} tasks are waiting for their upload (more than {t:.0f})",
    ),
    AlertRule(
        name="qa_failure_rate_high",
        severity=AlertSeverity.WARNING,
        description="Share of `qa_failed` among the last hour's QA results above "
        "KEYSTONE_ALERT_QA_FAILURE_RATE (judged from KEYSTONE_ALERT_QA_MIN_RESULTS results).",
        value=lambda s: s.qa_failure_rate,
        threshold=lambda c: c.alert_qa_failure_rate,
        summary=lambda v, t: f"QA failed {v:.0%} of the last hour's episodes (more than {t:.0%})",
        applies=lambda s, c: s.qa_results_last_hour >= c.alert_qa_min_results,
    ),
    AlertRule(
        name="no_uploads",
        severity=AlertSeverity.CRITICAL,
        description="No upload for KEYSTONE_ALERT_NO_UPLOADS_MINUTES during the factory's "
        "production hours (its time zone, hours and days) while an order is in production.",
        value=lambda s: s.upload_silence_s,
        threshold=lambda c: c.alert_no_uploads_minutes * 60,
        summary=lambda v, t: f"no uploads for {v / 60:.0f} min during production hours",
        applies=lambda s, c: s.expecting_uploads,
    ),
    AlertRule(
        name="sync_queue_high",
        severity=AlertSeverity.WARNING,
        description="More sync jobs with work left (queued, retry_wait, in_progress) than "
        "KEYSTONE_ALERT_SYNC_QUEUE_MAX.",
        value=lambda s: s.sync_queue_total,
        threshold=lambda c: c.alert_sync_queue_max,
        summary=lambda v, t: f"{v:.0f} episodes are waiting for cloud sync (more than {t:.0f})",
    ),
    AlertRule(
        name="sync_failures",
        severity=AlertSeverity.WARNING,
        description="Sync jobs in `failed` (attempt budget spent; a resync clears them).",
        value=lambda s: s.sync_failed,
        threshold=lambda c: c.alert_sync_failed_max,
        summary=lambda v, t: f"{v:.0f} episodes failed to sync and need a resync",
    ),
    AlertRule(
        name="stuck_leases",
        severity=AlertSeverity.WARNING,
        description="QA or sync claims whose lease expired more than 10 minutes ago "
        "(lease recovery is not running).",
        value=lambda s: s.stuck_sync_leases + s.stuck_qa_leases,
        threshold=lambda c: c.alert_stuck_leases_max,
        summary=lambda v, t: f"{v:.0f} QA/sync claims hold an expired lease",
    ),
)
RULE_NAMES = frozenset(rule.name for rule in RULES)


@dataclass
class Evaluation:
    """What one evaluation did."""

    raised: list[Alert] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    firing: int = 0
    factories: int = 0

    def describe(self) -> str:
        return (
            f"{self.factories} factories: {self.firing} firing, "
            f"{len(self.raised)} raised, {len(self.resolved)} resolved"
        )


def _open_key(rule: str, factory_id: int | None) -> str:
    return f"{rule}:{factory_id if factory_id is not None else '-'}"


def _payload(alert: Alert, slug: str) -> dict[str, object]:
    return {
        "alert_id": str(alert.id),
        "rule": alert.rule,
        "severity": str(alert.severity),
        "state": str(alert.state),
        "factory": slug,
        "summary": alert.summary,
        "value": alert.value,
        "threshold": alert.threshold,
        "started_at": clock.as_utc(alert.started_at).isoformat(),
        "resolved_at": clock.as_utc(alert.resolved_at).isoformat() if alert.resolved_at else None,
    }


def evaluate(session: Session, settings: Settings, *, now: dt.datetime | None = None) -> Evaluation:
    """Evaluate every rule for every factory; raise new alerts and resolve cleared ones.

    Open alerts are read ``FOR UPDATE`` so two evaluators serialise; one alert per rule and
    factory can be open (unique ``open_key``). Runs in the caller's transaction.
    """
    now = now or clock.now()
    readings = read_signals(session, now=now)
    open_alerts: dict[str | None, Alert] = {
        a.open_key: a
        for a in session.exec(
            select(Alert).where(col(Alert.state) == AlertState.FIRING).with_for_update()
        ).all()
    }
    result = Evaluation(factories=len(readings))
    seen: set[str] = set()
    for signals in readings:
        for rule in RULES:
            key = _open_key(rule.name, signals.factory_id)
            value, threshold = float(rule.value(signals)), float(rule.threshold(settings))
            alert = open_alerts.get(key)
            if rule.firing(signals, settings):
                seen.add(key)
                result.firing += 1
                if alert is None:
                    alert = Alert(
                        rule=rule.name,
                        severity=rule.severity,
                        factory_id=signals.factory_id,
                        open_key=key,
                        started_at=now,
                        labels={"factory": signals.slug},
                        last_evaluated_at=now,
                    )
                    result.raised.append(alert)
                alert.value, alert.threshold = value, threshold
                alert.summary = rule.summary(value, threshold)[:512]
                alert.last_evaluated_at = now
                alert.updated_at = now
                session.add(alert)
    slugs = {s.factory_id: s.slug for s in readings}
    for open_key, alert in open_alerts.items():
        if open_key is None or open_key in seen:
            continue
        alert.state = AlertState.RESOLVED
        alert.open_key = None
        alert.resolved_at = now
        alert.last_evaluated_at = now
        alert.updated_at = now
        session.add(alert)
        result.resolved.append(alert)
    session.flush()
    for alert in result.raised:
        outbox.emit(
            session,
            outbox.EventType.ALERT_RAISED,
            _payload(alert, slugs.get(alert.factory_id or 0, "")),
            factory_id=alert.factory_id,
        )
    for alert in result.resolved:
        outbox.emit(
            session,
            outbox.EventType.ALERT_RESOLVED,
            _payload(alert, str(alert.labels.get("factory", ""))),
            factory_id=alert.factory_id,
        )
    return result


def list_alerts(
    session: Session,
    scope: Scope,
    *,
    state: AlertState | None = None,
    factory_id: int | None = None,
    rule: str | None = None,
    severity: AlertSeverity | None = None,
    limit: int,
    offset: int,
) -> tuple[list[Alert], int]:
    """Alerts in scope, newest first, and how many match."""
    where: list[ColumnElement[bool]] = []
    if scope.factory_ids is not None:
        where.append(col(Alert.factory_id).in_(sorted(scope.factory_ids)))
    if factory_id is not None:
        where.append(col(Alert.factory_id) == factory_id)
    if state is not None:
        where.append(col(Alert.state) == state)
    if rule is not None:
        where.append(col(Alert.rule) == rule)
    if severity is not None:
        where.append(col(Alert.severity) == severity)
    total = session.exec(select(func.count()).select_from(Alert).where(*where)).one()
    rows = session.exec(
        select(Alert)
        .where(*where)
        .order_by(col(Alert.started_at).desc(), col(Alert.id).desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return list(rows), int(total)


def get_alert(session: Session, scope: Scope, alert_id: int) -> Alert:
    alert = session.get(Alert, alert_id)
    if alert is None or (alert.factory_id is not None and not scope.can_see(alert.factory_id)):
        raise NotFoundError(f"alert {alert_id} not found")
    return alert
