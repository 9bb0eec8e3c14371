"""Dagster's run history retention: delete finished runs older than the retention period.

Dagster keeps every run, its event log and its captured stdout/stderr until someone
deletes them; a factory makes thousands of runs a day (QA and sync batches, safety
schedules), so without this the instance's database and the compute-log directory grow
without bound. Only finished runs go (succeeded, failed, cancelled); queued and running
ones are never touched. Keystone's own records (episodes, QA results, sync jobs, audit)
live in Keystone's database and are not affected.
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

import contextlib
import time
from datetime import timedelta

from dagster import (
    Config,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    OpExecutionContext,
    Output,
    RunsFilter,
    ScheduleDefinition,
    job,
    op,
)

from keystone_core import clock
from keystone_pipelines.resources import KeystoneDatabase

FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
PAGE = 500
# One run deletes at most this long, so a first purge of a large history cannot hold the
# pool slot for hours; the next day's run continues where it stopped.
TIME_BUDGET_S = 15 * 60


class RunHistoryConfig(Config):
    dry_run: bool = False


def purge_finished_runs(
    instance: DagsterInstance,
    *,
    older_than_days: int,
    dry_run: bool = False,
    time_budget_s: float = TIME_BUDGET_S,
) -> tuple[int, bool]:
    """Delete finished runs created more than ``older_than_days`` ago, oldest first, with
    their event logs and captured logs. Returns (runs deleted or, for a dry run, found;
    whether the time budget ran out first)."""
    expired = RunsFilter(
        statuses=FINISHED, created_before=clock.now() - timedelta(days=older_than_days)
    )
    if dry_run:
        return instance.get_runs_count(expired), False
    started = time.monotonic()
    count = 0
    while True:
        records = instance.get_run_records(filters=expired, limit=PAGE, ascending=True)
        if not records:
            return count, False
        for record in records:
            run_id = record.dagster_run.run_id
            instance.delete_run(run_id)
            # Captured stdout/stderr live apart from the database (files under the
            # instance's storage directory); a log manager that cannot delete keeps them.
            with contextlib.suppress(NotImplementedError):
                instance.compute_log_manager.delete_logs(prefix=[run_id])
            count += 1
            if time.monotonic() - started > time_budget_s:
                return count, True


@op(description="Delete finished Dagster runs older than KEYSTONE_DAGSTER_RUN_RETENTION_DAYS.")
def purge_run_history_op(
    context: OpExecutionContext, database: KeystoneDatabase, config: RunHistoryConfig
) -> Output[int]:
    days = database.settings.dagster_run_retention_days
    if days is None:
        context.log.info("KEYSTONE_DAGSTER_RUN_RETENTION_DAYS is empty: run history is kept")
        return Output(0, metadata={"kept": True})
    count, truncated = purge_finished_runs(
        context.instance, older_than_days=days, dry_run=config.dry_run
    )
    context.log.info(
        "%s %d finished run(s) older than %d days%s",
        "would delete" if config.dry_run else "deleted",
        count,
        days,
        " (time budget reached; the next run continues)" if truncated else "",
    )
    return Output(
        count,
        metadata={
            "retention_days": days,
            "dry_run": config.dry_run,
            "runs": count,
            "time_budget_reached": truncated,
        },
    )


@job(
    description="Delete finished Dagster runs (events and logs too) past their retention.",
    tags={"keystone/kind": "maintenance"},
)
def purge_run_history() -> None:
    purge_run_history_op()


purge_run_history_schedule = ScheduleDefinition(
    job=purge_run_history,
    cron_schedule="45 3 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Daily: delete finished runs older than KEYSTONE_DAGSTER_RUN_RETENTION_DAYS.",
)
