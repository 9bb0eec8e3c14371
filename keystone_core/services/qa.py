"""Episode QA in the database: claims with leases, results, retries and reruns.

A worker (the ``qa_batch`` Dagster run, a rerun, a backfill) claims ``pending_qa``
episodes — ``SELECT … FOR UPDATE SKIP LOCKED`` on MariaDB, so overlapping runs never take
the same row — and moves them to ``qa_running`` under a lease naming the run. It scores
them outside any transaction, then records each result only if it still holds that lease:
a run that outlived its lease (and whose episodes were released and claimed again) can
neither overwrite the newer result nor count an approval twice. A crashed run's episodes
return to ``pending_qa`` when the lease expires (``release_expired_qa_leases``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, update
from sqlmodel import Session, col, func, select

from keystone_core import clock, metrics
from keystone_core.errors import NotFoundError, TransitionConflict
from keystone_core.models import (
    Episode,
    EpisodeStatus,
    Order,
    QAResult,
    QATier,
    Robot,
    RobotType,
    SyncTarget,
    Task,
)
from keystone_core.qa.checks import Check, Expectations, QAConfig
from keystone_core.qa.inventory import Limits
from keystone_core.qa.run import AUTO, THOROUGH, Report, assess
from keystone_core.qa.source import S3Source, SourceError
from keystone_core.request_context import current_request_id
from keystone_core.services import previews
from keystone_core.services.audit import Actor
from keystone_core.services.outbox import EventType, emit_episode_event
from keystone_core.services.production import APPROVED, record_approval
from keystone_core.services.sync import target_of as sync_target_of
from keystone_core.settings import Settings
from keystone_core.states import transition_episode

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

RESULT_STATES = frozenset(
    {
        EpisodeStatus.AUTO_APPROVED,
        EpisodeStatus.NEEDS_INSPECTION,
        EpisodeStatus.QA_FAILED,
        EpisodeStatus.INSPECTOR_APPROVED,
        EpisodeStatus.REJECTED,
    }
)
TIERS = frozenset({"fast", THOROUGH, AUTO})


@dataclass(frozen=True)
class QAJob:
    """One claimed episode, with everything scoring needs (no session required)."""

    id: int
    episode_id: str
    factory_id: int
    recording_date: dt.date
    bucket: str
    key: str
    size: int | None
    tier: str
    expectations: Expectations
    config: QAConfig


def config_for(settings: Settings, robot_type: RobotType | None = None) -> QAConfig:
    base = QAConfig(
        threshold=settings.qa_auto_approve_threshold,
        thorough_band=settings.qa_thorough_band,
        min_duration_s=settings.qa_min_duration_s,
        max_gap_s=settings.qa_max_gap_s,
    )
    return (
        base.with_overrides(robot_type.qa_config) if robot_type and robot_type.qa_config else base
    )


def backlog(session: Session) -> int:
    """Episodes a claim could take now."""
    now = clock.now()
    return int(
        session.exec(
            select(func.count()).where(
                Episode.status == EpisodeStatus.PENDING_QA,
                or_(col(Episode.qa_not_before).is_(None), col(Episode.qa_not_before) <= now),
            )
        ).one()
    )


def waiting_request_ids(session: Session, limit: int) -> list[str | None]:
    """``qa_request_id`` of the first ``limit`` waiting episodes in the order :func:`claim`
    takes them (None where no request asked): what the sensor tags each run with."""
    now = clock.now()
    return list(
        session.exec(
            select(Episode.qa_request_id)
            .where(
                Episode.status == EpisodeStatus.PENDING_QA,
                or_(col(Episode.qa_not_before).is_(None), col(Episode.qa_not_before) <= now),
            )
            .order_by(col(Episode.id))
            .limit(limit)
        ).all()
    )


def claim(
    session: Session,
    settings: Settings,
    *,
    owner: str,
    limit: int,
    lease: dt.timedelta,
    episode_ids: Iterable[int] | None = None,
) -> list[QAJob]:
    """Lease up to ``limit`` waiting episodes to ``owner`` (``pending_qa → qa_running``)."""
    now = clock.now()
    query = (
        select(Episode)
        .where(
            Episode.status == EpisodeStatus.PENDING_QA,
            or_(col(Episode.qa_not_before).is_(None), col(Episode.qa_not_before) <= now),
        )
        .order_by(col(Episode.id))
        .limit(limit)
    )
    if episode_ids is not None:
        query = query.where(col(Episode.id).in_(list(episode_ids)))
    if session.get_bind().dialect.name in {"mysql", "mariadb"}:
        query = query.with_for_update(skip_locked=True)
    episodes = list(session.exec(query).all())
    if not episodes:
        return []
    ids = [e.id for e in episodes]
    session.execute(
        update(Episode)
        .where(col(Episode.id).in_(ids), col(Episode.status) == EpisodeStatus.PENDING_QA)
        .values(
            status=EpisodeStatus.QA_RUNNING.value,
            qa_lease_owner=owner,
            qa_lease_expires_at=now + lease,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return _jobs(session, settings, episodes)


def _jobs(session: Session, settings: Settings, episodes: list[Episode]) -> list[QAJob]:
    tasks = {
        t.id: t
        for t in session.exec(select(Task).where(col(Task.id).in_([e.task_id for e in episodes])))
    }
    robot_ids = {e.robot_id for e in episodes if e.robot_id is not None}
    types: dict[int, RobotType] = {}
    if robot_ids:
        rows = session.exec(
            select(Robot.id, RobotType)
            .join(RobotType, col(RobotType.id) == col(Robot.robot_type_id))
            .where(col(Robot.id).in_(robot_ids))
        ).all()
        types = {int(robot_id): robot_type for robot_id, robot_type in rows if robot_id}
    jobs = []
    for episode in episodes:
        assert episode.id is not None
        task = tasks.get(episode.task_id)
        robot_type = types.get(episode.robot_id) if episode.robot_id is not None else None
        expectations = Expectations(
            task_id=task.task_id if task else None,
            device_id=episode.device_id,
            required_topics=tuple(robot_type.ros_topics) if robot_type else (),
            min_duration_s=task.min_duration_s if task else None,
            max_duration_s=task.max_duration_s if task else None,
            checksum_sha256=episode.checksum,
        )
        jobs.append(
            QAJob(
                id=episode.id,
                episode_id=episode.episode_id,
                factory_id=episode.factory_id,
                recording_date=episode.recording_date,
                bucket=episode.bucket,
                key=episode.mcap_path,
                size=episode.file_size_bytes,
                tier=episode.qa_tier or AUTO,
                expectations=expectations,
                config=config_for(settings, robot_type),
            )
        )
    return jobs


def _holds(session: Session, episode_id: int, owner: str) -> Episode | None:
    """The episode, row-locked, if ``owner`` still holds its QA lease."""
    episode = session.exec(
        select(Episode).where(col(Episode.id) == episode_id).with_for_update()
    ).one_or_none()
    if episode is None or episode.status != EpisodeStatus.QA_RUNNING:
        return None
    return episode if episode.qa_lease_owner == owner else None


def record(
    session: Session,
    episode_id: int,
    report: Report,
    *,
    owner: str,
    run_id: str | None = None,
    started_at: dt.datetime | None = None,
    sync_target: SyncTarget | None,
    preview: dict[str, Any] | None = None,
) -> bool:
    """Store a result and move the episode to its verdict (an approval queues its cloud
    sync to ``sync_target`` in the same transaction; every verdict writes its outbox
    event: ``episode.approved``, ``.needs_inspection``, ``.qa_failed``). False when the
    lease was lost (the result is discarded: a newer run owns the episode). ``preview``:
    what ``publish_previews`` stored, kept as ``episode.meta["preview"]``."""
    episode = _holds(session, episode_id, owner)
    if episode is None:
        return False
    now = clock.now()
    verdict = EpisodeStatus(report.verdict)
    session.add(
        QAResult(
            episode_id=episode_id,
            tier=QATier.THOROUGH if report.tier == THOROUGH else QATier.FAST,
            score=report.score,
            hard_failure=report.hard_failure,
            verdict=verdict,
            checks=[_plain(c) for c in report.checks],
            run_id=run_id,
            started_at=started_at or now,
            finished_at=now,
        )
    )
    values: dict[str, Any] = {
        "qa_score": report.score,
        "qa_lease_owner": None,
        "qa_lease_expires_at": None,
        "qa_tier": None,
        "qa_attempts": 0,
        "qa_not_before": None,
        "quality_flag": "; ".join(c.name for c in report.failing())[:1024],
    }
    if verdict == EpisodeStatus.AUTO_APPROVED:
        values["approved_at"] = now
    if preview is not None:  # the column of ``Episode.meta`` is named "metadata"
        values["metadata"] = {**(episode.meta or {}), "preview": preview}
    transition_episode(
        session, episode_id, verdict, expected={EpisodeStatus.QA_RUNNING}, values=values
    )
    # The request that asked for this QA run (a rerun), if any, caused the event.
    cause = episode.qa_request_id
    if verdict == EpisodeStatus.AUTO_APPROVED:
        record_approval(
            session,
            episode_id,
            sync_target=sync_target,
            details=_verdict(report),
            request_id=cause,
        )
    elif verdict in VERDICT_EVENTS:
        emit_episode_event(
            session, VERDICT_EVENTS[verdict], episode_id, request_id=cause, **_verdict(report)
        )
    return True


# The outbox event of each QA verdict (an approval's comes from record_approval).
VERDICT_EVENTS = {
    EpisodeStatus.NEEDS_INSPECTION: EventType.EPISODE_NEEDS_INSPECTION,
    EpisodeStatus.QA_FAILED: EventType.EPISODE_QA_FAILED,
}


def _verdict(report: Report) -> dict[str, Any]:
    """What an event says about a QA result: tier, hard failure, the failing checks' names."""
    return {
        "qa_tier": report.tier,
        "hard_failure": report.hard_failure,
        "failing_checks": [c.name for c in report.failing()][:20],
    }


