"""Maintenance: recover work whose lease expired (a dead run must not strand an episode)."""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

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
