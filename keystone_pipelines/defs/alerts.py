"""The alert rules, evaluated by a sensor: Keystone's own alerts without Prometheus.

``alerts_sensor`` reads the factory signals (the same the /metrics gauges show), opens an
alert when a rule starts firing and resolves it when it stops; ``alert.raised`` and
``alert.resolved`` go out through the outbox (webhooks). It launches no runs: one
evaluation is a few grouped queries. The cursor holds the time of the last evaluation so
``KEYSTONE_ALERTS_INTERVAL_S`` can be longer than the sensor's tick.
"""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason
from dagster import sensor as dagster_sensor

from keystone_core import clock
from keystone_core.services import alerts as alert_service
from keystone_pipelines.resources import KeystoneDatabase


@dagster_sensor(
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Evaluate Keystone's alert rules (docs/observability.md); raise and resolve "
    "alerts, delivered as alert.raised / alert.resolved webhook events.",
)
def alerts_sensor(context: SensorEvaluationContext, database: KeystoneDatabase) -> SkipReason:
    settings = database.settings
    now = clock.now()
    if context.cursor:
        try:
            last = float(context.cursor)
        except ValueError:
            last = 0.0
        if 0 <= now.timestamp() - last < settings.alerts_interval_s:
            return SkipReason("evaluated less than KEYSTONE_ALERTS_INTERVAL_S ago")
    with database.session() as session:
        result = alert_service.evaluate(session, settings, now=now)
    context.update_cursor(str(now.timestamp()))
    for alert in result.raised:
        context.log.warning("alert raised: %s (%s) %s", alert.rule, alert.severity, alert.summary)
    for alert in result.resolved:
        context.log.info("alert resolved: %s %s", alert.rule, alert.labels.get("factory", ""))
    return SkipReason(result.describe())
