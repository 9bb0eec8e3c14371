"""Cloud sync in Dagster: the due-sync sensor, batch runs, resyncs and the partitioned asset.

* ``due_sync_sensor`` looks at the database only: it recovers jobs whose run died (lease
  expired → ``retry_wait``) and, while jobs are due, launches ``sync_batch`` runs — one per
  batch, up to the sync pool's limit (dagster.yaml) in flight. ``sync_safety_schedule``
  launches one every five minutes if due jobs wait and nothing runs (a sensor that was
  turned off, a daemon restart).
* ``sync_batch``'s op claims its jobs itself (``FOR UPDATE SKIP LOCKED``, a lease naming
  the run) and pushes them ``KEYSTONE_SYNC_WORKERS`` at a time through the configured
  target. A push that fails for a retryable reason puts its job in ``retry_wait`` with
  ``next_attempt_at = now + min(30 s, base·2ⁿ⁻¹)·jitter``; when that is due within 30 s the
  op asks Dagster to retry it in the same run (``RetryRequested``, at most
  ``IN_RUN_RETRIES`` times) — later retries are the sensor's. Unexpected errors (the
  database dropping between an upload and its status write) are retried by the op's
  ``RetryPolicy``; a retried op first takes back the jobs its run still holds.
* ``edge_retention`` (daily schedule, only when ``KEYSTONE_EDGE_RETENTION_DAYS`` is set;
  dry run by default when launched by hand) expires edge copies after a verified sync.
* ``resync`` pushes chosen episodes again; ``cloud_sync`` is the daily x factory asset:
  materializing a partition (or backfilling a date range) queues that day's approved
  episodes that are not synced (optionally resyncs synced ones) and pushes them.
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

from datetime import date
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetMaterialization,
    Backoff,
    Config,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Jitter,
    MaterializeResult,
    MetadataValue,
    MultiPartitionKey,
    OpExecutionContext,
    Output,
    RetryPolicy,
    RetryRequested,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    job,
    op,
    schedule,
)
from dagster import sensor as dagster_sensor
from sqlmodel import col, select

from keystone_core import clock
from keystone_core.errors import KeystoneError
from keystone_core.models import Episode, Factory, SyncJob
from keystone_core.services import retention
from keystone_core.services import sync as sync_service
from keystone_core.services.audit import Actor
from keystone_core.services.scope import Scope
from keystone_core.sync.targets import build_target
from keystone_pipelines.defs.qa import qa_partitions
from keystone_pipelines.defs.runs import (
    batch_run_requests,
    logged_in_run,
    pool_limit,
    runs_in_flight,
)
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

POOL_TAGS = {"keystone/pool": "sync", "keystone/kind": "sync"}
# Runs in flight when the instance sets no limit for keystone/pool=sync (dagster.yaml: 2).
MAX_SYNC_RUNS = 2
IN_RUN_RETRIES = 2
IN_RUN_WAIT_MAX_S = 30.0
OP_RETRY = RetryPolicy(
    max_retries=3, delay=2, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS
)


def _run_metadata(outcome: sync_service.SyncOutcome, target: dict[str, Any]) -> dict[str, Any]:
    rows = outcome.rows[:200]
    table = "| episode | attempt | status | MB | error |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {r['episode']} | {r['attempt']} | {r['status']} | {r.get('mb', '')} | "
        f"{str(r.get('error', '')).replace('|', '/')[:120]} |"
        for r in rows
    )
    return {
        "target": MetadataValue.json(target),
        "claimed": outcome.claimed,
        "synced": outcome.synced,
        "already_synced": outcome.duplicates,
        "retry_wait": outcome.retry,
        "failed": outcome.failed,
        "lost_lease": outcome.lost_lease,
        "mb_sent": round(outcome.bytes_sent / 1e6, 1),
        "mb_per_s": round(outcome.mb_per_s, 1),
        "episodes": MetadataValue.md(table),
    }


def _log_partitions(
    context: OpExecutionContext | AssetExecutionContext,
    database: KeystoneDatabase,
    outcome: sync_service.SyncOutcome,
) -> None:
    """One ``cloud_sync`` materialization per day x factory whose episodes were synced."""
    done = [r["episode"] for r in outcome.rows if r["status"] in ("synced", "duplicate")]
    if not done:
        return
    with database.session() as session:
        rows = session.exec(
            select(Episode, Factory)
            .join(Factory, col(Factory.id) == col(Episode.factory_id))
            .where(col(Episode.episode_id).in_(done))
        ).all()
    counts: dict[tuple[date, str], int] = {}
    for episode, factory in rows:
        key = (episode.recording_date, factory.slug)
        counts[key] = counts.get(key, 0) + 1
    known = set(context.instance.get_dynamic_partitions("factories"))
    new = sorted({slug for _, slug in counts} - known)
    if new:
        context.instance.add_dynamic_partitions("factories", new)
    for (day, slug), count in sorted(counts.items()):
        context.log_event(
            AssetMaterialization(
                asset_key="cloud_sync",
                partition=MultiPartitionKey({"date": day.isoformat(), "factory": slug}),
                description=f"{count} episode(s) synced by run {context.run.run_id}",
                metadata={"synced": count},
            )
        )


@logged_in_run
def _claim_and_push(
    context: OpExecutionContext | AssetExecutionContext,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
    *,
    limit: int,
    job_ids: list[int] | None = None,
) -> tuple[sync_service.SyncOutcome, dict[str, Any]]:
    settings = database.settings
    with database.session() as session:
        works = sync_service.claim(
            session,
            settings,
            owner=context.run.run_id,
            limit=limit,
            run_id=context.run.run_id,
            job_ids=job_ids,
        )
    context.log.info("claimed %d sync job(s) (limit %d)", len(works), limit)
    target = build_target(settings)
    try:
        outcome = sync_service.push_batch(
            works,
            settings=settings,
            target=target,
            source=object_store.client,
            session_scope=database.session,
            owner=context.run.run_id,
            workers=settings.sync_workers,
            log=context.log.warning,
        )
    finally:
        target.close()
    context.log.info(
        "synced %d, already there %d, retry %d, failed %d, %.1f MB at %.1f MB/s",
        outcome.synced,
        outcome.duplicates,
        outcome.retry,
        outcome.failed,
        outcome.bytes_sent / 1e6,
        outcome.mb_per_s,
    )
    _log_partitions(context, database, outcome)
    return outcome, target.describe()


def _retry_soon(context: OpExecutionContext, outcome: sync_service.SyncOutcome) -> None:
    """Ask Dagster to run the op again when jobs it put back are due within 30 s."""
    if outcome.next_retry_at is None or context.retry_number >= IN_RUN_RETRIES:
        return
    wait = (outcome.next_retry_at - clock.now()).total_seconds()
    if wait <= IN_RUN_WAIT_MAX_S:
        raise RetryRequested(max_retries=IN_RUN_RETRIES, seconds_to_wait=max(0.5, wait))


class SyncBatchConfig(Config):
    # 0: KEYSTONE_SYNC_BATCH_MAX.
    batch_size: int = 0


@op(
    description="Claim due sync jobs (lease), push them to the cloud target, record outcomes.",
    tags={"keystone/pool": "sync"},
    retry_policy=OP_RETRY,
)
def push_due_episodes(
    context: OpExecutionContext,
    config: SyncBatchConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> Output[int]:
    limit = config.batch_size or database.settings.sync_batch_max
    outcome, target = _claim_and_push(context, database, object_store, limit=limit)
    _retry_soon(context, outcome)
    return Output(outcome.synced + outcome.duplicates, metadata=_run_metadata(outcome, target))


@job(description="Push one batch of due sync jobs to the cloud.", tags=POOL_TAGS)
def sync_batch() -> None:
    push_due_episodes()


class ResyncConfig(Config):
    episode_ids: list[int]
    reason: str = "resync from Dagster"


@op(
    description="Queue the given approved episodes again (failed → retry, synced → resync) "
    "and push them now.",
    retry_policy=OP_RETRY,
)
def resync_episodes(
    context: OpExecutionContext,
    config: ResyncConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> Output[int]:
    settings = database.settings
    actor = Actor.system("dagster", request_id=context.run.run_id)
    job_ids: list[int] = []
    refused: list[dict[str, Any]] = []
    if context.retry_number == 0:
        for episode_pk in config.episode_ids:
            with database.session() as session:
                try:
                    queued = sync_service.resync(
                        session,
                        Scope.everything(),
                        settings,
                        episode_pk,
                        actor=actor,
                        reason=config.reason,
                    )
                except KeystoneError as exc:
                    refused.append({"episode": episode_pk, "code": exc.code, "reason": str(exc)})
                    continue
                assert queued.id is not None
                job_ids.append(queued.id)
        for row in refused:
            context.log.warning("not queued: %s", row)
    else:  # a retried op: push whatever of the selection is still due
        with database.session() as session:
            job_ids = [
                int(i)
                for i in session.exec(
                    select(SyncJob.id).where(col(SyncJob.episode_id).in_(config.episode_ids))
                ).all()
                if i is not None
            ]
    outcome, target = _claim_and_push(
        context, database, object_store, limit=max(1, len(job_ids)), job_ids=job_ids
    )
    metadata = _run_metadata(outcome, target)
    metadata["not_queued"] = MetadataValue.json(refused)
    return Output(outcome.synced + outcome.duplicates, metadata=metadata)


@job(description="Resync chosen episodes (ids) now.", tags=POOL_TAGS)
def resync() -> None:
    resync_episodes()


class CloudSyncConfig(Config):
    resync_synced: bool = False


@asset(
    partitions_def=qa_partitions,
    deps=["episode_qa"],
    description=(
        "Cloud copies of one factory's approved episodes of one day. Materializing a "
        "partition (or backfilling dates) queues those not yet synced — failed ones "
        "included, synced ones too with resync_synced — and pushes them."
    ),
    tags={"keystone/pool": "sync"},
    group_name="sync",
)
def cloud_sync(
    context: AssetExecutionContext,
    config: CloudSyncConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> MaterializeResult:  # type: ignore[type-arg]
    keys = context.partition_key.keys_by_dimension
    day = date.fromisoformat(keys["date"])
    slug = keys["factory"]
    settings = database.settings
    with database.session() as session:
        factory_id = session.exec(select(Factory.id).where(Factory.slug == slug)).first()
        if factory_id is None:
            raise ValueError(f"no factory with slug {slug!r}")
        queued = sync_service.enqueue_matching(
            session,
            Scope.everything(),
            settings,
            sync_service.EnqueueFilter(
                factory_ids=frozenset({factory_id}),
                date_from=day,
                date_to=day,
                include_synced=config.resync_synced,
                limit=100_000,
            ),
            actor=Actor.system("dagster", request_id=context.run.run_id),
            reason=f"cloud_sync backfill {slug} {day}",
        )
    total = sync_service.SyncOutcome()
    remaining = list(queued.job_ids) + list(queued.waiting_ids)
    target: dict[str, Any] = {}
    while remaining:
        chunk, remaining = (
            remaining[: settings.sync_batch_max],
            remaining[settings.sync_batch_max :],
        )
        outcome, target = _claim_and_push(
            context, database, object_store, limit=len(chunk), job_ids=chunk
        )
        total.absorb(outcome)
    metadata = _run_metadata(total, target)
    metadata |= {
        "approved_in_partition": queued.matched,
        "queued": queued.queued,
        "requeued": queued.requeued,
        "already_queued_or_synced": queued.skipped,
    }
    return MaterializeResult(metadata=metadata)


def _recover_and_count_due(
    context: SensorEvaluationContext | ScheduleEvaluationContext, database: KeystoneDatabase
) -> int | SkipReason:
    """Return expired leases to retry_wait; how many jobs are due (or why nothing is)."""
    settings = database.settings
    if settings.sync_target == "off":
        return SkipReason("cloud sync is off (KEYSTONE_SYNC_TARGET=off)")
    with database.session() as session:
        recovered = sync_service.recover_expired(session, settings)
        due = sync_service.due_count(session)
    if recovered:
        context.log.info("recovered %d sync job(s) whose lease expired", recovered)
    return due or SkipReason("no sync job is due")


@dagster_sensor(
    job=sync_batch,
    minimum_interval_seconds=10,
    default_status=DefaultSensorStatus.RUNNING,
    description="Recover expired sync leases; launch sync_batch runs while sync jobs are due.",
)
def due_sync_sensor(
    context: SensorEvaluationContext, database: KeystoneDatabase
) -> SensorResult | SkipReason:
    due = _recover_and_count_due(context, database)
    if isinstance(due, SkipReason):
        return due
    settings = database.settings
    target = sync_service.target_of(settings)
    assert target is not None  # sync off was a SkipReason
    runs = pool_limit(context.instance, "sync", MAX_SYNC_RUNS)
    with database.session() as session:
        request_ids = sync_service.due_request_ids(session, target, runs * settings.sync_batch_max)
    return batch_run_requests(
        context,
        job_name="sync_batch",
        op_name="push_due_episodes",
        waiting=due,
        size=settings.sync_batch_max,
        max_runs=runs,
        tags={**POOL_TAGS, "keystone/due": str(due)},
        request_ids=request_ids,
    )


@schedule(
    job=sync_batch,
    cron_schedule="*/5 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Safety net: a sync_batch run every 5 minutes if jobs are due and none runs.",
)
def sync_safety_schedule(
    context: ScheduleEvaluationContext, database: KeystoneDatabase
) -> RunRequest | SkipReason:
    due = _recover_and_count_due(context, database)
    if isinstance(due, SkipReason):
        return due
    if runs_in_flight(context.instance, "sync_batch"):
        return SkipReason("a sync_batch run is in flight")
    return RunRequest(tags={**POOL_TAGS, "keystone/due": str(due), "keystone/by": "schedule"})


class RetentionConfig(Config):
    dry_run: bool = True
    limit: int = 1000


@op(description="Expire edge objects of episodes synced longer ago than the retention period.")
def expire_edge_objects(
    context: OpExecutionContext,
    config: RetentionConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> Output[int]:
    report = retention.expire(
        database.session,
        object_store.client,
        database.settings,
        dry_run=config.dry_run,
        actor=Actor.system("dagster", request_id=context.run.run_id),
        limit=config.limit,
    )
    summary = report.as_dict()
    context.log.info(
        "%s: %d episode(s), %.1f MB %s",
        "dry run" if report.dry_run else "retention",
        len(report.candidates),
        report.candidate_bytes / 1e6,
        "would be freed" if report.dry_run else f"freed {report.bytes_freed / 1e6:.1f} MB",
    )
    return Output(
        report.expired,
        metadata={
            "dry_run": report.dry_run,
            "candidates": len(report.candidates),
            "candidate_mb": round(report.candidate_bytes / 1e6, 1),
            "expired": report.expired,
            "errors": MetadataValue.json(report.errors),
            "report": MetadataValue.json(summary),
        },
    )


@job(description="Edge retention (dry run by default; the daily schedule applies it).")
def edge_retention() -> None:
    expire_edge_objects()


@schedule(
    job=edge_retention,
    cron_schedule="30 3 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Daily: expire edge copies synced longer ago than KEYSTONE_EDGE_RETENTION_DAYS.",
)
def edge_retention_schedule(
    context: ScheduleEvaluationContext, database: KeystoneDatabase
) -> RunRequest | SkipReason:
    if database.settings.edge_retention_days is None:
        return SkipReason("edge retention is off (KEYSTONE_EDGE_RETENTION_DAYS is empty)")
    return RunRequest(
        run_config={"ops": {"expire_edge_objects": {"config": {"dry_run": False}}}},
        tags={"keystone/kind": "retention"},
    )