def _plain(check: Check) -> dict[str, Any]:
    out = check.as_dict()
    for key in ("value", "threshold"):  # JSON columns: tuples and sets become lists
        if isinstance(out[key], tuple | set):
            out[key] = list(out[key])
    return out


def record_unreadable_object(
    session: Session,
    settings: Settings,
    episode_id: int,
    reason: str,
    *,
    owner: str,
    run_id: str | None = None,
) -> str:
    """The object could not be fetched (missing, store down): back to ``pending_qa`` after
    a backoff, or ``qa_failed`` once ``qa_max_attempts`` runs failed. Returns the outcome
    (``retry`` | ``qa_failed`` | ``lost_lease``)."""
    episode = _holds(session, episode_id, owner)
    if episode is None:
        return "lost_lease"
    attempts = episode.qa_attempts + 1
    lease = {"qa_lease_owner": None, "qa_lease_expires_at": None, "qa_attempts": attempts}
    if attempts < settings.qa_max_attempts:
        delay = dt.timedelta(seconds=min(3600, 30 * 2 ** (attempts - 1)))
        transition_episode(
            session,
            episode_id,
            EpisodeStatus.PENDING_QA,
            expected={EpisodeStatus.QA_RUNNING},
            values={**lease, "qa_not_before": clock.now() + delay},
        )
        return "retry"
    check = Check(
        "object", False, "unavailable", "readable", reason, weight=0.0, cap=0.0, fatal=True
    )
    now = clock.now()
    session.add(
        QAResult(
            episode_id=episode_id,
            tier=QATier.FAST,
            score=0.0,
            hard_failure=True,
            verdict=EpisodeStatus.QA_FAILED,
            checks=[_plain(check)],
            run_id=run_id,
            started_at=now,
            finished_at=now,
        )
    )
    transition_episode(
        session,
        episode_id,
        EpisodeStatus.QA_FAILED,
        expected={EpisodeStatus.QA_RUNNING},
        values={**lease, "qa_score": 0.0, "quality_flag": "object"},
    )
    emit_episode_event(
        session,
        EventType.EPISODE_QA_FAILED,
        episode_id,
        request_id=episode.qa_request_id,
        qa_tier="fast",
        hard_failure=True,
        failing_checks=["object"],
        reason=reason[:500],
    )
    return "qa_failed"


