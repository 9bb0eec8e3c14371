"""Housekeeping: the daily job that archives old audit rows and prunes the event history.

What goes and why: keystone_core.services.housekeeping and docs/runbooks/housekeeping.md.
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

from dagster import (
    Config,
    DefaultScheduleStatus,
    MetadataValue,
    OpExecutionContext,
    Output,
    ScheduleDefinition,
    job,
    op,
)

from keystone_core.services.audit import Actor
from keystone_core.services.housekeeping import run_housekeeping
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore


class HousekeepingConfig(Config):
    dry_run: bool = False


@op(
    description=(
        "Archive audit rows older than KEYSTONE_AUDIT_RETENTION_DAYS, then delete them; "
        "delete finished outbox events older than KEYSTONE_OUTBOX_RETENTION_DAYS."
    )
)
def housekeeping_op(
    context: OpExecutionContext,
    config: HousekeepingConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> Output[int]:
    settings = database.settings
    report = run_housekeeping(
        database.session,
        object_store.client if settings.audit_archive else None,
        settings,
        dry_run=config.dry_run,
        actor=Actor.system("dagster", request_id=context.run.run_id),
    )
    context.log.info(
        "%saudit rows: %d past retention, %d archived (%d archive(s), %.1f MB), %d deleted; "
        "outbox events: %d past retention, %d deleted (%d deliveries, %d attempts)",
        "dry run: " if report.dry_run else "",
        report.audit_candidates,
        report.audit_archived,
        len(report.archive_keys),
        report.archive_bytes / 1e6,
        report.audit_deleted,
        report.outbox_candidates,
        report.events_deleted,
        report.deliveries_deleted,
        report.attempts_deleted,
    )
    for error in report.errors:
        context.log.error(error)
    if report.errors:
        # Nothing unarchived was deleted; a failed run is what an operator should see.
        raise RuntimeError("; ".join(report.errors))
    return Output(
        report.audit_deleted + report.events_deleted,
        metadata={
            "dry_run": report.dry_run,
            "audit_deleted": report.audit_deleted,
            "audit_archived": report.audit_archived,
            "events_deleted": report.events_deleted,
            "time_budget_reached": report.time_budget_reached,
            "report": MetadataValue.json(report.as_dict()),
        },
    )


@job(
    description="Archive old audit rows and prune the delivered event history.",
    tags={"keystone/kind": "maintenance"},
)
def housekeeping() -> None:
    housekeeping_op()


housekeeping_schedule = ScheduleDefinition(
    job=housekeeping,
    cron_schedule="0 4 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Daily at 04:00 UTC: audit-log archival and event-history pruning.",
)
