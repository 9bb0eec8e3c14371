"""Maintenance: recover work whose lease expired (a dead run must not strand an episode)."""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

from datetime import timedelta

from dagster import (
    DefaultScheduleStatus,
    MetadataValue,
    OpExecutionContext,
    Output,
    ScheduleDefinition,
    job,
    op,
)

from keystone_core.services.episodes import release_expired_qa_leases
from keystone_core.services.presence import prune
from keystone_pipelines.resources import KeystoneDatabase


@op(description="Return episodes whose QA lease expired to pending_qa.")
def release_expired_qa_leases_op(
    context: OpExecutionContext, database: KeystoneDatabase
) -> Output[int]:
    with database.session() as session:
        released = release_expired_qa_leases(session)
    context.log.info("released %d expired QA leases", len(released))
    return Output(
        len(released),
        metadata={
            "released": len(released),
            "episode_ids": MetadataValue.json([str(i) for i in released[:100]]),
        },
    )


@job(
    description="Lease recovery: stuck qa_running episodes go back to the QA queue.",
    tags={"keystone/kind": "maintenance"},
)
def release_expired_leases() -> None:
    release_expired_qa_leases_op()


release_expired_leases_schedule = ScheduleDefinition(
    job=release_expired_leases,
    cron_schedule="*/5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Safety net: every 5 minutes.",
)


DEVICE_EVENT_RETENTION = timedelta(days=30)
DEVICE_COMMAND_RETENTION = timedelta(days=2)


@op(description="Drop device events older than 30 days and finished device RPCs older than 2.")
def prune_device_feed_op(context: OpExecutionContext, database: KeystoneDatabase) -> Output[int]:
    with database.session() as session:
        removed = prune(
            session,
            events_older_than=DEVICE_EVENT_RETENTION,
            commands_older_than=DEVICE_COMMAND_RETENTION,
        )
    context.log.info("removed %d old device events and RPC rows", removed)
    return Output(removed, metadata={"removed": removed})


@job(
    description="Retention of the device event feed and of answered device RPCs.",
    tags={"keystone/kind": "maintenance"},
)
def prune_device_feed() -> None:
    prune_device_feed_op()


prune_device_feed_schedule = ScheduleDefinition(
    job=prune_device_feed,
    cron_schedule="17 3 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Daily at 03:17 UTC.",
)
