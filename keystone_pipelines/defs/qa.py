"""Episode QA in Dagster: the pending-QA sensor, batch runs, reruns and backfills.

* ``pending_qa_sensor`` looks at the database (never at the bucket): when episodes wait
  it launches ``qa_batch`` runs — one per batch, never one per episode (a run costs about
  2.5 CPU-seconds here) — up to the qa pool's limit (dagster.yaml) in flight, sized to the
  backlog.
* ``qa_batch``'s op claims its episodes itself (``SELECT … FOR UPDATE SKIP LOCKED`` and a
  lease), because a queued run can wait longer than any lease a sensor could take; it
  scores them ``KEYSTONE_QA_WORKERS`` at a time and records each result through
  ``keystone_core.services.qa``. Its run metadata lists every episode with score, verdict
  and failing checks, links the QA previews of the doubtful ones (presigned for an hour;
  the keys stay readable), and it logs a materialization of the ``episode_qa`` partition
  (day x factory) each episode belongs to.
* ``episode_qa`` is the daily x factory partitioned asset: materializing a partition (or
  backfilling a range from the UI) requeues that factory's episodes of that day and scores
  them again, with one asset check per check kind.
* ``qa_rerun`` re-scores chosen episodes (config: ids and tier); the API's
  ``POST /api/v1/qa/episodes/{id}/run`` requeues through the same service.
"""

# No `from __future__ import annotations` here: Dagster inspects op annotations at runtime.

import math
from datetime import date, timedelta
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetMaterialization,
    Config,
    DailyPartitionsDefinition,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    OpExecutionContext,
    Output,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset,
    job,
    op,
)
from dagster import sensor as dagster_sensor
from sqlmodel import col, select

from keystone_core.models import Factory
from keystone_core.services import qa as qa_service
from keystone_core.services.audit import Actor
from keystone_core.services.episode_links import presign_get
from keystone_core.services.episodes import release_expired_qa_leases
from keystone_core.settings import Settings
from keystone_core.storage import create_presign_client
from keystone_pipelines.defs.runs import batch_run_requests, logged_in_run, pool_limit
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

POOL_TAGS = {"keystone/pool": "qa", "keystone/kind": "qa"}
# Runs in flight when the instance sets no limit for keystone/pool=qa (dagster.yaml sets 2).
MAX_QA_RUNS = 2
CHECK_KINDS = (
    "structure",
    "required_topics",
    "duration",
    "message_gaps",
    "frame_sizes",
    "image_decode",
    "consistency",
    "checksum",
)
factories_partitions = DynamicPartitionsDefinition(name="factories")
qa_partitions = MultiPartitionsDefinition(
    {
        "date": DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1),
        "factory": factories_partitions,
    }
)


def batch_size(backlog: int, low: int, high: int, runs: int = MAX_QA_RUNS) -> int:
    """Adaptive: the backlog spread over the runs that may run at once, within bounds."""
    return max(low, min(high, math.ceil(backlog / max(1, runs))))


# Preview links in run metadata outlive the API's short ones: someone reads a run later.
PREVIEW_LINK_SECONDS = 3600
PREVIEW_FILES = {"contact_sheet": "contact sheet", "rate_timeline": "rate timeline"}


def _previews_table(rows: list[dict[str, Any]], settings: Settings) -> str | None:
    """Markdown: each previewed episode with links to its images and their keys."""
    previewed = [r for r in rows if r.get("preview")][:100]
    if not previewed:
        return None
    presigner = create_presign_client(settings)
    lines = [
        f"Links valid for {PREVIEW_LINK_SECONDS // 60} min; later: "
        "`GET /api/v1/episodes/{id}/presign?kind=contact_sheet|rate_timeline`.",
        "",
        "| episode | verdict | contact sheet | rate timeline | keys | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in previewed:
        preview = row["preview"]
        cells, keys = [], []
        for kind, label in PREVIEW_FILES.items():
            key = preview.get(kind)
            if not key:
                cells.append("—")
                continue
            url = presign_get(presigner, preview["bucket"], key, PREVIEW_LINK_SECONDS)
            cells.append(f"[{label}]({url})")
            keys.append(f"`s3://{preview['bucket']}/{key}`")
        notes = "; ".join(str(n) for n in preview.get("notes") or []).replace("|", "/")
        lines.append(
            f"| {row['episode']} | {row['verdict']} | {cells[0]} | {cells[1]} | "
            f"{' '.join(keys) or '—'} | {notes[:200] or '—'} |"
        )
    return "\n".join(lines)


def _run_metadata(outcome: qa_service.BatchOutcome, settings: Settings) -> dict[str, Any]:
    scores = [float(r["score"]) for r in outcome.rows if r.get("verdict") not in ("retry",)]
    rows = outcome.rows[:200]
    table = "| episode | verdict | score | failing checks |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['episode']} | {r['verdict']} | {float(r['score']):.3f} | "
        f"{', '.join(str(n) for n in r['failing']) or '—'} |"
        for r in rows
    )
    previewed = [r["preview"] for r in outcome.rows if r.get("preview")]
    metadata: dict[str, Any] = {
        "claimed": outcome.claimed,
        "auto_approved": outcome.verdicts.get("auto_approved", 0),
        "needs_inspection": outcome.verdicts.get("needs_inspection", 0),
        "qa_failed": outcome.verdicts.get("qa_failed", 0),
        "retry_later": outcome.retried,
        "lost_lease": outcome.lost_lease,
        "mean_score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        "episodes_per_min": round(len(outcome.rows) / outcome.seconds * 60, 1)
        if outcome.seconds
        else 0.0,
        "mib_read": round(outcome.bytes_read / 2**20, 2),
        "episodes": MetadataValue.md(table),
        "results": MetadataValue.json(rows),
        "previews": len(previewed),
        "preview_seconds_mean": round(
            sum(float(p.get("seconds") or 0) for p in previewed) / len(previewed), 3
        )
        if previewed
        else 0.0,
    }
    links = _previews_table(rows, settings)
    if links:
        metadata["preview_links"] = MetadataValue.md(links)
    return metadata


