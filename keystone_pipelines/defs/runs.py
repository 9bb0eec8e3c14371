"""What the sensors and schedules ask Dagster about runs."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import math

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
)

NOT_FINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def runs_in_flight(instance: DagsterInstance, job_name: str) -> int:
    """Runs of ``job_name`` queued or running (a sensor sizes what it launches by this)."""
    return instance.get_runs_count(RunsFilter(job_name=job_name, statuses=NOT_FINISHED))


def batch_run_requests(
    context: SensorEvaluationContext,
    *,
    job_name: str,
    op_name: str,
    waiting: int,
    size: int,
    max_runs: int,
    tags: dict[str, str],
) -> SensorResult | SkipReason:
    """One run per ``size`` waiting items — never one per item — up to ``max_runs`` in
    flight; each run's op gets ``batch_size`` and claims its work itself."""
    wanted = min(max_runs, math.ceil(waiting / size)) - runs_in_flight(context.instance, job_name)
    if wanted <= 0:
        return SkipReason(f"{waiting} waiting; {max_runs} {job_name} run(s) in flight")
    tick = int(context.cursor or 0) + 1
    context.update_cursor(str(tick))
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"{job_name}-{tick}-{i}",
                run_config={"ops": {op_name: {"config": {"batch_size": size}}}},
                tags=tags,
            )
            for i in range(wanted)
        ]
    )
