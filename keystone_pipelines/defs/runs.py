"""What the sensors and schedules ask Dagster about runs."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

NOT_FINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def runs_in_flight(instance: DagsterInstance, job_name: str) -> int:
    """Runs of ``job_name`` queued or running (a sensor sizes what it launches by this)."""
    return instance.get_runs_count(RunsFilter(job_name=job_name, statuses=NOT_FINISHED))