def _factory_slugs(database: KeystoneDatabase, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    with database.session() as session:
        rows = session.exec(select(Factory.id, Factory.slug).where(col(Factory.id).in_(ids))).all()
    return {int(i): slug for i, slug in rows if i is not None}


def _log_partitions(
    context: OpExecutionContext, database: KeystoneDatabase, outcome: qa_service.BatchOutcome
) -> None:
    """One ``episode_qa`` materialization per day x factory the batch touched."""
    slugs = _factory_slugs(database, {factory for factory, _ in outcome.partitions})
    new = sorted(set(slugs.values()) - set(context.instance.get_dynamic_partitions("factories")))
    if new:
        context.instance.add_dynamic_partitions("factories", new)
    for (factory_id, day), rows in sorted(outcome.partitions.items()):
        if factory_id not in slugs:
            continue
        failing = sorted({str(n) for r in rows for n in r["failing"]})
        links = _previews_table(rows, database.settings)
        context.log_event(
            AssetMaterialization(
                asset_key="episode_qa",
                partition=MultiPartitionKey(
                    {"date": day.isoformat(), "factory": slugs[factory_id]}
                ),
                description=f"{len(rows)} episode(s) scored by run {context.run.run_id}",
                metadata={
                    "scored": len(rows),
                    "auto_approved": sum(1 for r in rows if r["verdict"] == "auto_approved"),
                    "needs_inspection": sum(1 for r in rows if r["verdict"] == "needs_inspection"),
                    "qa_failed": sum(1 for r in rows if r["verdict"] == "qa_failed"),
                    "failing_checks": ", ".join(failing) or "none",
                    "results": MetadataValue.json(rows[:100]),
                    **({"preview_links": MetadataValue.md(links)} if links else {}),
                },
            )
        )


@logged_in_run
def _claim_and_score(
    context: OpExecutionContext | AssetExecutionContext,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
    *,
    limit: int,
    episode_ids: list[int] | None = None,
) -> qa_service.BatchOutcome:
    """Claim up to ``limit`` waiting episodes (of ``episode_ids`` when given) under this
    run's lease and score them ``KEYSTONE_QA_WORKERS`` at a time (Keystone's log lines
    name the run and its ``keystone/request_id``)."""
    settings = database.settings
    with database.session() as session:
        jobs = qa_service.claim(
            session,
            settings,
            owner=context.run.run_id,
            limit=limit,
            lease=timedelta(minutes=settings.qa_lease_minutes),
            episode_ids=episode_ids,
        )
    context.log.info("claimed %d episode(s) (limit %d)", len(jobs), limit)
    return qa_service.score_batch(
        jobs,
        settings=settings,
        s3=object_store.client,
        session_scope=database.session,
        owner=context.run.run_id,
        run_id=context.run.run_id,
        workers=settings.qa_workers,
        log=context.log.info,
    )


class QABatchConfig(Config):
    # 0: sized from the backlog (KEYSTONE_QA_BATCH_MIN … _MAX).
    batch_size: int = 0


@op(
    description="Claim waiting episodes (lease), score them in parallel, record the verdicts.",
    tags={"keystone/pool": "qa"},
)
def score_pending_episodes(
    context: OpExecutionContext,
    config: QABatchConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> Output[int]:
    settings = database.settings
    with database.session() as session:
        size = config.batch_size or batch_size(
            qa_service.backlog(session), settings.qa_batch_min, settings.qa_batch_max
        )
    outcome = _claim_and_score(context, database, object_store, limit=size)
    _log_partitions(context, database, outcome)
    return Output(len(outcome.rows), metadata=_run_metadata(outcome, settings))


@job(description="Score one batch of pending_qa episodes.", tags=POOL_TAGS)
def qa_batch() -> None:
    score_pending_episodes()


class QARerunConfig(Config):
    episode_ids: list[int]
    tier: str = "thorough"
    reason: str = "QA rerun from Dagster"


@op(description="Requeue the given episodes and score them now with the chosen tier.")
def rerun_episodes(
    context: OpExecutionContext,
    config: QARerunConfig,
    database: KeystoneDatabase,
    object_store: KeystoneObjectStore,
) -> Output[int]:
    actor = Actor.system("dagster", request_id=context.run.run_id)
    with database.session() as session:
        requeued = qa_service.requeue(
            session, config.episode_ids, actor, tier=config.tier, reason=config.reason
        )
        for episode_id in config.episode_ids:  # those that were waiting already
            qa_service.request_tier(session, episode_id, config.tier)
    context.log.info("requeued %d episode(s)", len(requeued))
    outcome = _claim_and_score(
        context,
        database,
        object_store,
        limit=len(config.episode_ids),
        episode_ids=config.episode_ids,
    )
    _log_partitions(context, database, outcome)
    return Output(len(outcome.rows), metadata=_run_metadata(outcome, database.settings))


@job(description="Re-score chosen episodes (thorough tier by default).", tags=POOL_TAGS)
def qa_rerun() -> None:
    rerun_episodes()


@asset(
    partitions_def=qa_partitions,
    description=(
        "QA verdicts of one factory's episodes of one day. Materializing a partition (or a "
        "backfill over dates) requeues those episodes and scores them again."
    ),
    check_specs=[AssetCheckSpec(name=kind, asset="episode_qa") for kind in CHECK_KINDS],
    tags={"keystone/pool": "qa"},
    group_name="quality",
)
def episode_qa(
    context: AssetExecutionContext,
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
        ids = qa_service.episodes_for_partition(session, factory_id, day)
        qa_service.requeue(
            session,
            ids,
            Actor.system("dagster", request_id=context.run.run_id),
            reason=f"episode_qa backfill {slug} {day}",
        )
    outcome = qa_service.BatchOutcome()
    remaining = list(ids)
    while remaining:
        chunk, remaining = remaining[: settings.qa_batch_max], remaining[settings.qa_batch_max :]
        outcome.absorb(
            _claim_and_score(context, database, object_store, limit=len(chunk), episode_ids=chunk)
        )
    checks = []
    for kind in CHECK_KINDS:
        failed = [r for r in outcome.rows if kind in r["failing"]]
        checks.append(
            AssetCheckResult(
                check_name=kind,
                passed=not failed,
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "failed_episodes": len(failed),
                    "of": len(outcome.rows),
                    "examples": MetadataValue.json(
                        [{"episode": r["episode"], "reason": r["reason"]} for r in failed[:20]]
                    ),
                },
            )
        )
    metadata = _run_metadata(outcome, settings)
    metadata["episodes_in_partition"] = len(ids)
    return MaterializeResult(metadata=metadata, check_results=checks)


@dagster_sensor(
    job=qa_batch,
    minimum_interval_seconds=10,
    default_status=DefaultSensorStatus.RUNNING,
    description="Launch qa_batch runs while episodes wait in pending_qa (one run per batch).",
)
def pending_qa_sensor(
    context: SensorEvaluationContext, database: KeystoneDatabase
) -> SensorResult | SkipReason:
    settings = database.settings
    with database.session() as session:
        released = release_expired_qa_leases(session)
        waiting = qa_service.backlog(session)
        runs = pool_limit(context.instance, "qa", MAX_QA_RUNS)
        size = batch_size(waiting, settings.qa_batch_min, settings.qa_batch_max, runs)
        request_ids = qa_service.waiting_request_ids(session, runs * size) if waiting else []
    if released:
        context.log.info(
            "returned %d episode(s) with expired QA leases to pending_qa", len(released)
        )
    if not waiting:
        return SkipReason("no episode waits for QA")
    return batch_run_requests(
        context,
        job_name="qa_batch",
        op_name="score_pending_episodes",
        waiting=waiting,
        size=size,
        max_runs=runs,
        tags={**POOL_TAGS, "keystone/waiting": str(waiting)},
        request_ids=request_ids,
    )
