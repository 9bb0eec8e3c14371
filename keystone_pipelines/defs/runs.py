"""What the sensors and schedules ask Dagster about runs, the request ids a run is tagged
with, and how Keystone's own log lines inside a run name the run and those requests."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Concatenate, ParamSpec, TypeVar

from dagster import (
    AssetExecutionContext,
    DagsterInstance,
    DagsterRunStatus,
    OpExecutionContext,
    QueuedRunCoordinator,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
)

from keystone_core.logs import configure_keystone_loggers, run_log_fields
from keystone_core.settings import Settings
from keystone_pipelines.resources import KeystoneDatabase

# The API request(s) whose queued rows a run picks up (comma-separated, distinct).
REQUEST_ID_TAG = "keystone/request_id"
# Dagster's limit for strict tag values (and the 64-character index prefix on run tags).
REQUEST_ID_TAG_MAX = 63

NOT_FINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


def runs_in_flight(instance: DagsterInstance, job_name: str) -> int:
    """Runs of ``job_name`` queued or running (a sensor sizes what it launches by this)."""
    return instance.get_runs_count(RunsFilter(job_name=job_name, statuses=NOT_FINISHED))


def pool_limit(instance: DagsterInstance, pool: str, default: int) -> int:
    """Runs of ``keystone/pool=<pool>`` the instance's run queue lets run at once.

    Read from dagster.yaml's ``tag_concurrency_limits`` (and never above
    ``max_concurrent_runs``), so resizing a pool for a bigger host is one edit there and
    the sensors launch that many runs; ``default`` where the instance has no run queue
    (tests, ``execute_in_process``) or no limit for the pool."""
    coordinator = instance.run_coordinator
    if not isinstance(coordinator, QueuedRunCoordinator):
        return default
    config = coordinator.get_run_queue_config()
    limits = [
        int(entry["limit"])
        for entry in config.tag_concurrency_limits
        if entry.get("key") == "keystone/pool" and entry.get("value") == pool
    ]
    limit = min(limits) if limits else default
    if config.max_concurrent_runs >= 0:  # -1: unlimited
        limit = min(limit, config.max_concurrent_runs)
    return max(1, limit)


def request_id_tag(request_ids: Iterable[str | None]) -> dict[str, str]:
    """``{REQUEST_ID_TAG: "id1,id2"}``: the distinct ids in order, as many whole ids as fit
    in ``REQUEST_ID_TAG_MAX`` characters (the first always, cut if it alone is longer);
    ``{}`` when no request asked for any of the work."""
    distinct = list(dict.fromkeys(i for i in request_ids if i))
    if not distinct:
        return {}
    value = distinct[0][:REQUEST_ID_TAG_MAX]
    for request_id in distinct[1:]:
        if len(value) + 1 + len(request_id) > REQUEST_ID_TAG_MAX:
            break
        value += "," + request_id
    return {REQUEST_ID_TAG: value}


def batch_run_requests(
    context: SensorEvaluationContext,
    *,
    job_name: str,
    op_name: str,
    waiting: int,
    size: int,
    max_runs: int,
    tags: dict[str, str],
    request_ids: Sequence[str | None] = (),
) -> SensorResult | SkipReason:
    """One run per ``size`` waiting items — never one per item — up to ``max_runs`` in
    flight; each run's op gets ``batch_size`` and claims its work itself.

    ``request_ids``: the waiting rows' request ids in claim order; run ``i`` is tagged
    with those of rows ``i·size …`` (the rows it will take unless another run is faster)."""
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
                tags={**tags, **request_id_tag(request_ids[i * size : (i + 1) * size])},
            )
            for i in range(wanted)
        ]
    )


@contextmanager
def run_logging(
    context: OpExecutionContext | AssetExecutionContext, settings: Settings
) -> Iterator[None]:
    """Keystone's loggers write to this run's captured stderr, every line carrying the
    run id and the run's ``keystone/request_id`` tag (threads of the run included)."""
    configure_keystone_loggers(settings)
    with run_log_fields(run_id=context.run.run_id, request_id=context.run.tags.get(REQUEST_ID_TAG)):
        yield


RunContext = OpExecutionContext | AssetExecutionContext
P = ParamSpec("P")
R = TypeVar("R")


def logged_in_run(
    work: Callable[Concatenate[RunContext, KeystoneDatabase, P], R],
) -> Callable[Concatenate[RunContext, KeystoneDatabase, P], R]:
    """Run ``work(context, database, …)`` inside :func:`run_logging`."""

    @functools.wraps(work)
    def wrapper(
        context: RunContext, database: KeystoneDatabase, /, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        with run_logging(context, database.settings):
            return work(context, database, *args, **kwargs)

    return wrapper