def requeue(
    session: Session,
    episode_ids: Iterable[int],
    actor: Actor,
    *,
    tier: str | None = None,
    reason: str = "QA rerun",
) -> list[int]:
    """Send scored episodes back to ``pending_qa`` (audited); ids actually requeued.

    An approved episode leaves the order's ``approved_count`` until it is approved again.
    Episodes waiting or being scored already are left as they are. ``qa_request_id``
    becomes the request being served (None outside one): the sensor tags the run with it
    and the verdict's event names it."""
    if tier is not None and tier not in TIERS:
        raise ValueError(f"unknown QA tier {tier!r}")
    done: list[int] = []
    for episode_id in episode_ids:
        try:
            left = transition_episode(
                session,
                episode_id,
                EpisodeStatus.PENDING_QA,
                expected=RESULT_STATES,
                requeue=True,
                actor=actor,
                reason=reason,
                values={
                    "qa_tier": tier,
                    "qa_attempts": 0,
                    "qa_not_before": None,
                    "qa_request_id": current_request_id(),
                },
            )
        except TransitionConflict:
            continue
        if left in APPROVED:
            _uncount_approval(session, episode_id)
        done.append(episode_id)
    return done


def _uncount_approval(session: Session, episode_id: int) -> None:
    order_id = session.exec(select(Episode.order_id).where(col(Episode.id) == episode_id)).one()
    session.execute(
        update(Order)
        .where(col(Order.id) == order_id, col(Order.approved_count) > 0)
        .values(approved_count=col(Order.approved_count) - 1)
        .execution_options(synchronize_session=False)
    )


