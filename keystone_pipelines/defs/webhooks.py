"""Webhook delivery in Dagster: the outbox sensor, the deliver_webhooks job, a safety schedule.

* ``outbox_sensor`` works in the database only: it recovers deliveries whose run died
  (lease expired), fans pending outbox events out into deliveries (bounded per tick; an
  event no webhook wants is just marked dispatched, so it never costs a run) and, while
  deliveries are due (or events are left) and no ``deliver_webhooks`` run is in flight,
  requests one. ``outbox_safety_schedule`` does the same every five minutes in case the sensor is
  off.
* ``deliver_webhooks``'s op fans pending events out to the webhooks that want them, then
  claims due deliveries under a lease naming the run and POSTs them
  (``KEYSTONE_WEBHOOK_WORKERS`` endpoints at a time), batch after batch, until nothing is
  due or its time budget is spent. Retries with backoff are rows in the database
  (``retry_wait``), so a later run — not this one — makes them; the op's ``RetryPolicy``
  covers unexpected errors (the database dropping mid-batch), and a retried op takes back
  the deliveries its run still holds.
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

from typing import Any

from dagster import (
    Backoff,
    Config,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Jitter,
    MetadataValue,
    OpExecutionContext,
    Output,
    RetryPolicy,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    job,
    op,
    schedule,
)
from dagster import sensor as dagster_sensor

from keystone_core.services import webhooks as webhook_service
from keystone_pipelines.defs.runs import runs_in_flight
from keystone_pipelines.resources import KeystoneDatabase

JOB_NAME = "deliver_webhooks"
# Outbox events one sensor or schedule tick fans out (a factory writes a few per second).
FAN_OUT_PER_TICK = 2000
RUN_TAGS = {"keystone/kind": "webhooks"}
OP_RETRY = RetryPolicy(
    max_retries=3, delay=2, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
)


class DeliverWebhooksConfig(Config):
    # Seconds of delivering before the run ends (the rest is the next run's).
    time_budget_s: float = 120.0


def _run_metadata(outcome: webhook_service.DeliveryOutcome) -> dict[str, Any]:
    rows = [r for r in outcome.rows if r["status"] != "delivered"][:200]
    table = "| delivery | webhook | event | status | HTTP | error |\n|---|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {r['delivery']} | {r['webhook']} | {r.get('event', '')} | {r['status']} | "
        f"{r.get('http') or ''} | {str(r.get('error', '')).replace('|', '/')[:120]} |"
        for r in rows
    )
    return {
        **outcome.counts(),
        "seconds": round(outcome.seconds, 2),
        "not_delivered": MetadataValue.md(table),
    }


@op(
    description="Fan pending outbox events out to webhooks, then POST due deliveries "
    "(signed, under a lease) until none is due or the time budget is spent.",
    retry_policy=OP_RETRY,
)
def deliver_due_webhooks(
    context: OpExecutionContext, config: DeliverWebhooksConfig, database: KeystoneDatabase
) -> Output[int]:
    outcome = webhook_service.deliver_pending(
        database.session,
        database.settings,
        owner=context.run.run_id,
        budget_s=config.time_budget_s,
    )
    context.log.info(
        "events %d → deliveries %d; tried %d: delivered %d, retry %d, failed %d, deferred %d",
        outcome.events,
        outcome.created,
        outcome.claimed,
        outcome.delivered,
        outcome.retry,
        outcome.failed,
        outcome.deferred,
    )
    for row in outcome.rows:
        if row.get("disabled"):
            context.log.warning("webhook %s disabled after repeated failures", row["webhook"])
    return Output(outcome.delivered, metadata=_run_metadata(outcome))


@job(description="Deliver outbox events to webhooks (fan-out, signed POSTs).", tags=RUN_TAGS)
def deliver_webhooks() -> None:
    deliver_due_webhooks()


def _work_waiting(
    context: SensorEvaluationContext | ScheduleEvaluationContext, database: KeystoneDatabase
) -> str | SkipReason:
    """Why a run is wanted (events to fan out, deliveries due), or why not.

    Fan-out is a few SQL statements, so the tick does a bounded share of it itself: events
    no webhook wants (every event, when none is registered) never cost a run."""
    with database.session() as session:
        recovered = webhook_service.recover_expired(session, database.settings)
        fanned = webhook_service.fan_out(session, limit=FAN_OUT_PER_TICK)
    if fanned.events:
        context.log.info(
            "fanned out %d outbox events into %d deliveries", fanned.events, fanned.deliveries
        )
    with database.session() as session:
        events = webhook_service.has_pending_events(session)
        due = webhook_service.due_count(session)
    if recovered:
        context.log.info("recovered %d webhook deliveries whose lease expired", recovered)
    if not events and not due:
        return SkipReason("no outbox event waits and no webhook delivery is due")
    if runs_in_flight(context.instance, JOB_NAME):
        return SkipReason(f"a {JOB_NAME} run is in flight")
    return f"events={'yes' if events else 'no'} due={due}"


@dagster_sensor(
    job=deliver_webhooks,
    minimum_interval_seconds=10,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launch deliver_webhooks while outbox events or due deliveries wait.",
)
def outbox_sensor(
    context: SensorEvaluationContext, database: KeystoneDatabase
) -> SensorResult | SkipReason:
    waiting = _work_waiting(context, database)
    if isinstance(waiting, SkipReason):
        return waiting
    tick = int(context.cursor or 0) + 1
    context.update_cursor(str(tick))
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"{JOB_NAME}-{tick}", tags={**RUN_TAGS, "keystone/waiting": waiting})
        ]
    )


@schedule(
    job=deliver_webhooks,
    cron_schedule="*/5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Safety net: a deliver_webhooks run every 5 minutes if work waits and none runs.",
)
def outbox_safety_schedule(
    context: ScheduleEvaluationContext, database: KeystoneDatabase
) -> RunRequest | SkipReason:
    waiting = _work_waiting(context, database)
    if isinstance(waiting, SkipReason):
        return waiting
    return RunRequest(tags={**RUN_TAGS, "keystone/waiting": waiting, "keystone/by": "schedule"})