def request_tier(session: Session, episode_id: int, tier: str) -> None:
    """Ask for a tier on an episode that is already waiting (inside a request, that
    request becomes the one the run serves)."""
    if tier not in TIERS:
        raise ValueError(f"unknown QA tier {tier!r}")
    request_id = current_request_id()
    values: dict[str, Any] = {"qa_tier": tier}
    if request_id is not None:
        values["qa_request_id"] = request_id
    session.execute(
        update(Episode)
        .where(col(Episode.id) == episode_id, col(Episode.status) == EpisodeStatus.PENDING_QA)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def results(session: Session, episode_id: int) -> list[QAResult]:
    """QA results of an episode, newest first."""
    if session.get(Episode, episode_id) is None:
        raise NotFoundError(f"episode {episode_id} not found")
    return list(
        session.exec(
            select(QAResult)
            .where(col(QAResult.episode_id) == episode_id)
            .order_by(col(QAResult.id).desc())
        ).all()
    )


def episodes_for_partition(
    session: Session, factory_id: int, day: dt.date, *, limit: int = 100_000
) -> list[int]:
    """Ids of a factory's episodes recorded on ``day`` (a backfill partition)."""
    return [
        int(i)
        for i in session.exec(
            select(Episode.id)
            .where(Episode.factory_id == factory_id, Episode.recording_date == day)
            .order_by(col(Episode.id))
            .limit(limit)
        ).all()
        if i is not None
    ]


# --- scoring a claimed batch -----------------------------------------------------------------


def score_job(
    job: QAJob, s3: S3Client, settings: Settings, *, keep_inventory: bool = False
) -> Report:
    """Score one claimed episode from the object store (ranged reads; its sidecar too).
    Raises ``SourceError`` when the object cannot be fetched at all."""
    source = S3Source(s3, job.bucket, job.key, job.size)
    limits = Limits(seconds=settings.qa_time_budget_s)
    return assess(
        source,
        job.expectations,
        job.config,
        tier=job.tier,
        limits=limits,
        keep_inventory=keep_inventory,
    )


def preview_job(job: QAJob, report: Report, s3: S3Client, settings: Settings) -> dict[str, Any]:
    """Draw and store the previews of a scored episode (``score_job(keep_inventory=True)``);
    never raises (see ``keystone_core.services.previews``)."""
    return previews.publish_previews(
        s3,
        settings,
        factory_id=job.factory_id,
        episode_id=job.episode_id,
        bucket=job.bucket,
        key=job.key,
        report=report,
        expectations=job.expectations,
        config=job.config,
    )


@dataclass
class BatchOutcome:
    """What one batch did: counts per verdict, per-episode rows for run metadata."""

    claimed: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    lost_lease: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    # (factory_id, recording_date) → episode rows, for per-partition reporting.
    partitions: dict[tuple[int, dt.date], list[dict[str, Any]]] = field(default_factory=dict)

    def absorb(self, other: BatchOutcome) -> None:
        """Add another batch's counts and rows to this one."""
        self.claimed += other.claimed
        self.retried += other.retried
        self.lost_lease += other.lost_lease
        self.seconds += other.seconds
        self.bytes_read += other.bytes_read
        self.rows += other.rows
        for verdict, count in other.verdicts.items():
            self.verdicts[verdict] = self.verdicts.get(verdict, 0) + count
        for key, rows in other.partitions.items():
            self.partitions.setdefault(key, []).extend(rows)


def score_batch(
    jobs: list[QAJob],
    *,
    settings: Settings,
    s3: S3Client,
    session_scope: Callable[[], AbstractContextManager[Session]],
    owner: str,
    run_id: str | None = None,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> BatchOutcome:
    """Score claimed episodes ``workers`` at a time and record each result as it lands
    (one short transaction per episode, so a crash loses at most the ones in flight)."""
    outcome = BatchOutcome(claimed=len(jobs))
    started = time.monotonic()

    def work(job: QAJob) -> tuple[QAJob, Report | None, str, dt.datetime, dict[str, Any] | None]:
        begun = clock.now()
        try:
            report = score_job(job, s3, settings, keep_inventory=previews.wanted(settings))
        except SourceError as exc:
            return job, None, str(exc), begun, None
        # After the verdict, before any transaction: previews for the doubtful ones.
        preview = None
        if previews.wanted(settings, report.verdict):
            preview = preview_job(job, report, s3, settings)
        report.inventory = None  # the batch keeps results, not what was read
        return job, report, "", begun, preview

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for job, report, error, begun, preview in pool.map(work, jobs):
            with session_scope() as session:
                if report is None:
                    result = record_unreadable_object(
                        session, settings, job.id, error, owner=owner, run_id=run_id
                    )
                    verdict = "qa_failed" if result == "qa_failed" else result
                    if result == "retry":
                        outcome.retried += 1
                    elif result == "lost_lease":
                        outcome.lost_lease += 1
                    row = {
                        "episode": job.episode_id,
                        "verdict": verdict,
                        "score": 0.0,
                        "failing": ["object"],
                        "reason": error[:200],
                    }
                else:
                    if not record(
                        session,
                        job.id,
                        report,
                        owner=owner,
                        run_id=run_id,
                        started_at=begun,
                        sync_target=sync_target_of(settings),
                        preview=preview,
                    ):
                        outcome.lost_lease += 1
                        continue
                    verdict = report.verdict
                    outcome.bytes_read += int(report.stats.get("bytes_read", 0))
                    failing = report.failing()
                    row = {
                        "episode": job.episode_id,
                        "verdict": verdict,
                        "score": report.score,
                        "tier": report.tier,
                        "failing": [c.name for c in failing],
                        "reason": failing[0].reason[:200] if failing else "",
                    }
                    if preview is not None:
                        row["preview"] = {"bucket": job.bucket, **preview}
            if verdict not in ("retry", "lost_lease"):
                outcome.verdicts[verdict] = outcome.verdicts.get(verdict, 0) + 1
                seconds = (clock.now() - begun).total_seconds()
                metrics.observe_qa_result(verdict, str(row.get("tier", "fast")), seconds)
            outcome.rows.append(row)
            outcome.partitions.setdefault((job.factory_id, job.recording_date), []).append(row)
            if log and verdict != "auto_approved":  # the approved ones are in the summary
                log(f"{job.episode_id} {verdict} {row['score']:.3f} {row['reason']}")
    outcome.seconds = time.monotonic() - started
    return outcome
