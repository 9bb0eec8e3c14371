"""The cloud sync queue: one job row per approved episode and target, claimed under a lease.

An approval enqueues its job in the approval's own transaction (a transactional outbox:
there is no moment where an approved episode has no job). Runs claim due jobs with
``FOR UPDATE SKIP LOCKED`` and a lease naming the run, push them (``keystone_core.sync``)
and record the outcome only while they still hold the lease: ``synced`` on a verified
receipt, ``retry_wait`` with ``next_attempt_at = now + min(30 s, base·2ⁿ⁻¹)·jitter`` on a
retryable failure, ``failed`` (+ an ``alert.raised`` outbox event and an audit row) when
the attempt budget is spent or retrying cannot help. A job whose run died keeps its lease
until it expires; :func:`recover_expired` then returns it to ``retry_wait``. Every attempt
is a ``sync_attempts`` row (the job's log).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, or_, update
from sqlmodel import Session, col, func, select

from keystone_core import clock, metrics
from keystone_core.errors import ConflictError, NotFoundError
from keystone_core.models import (
    Episode,
    EpisodeStatus,
    Factory,
    QAResult,
    SyncAttempt,
    SyncJob,
    SyncStatus,
    SyncTarget,
    Task,
)
from keystone_core.request_context import current_request_id
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.outbox import EventType, emit
from keystone_core.services.scope import Scope
from keystone_core.states import transition_sync
from keystone_core.sync.targets import Receipt, Target
from keystone_core.sync.transfer import Shipment, SyncFailure, SyncObject, read_edge

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from keystone_core.settings import Settings

APPROVED = frozenset({EpisodeStatus.AUTO_APPROVED, EpisodeStatus.INSPECTOR_APPROVED})
WAITING = (SyncStatus.QUEUED, SyncStatus.RETRY_WAIT)
BACKOFF_CAP_S = 30.0
SessionScope = Callable[[], AbstractContextManager[Session]]


def target_of(settings: Settings) -> SyncTarget | None:
    """The configured target, or None when sync is off."""
    return None if settings.sync_target == "off" else SyncTarget(settings.sync_target)


def backoff_seconds(attempt: int, base: float, rng: random.Random | None = None) -> float:
    """Delay before retry after attempt ``attempt`` (1-based): ``min(30, base·2ⁿ⁻¹)``
    scaled by a jitter in [0.5, 1] so a burst of failures does not retry in lockstep."""
    ceiling = min(BACKOFF_CAP_S, base * 2 ** max(0, attempt - 1))
    draw: float = (rng or random).random()
    return float(ceiling * (0.5 + 0.5 * draw))


# --- enqueue ------------------------------------------------------------------------------


def enqueue(
    session: Session,
    episode_id: int,
    target: SyncTarget | None,
    *,
    request_id: str | None = None,
) -> SyncJob | None:
    """Queue the sync of an approved episode (idempotent: an existing job is kept).

    Call it in the transaction that approves the episode. ``target`` None (sync off)
    queues nothing; ``POST /sync/episodes`` catches up once sync is turned on. The job
    remembers the request that queued it (``request_id``, else the one being served) until
    a run claims it: the sensor tags that run with it.
    """
    if target is None:
        return None
    existing = session.exec(
        select(SyncJob).where(col(SyncJob.episode_id) == episode_id, col(SyncJob.target) == target)
    ).one_or_none()
    if existing is not None:
        return existing
    factory_id = session.exec(select(Episode.factory_id).where(col(Episode.id) == episode_id)).one()
    job = SyncJob(
        episode_id=episode_id,
        factory_id=factory_id,
        target=target,
        request_id=request_id or current_request_id(),
    )
    session.add(job)
    session.flush()
    return job


# --- claims -------------------------------------------------------------------------------


def _due(now: dt.datetime) -> ColumnElement[bool]:
    return and_(
        col(SyncJob.status).in_([s.value for s in WAITING]),
        or_(col(SyncJob.next_attempt_at).is_(None), col(SyncJob.next_attempt_at) <= now),
    )


def due_request_ids(session: Session, target: SyncTarget, limit: int) -> list[str | None]:
    """The ``request_id`` of the first ``limit`` due jobs in the order :func:`claim` takes
    them (None for a job no request queued): what the sensor tags each run with."""
    return list(
        session.exec(
            select(SyncJob.request_id)
            .where(_due(clock.now()), col(SyncJob.target) == target)
            .order_by(col(SyncJob.next_attempt_at), col(SyncJob.id))
            .limit(limit)
        ).all()
    )


def due_count(session: Session, target: SyncTarget | None = None) -> int:
    query = select(func.count()).select_from(SyncJob).where(_due(clock.now()))
    if target is not None:
        query = query.where(col(SyncJob.target) == target)
    return int(session.exec(query).one())


@dataclass(frozen=True)
class SyncWork:
    """A claimed job with everything the push needs (no DB access during the transfer)."""

    job_id: int
    attempt_id: int
    attempt_no: int
    episode_pk: int
    episode_id: str
    factory: str
    device_id: str
    task_id: str
    recording_date: dt.date
    bucket: str
    mcap_key: str
    mcap_size: int | None
    mcap_sha256: str | None
    sidecar_key: str | None
    qa_report: bytes | None
    progress: dict[str, Any]
    metadata: dict[str, Any]


def claim(
    session: Session,
    settings: Settings,
    *,
    owner: str,
    limit: int,
    run_id: str | None = None,
    job_ids: Iterable[int] | None = None,
) -> list[SyncWork]:
    """Lease up to ``limit`` due jobs of the configured target to ``owner`` and open an
    attempt on each. Jobs this owner already holds (a retried op of the same run) are
    taken back first, so a run that failed between upload and status write finishes them.
    """
    now = clock.now()
    target = target_of(settings)
    if target is None:
        return []
    lease = dt.timedelta(minutes=settings.sync_lease_minutes)
    held = list(
        session.exec(
            select(SyncJob)
            .where(
                col(SyncJob.status) == SyncStatus.IN_PROGRESS,
                col(SyncJob.lease_owner) == owner,
                col(SyncJob.target) == target,
            )
            .order_by(col(SyncJob.id))
            .with_for_update()
        ).all()
    )
    query = (
        select(SyncJob)
        .where(_due(now), col(SyncJob.target) == target)
        .order_by(col(SyncJob.next_attempt_at), col(SyncJob.id))
        .limit(max(0, limit - len(held)))
    )
    if job_ids is not None:
        query = query.where(col(SyncJob.id).in_(list(job_ids)))
    if session.get_bind().dialect.name in {"mysql", "mariadb"}:
        query = query.with_for_update(skip_locked=True)
    fresh = list(session.exec(query).all()) if limit > len(held) else []
    works = []
    for job in held + fresh:
        assert job.id is not None
        attempt_no = job.attempt_count + 1
        if job.status != SyncStatus.IN_PROGRESS:
            transition_sync(
                session,
                job.id,
                SyncStatus.IN_PROGRESS,
                expected=set(WAITING),
                values={
                    "lease_owner": owner,
                    "lease_expires_at": now + lease,
                    "attempt_count": attempt_no,
                    "request_id": None,  # served: later retries were not asked for
                },
            )
        else:
            _close_open_attempts(session, job.id, now, "interrupted", "the run retried the op")
            session.execute(
                update(SyncJob)
                .where(col(SyncJob.id) == job.id)
                .values(lease_expires_at=now + lease, attempt_count=attempt_no, updated_at=now)
                .execution_options(synchronize_session=False)
            )
        attempt = SyncAttempt(
            sync_job_id=job.id, attempt_no=attempt_no, started_at=now, run_id=run_id
        )
        session.add(attempt)
        session.flush()
        assert attempt.id is not None
        works.append((job, attempt.id, attempt_no))
    return _works(session, settings, works)


def _works(
    session: Session, settings: Settings, claimed: list[tuple[SyncJob, int, int]]
) -> list[SyncWork]:
    if not claimed:
        return []
    episode_ids = [job.episode_id for job, _, _ in claimed]
    episodes = {
        e.id: e for e in session.exec(select(Episode).where(col(Episode.id).in_(episode_ids)))
    }
    tasks = {
        t.id: t.task_id
        for t in session.exec(
            select(Task).where(col(Task.id).in_([e.task_id for e in episodes.values()]))
        )
    }
    factories = {
        f.id: f.slug
        for f in session.exec(
            select(Factory).where(col(Factory.id).in_({e.factory_id for e in episodes.values()}))
        )
    }
    reports = _latest_reports(session, episode_ids) if settings.sync_include_qa_report else {}
    works = []
    for job, attempt_id, attempt_no in claimed:
        episode = episodes[job.episode_id]
        assert job.id is not None
        assert episode.id is not None
        works.append(
            SyncWork(
                job_id=job.id,
                attempt_id=attempt_id,
                attempt_no=attempt_no,
                episode_pk=episode.id,
                episode_id=episode.episode_id,
                factory=factories.get(episode.factory_id, str(episode.factory_id)),
                device_id=episode.device_id,
                task_id=tasks.get(episode.task_id, ""),
                recording_date=episode.recording_date,
                bucket=episode.bucket,
                mcap_key=episode.mcap_path,
                mcap_size=episode.file_size_bytes,
                mcap_sha256=episode.checksum,
                sidecar_key=episode.sidecar_path,
                qa_report=reports.get(episode.id),
                progress=dict(job.progress or {}),
                metadata={
                    "status": str(episode.status),
                    "qa_score": episode.qa_score,
                    "duration_sec": episode.duration_sec,
                    "recording_started_at": _iso(episode.recording_started_at),
                    "approved_at": _iso(episode.approved_at),
                    "labels": list(episode.labels or []),
                },
            )
        )
    return works


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else clock.as_utc(value).isoformat()


def _latest_reports(session: Session, episode_ids: list[int]) -> dict[int, bytes]:
    """The newest QA result of each episode as canonical JSON (same bytes on every attempt,
    so a resumed push announces the same checksum)."""
    newest = (
        select(QAResult.episode_id, func.max(QAResult.id).label("id"))
        .where(col(QAResult.episode_id).in_(episode_ids))
        .group_by(col(QAResult.episode_id))
        .subquery()
    )
    rows = session.exec(select(QAResult).join(newest, col(QAResult.id) == newest.c.id)).all()
    out = {}
    for row in rows:
        document = {
            "tier": str(row.tier),
            "score": row.score,
            "hard_failure": row.hard_failure,
            "verdict": str(row.verdict),
            "checks": row.checks,
            "finished_at": _iso(row.finished_at),
        }
        out[row.episode_id] = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return out


def shipment(work: SyncWork, source: S3Client) -> Shipment:
    """The objects to send. The MCAP is streamed later; the sidecar (KiB) is read now."""
    if work.mcap_sha256 is None or work.mcap_size is None:
        raise SyncFailure("the episode has no verified size/checksum", retryable=False)
    objects = [
        SyncObject(
            "episode.mcap",
            work.mcap_size,
            work.mcap_sha256,
            bucket=work.bucket,
            key=work.mcap_key,
        )
    ]
    if work.sidecar_key:
        data = read_edge(
            source, "episode.json", work.bucket, work.sidecar_key, max_bytes=SIDECAR_MAX_BYTES
        )
        objects.append(
            SyncObject("episode.json", len(data), hashlib.sha256(data).hexdigest(), data=data)
        )
    if work.qa_report is not None:
        data = work.qa_report
        objects.append(
            SyncObject("qa_report.json", len(data), hashlib.sha256(data).hexdigest(), data=data)
        )
    return Shipment(
        episode_id=work.episode_id,
        factory=work.factory,
        device_id=work.device_id,
        task_id=work.task_id,
        recording_date=work.recording_date,
        objects=tuple(objects),
        metadata=work.metadata,
    )


SIDECAR_MAX_BYTES = 16 * 1024 * 1024


# --- outcomes -----------------------------------------------------------------------------


def _holds(session: Session, job_id: int, owner: str) -> SyncJob | None:
    job = session.exec(
        select(SyncJob).where(col(SyncJob.id) == job_id).with_for_update()
    ).one_or_none()
    if job is None or job.status != SyncStatus.IN_PROGRESS or job.lease_owner != owner:
        return None
    return job


def _close_attempt(
    session: Session,
    attempt_id: int,
    *,
    outcome: str,
    error: str = "",
    http_status: int | None = None,
    bytes_sent: int = 0,
    target: str = "",
) -> None:
    metrics.observe_sync_attempt(target, outcome)
    session.execute(
        update(SyncAttempt)
        .where(col(SyncAttempt.id) == attempt_id, col(SyncAttempt.finished_at).is_(None))
        .values(
            finished_at=clock.now(),
            outcome=outcome,
            error=error[:2048],
            http_status=http_status,
            bytes_transferred=bytes_sent,
        )
        .execution_options(synchronize_session=False)
    )


def _close_open_attempts(
    session: Session, job_id: int, now: dt.datetime, outcome: str, error: str
) -> None:
    session.execute(
        update(SyncAttempt)
        .where(col(SyncAttempt.sync_job_id) == job_id, col(SyncAttempt.finished_at).is_(None))
        .values(finished_at=now, outcome=outcome, error=error)
        .execution_options(synchronize_session=False)
    )


def _release(session: Session, job_id: int, target: SyncStatus, **values: Any) -> None:
    """``in_progress → target``, giving up the lease, with ``values`` in the same UPDATE."""
    transition_sync(
        session,
        job_id,
        target,
        expected={SyncStatus.IN_PROGRESS},
        values={"lease_owner": None, "lease_expires_at": None, **values},
    )


def checkpoint(session: Session, job_id: int, owner: str, progress: dict[str, Any]) -> bool:
    """Persist resumable progress (multipart upload ids, receiver session) while held."""
    job = _holds(session, job_id, owner)
    if job is None:
        return False
    session.execute(
        update(SyncJob)
        .where(col(SyncJob.id) == job_id)
        .values(
            progress=dict(progress),
            remote_session=str(progress.get("session") or "")[:255] or job.remote_session,
            updated_at=clock.now(),
        )
        .execution_options(synchronize_session=False)
    )
    return True


def record_synced(session: Session, work: SyncWork, receipt: Receipt, *, owner: str) -> bool:
    """``in_progress → synced`` if ``owner`` still holds the job. False: the lease was lost
    (the job is recovered and pushed again; the target answers "already synced")."""
    job = _holds(session, work.job_id, owner)
    if job is None:
        return False
    _release(
        session,
        work.job_id,
        SyncStatus.SYNCED,
        synced_at=receipt.synced_at,
        destination=receipt.destination[:1024],
        bytes_transferred=job.bytes_transferred + receipt.bytes_sent,
        remote_session=receipt.remote_session or job.remote_session or None,
        next_attempt_at=None,
        last_error="",
        progress={},
    )
    _close_attempt(
        session,
        work.attempt_id,
        outcome="duplicate" if receipt.duplicate else "synced",
        bytes_sent=receipt.bytes_sent,
        target=str(job.target),
    )
    approved_at = session.exec(
        select(Episode.approved_at).where(col(Episode.id) == job.episode_id)
    ).one_or_none()
    metrics.observe_synced(approved_at, receipt.synced_at)
    emit(
        session,
        EventType.EPISODE_SYNCED,
        {
            "episode_id": work.episode_id,
            "episode_row_id": str(work.episode_pk),
            "task_id": work.task_id,
            "target": str(job.target),
            "destination": receipt.destination[:1024],
            "synced_at": clock.as_utc(receipt.synced_at).isoformat(),
        },
        factory_id=job.factory_id,
    )
    return True


def record_failure(
    session: Session,
    settings: Settings,
    work: SyncWork,
    failure: SyncFailure,
    *,
    owner: str,
    bytes_sent: int = 0,
    rng: random.Random | None = None,
) -> str:
    """Record a failed push: ``retry_wait`` with backoff, or ``failed`` when retrying
    cannot help or the budget is spent. Returns the new status or ``lost_lease``."""
    job = _holds(session, work.job_id, owner)
    if job is None:
        return "lost_lease"
    error = str(failure)[:2048]
    exhausted = job.attempt_count >= settings.sync_max_attempts
    now = clock.now()
    if failure.retryable and not exhausted:
        delay = backoff_seconds(job.attempt_count, settings.sync_backoff_base_s, rng)
        _release(
            session,
            work.job_id,
            SyncStatus.RETRY_WAIT,
            next_attempt_at=now + dt.timedelta(seconds=delay),
            last_error=error,
            bytes_transferred=job.bytes_transferred + bytes_sent,
        )
        _close_attempt(
            session,
            work.attempt_id,
            outcome="retry",
            error=error,
            http_status=failure.http_status,
            bytes_sent=bytes_sent,
            target=str(job.target),
        )
        return SyncStatus.RETRY_WAIT.value
    _fail(session, job, error, now, bytes_sent=bytes_sent)
    _close_attempt(
        session,
        work.attempt_id,
        outcome="failed",
        error=error,
        http_status=failure.http_status,
        bytes_sent=bytes_sent,
        target=str(job.target),
    )
    return SyncStatus.FAILED.value


def _fail(
    session: Session, job: SyncJob, error: str, now: dt.datetime, *, bytes_sent: int = 0
) -> None:
    assert job.id is not None
    _release(
        session,
        job.id,
        SyncStatus.FAILED,
        last_error=error,
        next_attempt_at=None,
        bytes_transferred=job.bytes_transferred + bytes_sent,
    )
    episode_id = session.exec(
        select(Episode.episode_id).where(col(Episode.id) == job.episode_id)
    ).one()
    details = {
        "episode_id": episode_id,
        "sync_job_id": job.id,
        "target": str(job.target),
        "attempts": job.attempt_count,
        "error": error,
    }
    emit(
        session,
        EventType.ALERT_RAISED,
        {
            "alert": "sync_failed",
            "severity": "warning",
            **details,
            "sync_job_id": str(job.id),
            "error": error[:500],
        },
        factory_id=job.factory_id,
    )
    record_audit(
        session,
        Actor.system("sync"),
        "sync.failed",
        entity_type="sync",
        entity_id=job.id,
        before={"status": SyncStatus.IN_PROGRESS.value},
        after={"status": SyncStatus.FAILED.value, **details},
        factory_id=job.factory_id,
    )


def recover_expired(session: Session, settings: Settings) -> int:
    """Jobs whose run died (lease expired) go back to ``retry_wait`` — or ``failed`` when
    that was their last attempt. Returns how many were recovered."""
    now = clock.now()
    query = (
        select(SyncJob)
        .where(
            col(SyncJob.status) == SyncStatus.IN_PROGRESS,
            col(SyncJob.lease_expires_at) < now,
        )
        .order_by(col(SyncJob.id))
        .limit(500)
    )
    if session.get_bind().dialect.name in {"mysql", "mariadb"}:
        query = query.with_for_update(skip_locked=True)
    jobs = list(session.exec(query).all())
    for job in jobs:
        assert job.id is not None
        note = f"lease of {job.lease_owner} expired at {job.lease_expires_at}"
        _close_open_attempts(session, job.id, now, "lease_expired", note)
        if job.attempt_count >= settings.sync_max_attempts:
            _fail(session, job, note, now)
            continue
        _release(session, job.id, SyncStatus.RETRY_WAIT, next_attempt_at=now, last_error=note)
    return len(jobs)


def renew_leases(session: Session, settings: Settings, owner: str) -> None:
    """Extend every lease ``owner`` holds (a long run keeps its remaining jobs)."""
    now = clock.now()
    session.execute(
        update(SyncJob)
        .where(col(SyncJob.lease_owner) == owner, col(SyncJob.status) == SyncStatus.IN_PROGRESS)
        .values(lease_expires_at=now + dt.timedelta(minutes=settings.sync_lease_minutes))
        .execution_options(synchronize_session=False)
    )


# --- one batch ----------------------------------------------------------------------------


@dataclass
class SyncOutcome:
    claimed: int = 0
    synced: int = 0
    duplicates: int = 0
    retry: int = 0
    failed: int = 0
    lost_lease: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    # Soonest retry of a job this batch put back in retry_wait (for an in-run retry).
    next_retry_at: dt.datetime | None = None

    def absorb(self, other: SyncOutcome) -> None:
        for name in ("claimed", "synced", "duplicates", "retry", "failed", "lost_lease"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bytes_sent += other.bytes_sent
        self.seconds += other.seconds
        self.rows.extend(other.rows)
        if other.next_retry_at is not None:
            self.next_retry_at = min(filter(None, (self.next_retry_at, other.next_retry_at)))

    @property
    def mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0


def push_batch(
    works: list[SyncWork],
    *,
    settings: Settings,
    target: Target,
    source: S3Client,
    session_scope: SessionScope,
    owner: str,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> SyncOutcome:
    """Push claimed jobs ``workers`` at a time; each outcome is its own short transaction
    (a crash loses at most the pushes in flight, which resume from their checkpoints)."""
    outcome = SyncOutcome(claimed=len(works))
    started = time.monotonic()

    def save(work: SyncWork) -> Callable[[dict[str, Any]], None]:
        def write(progress: dict[str, Any]) -> None:
            with session_scope() as session:
                checkpoint(session, work.job_id, owner, progress)

        return write

    def work_one(work: SyncWork) -> tuple[SyncWork, Receipt | None, SyncFailure | None]:
        try:
            ship = shipment(work, source)
            return work, target.push(ship, source, dict(work.progress), save(work)), None
        except SyncFailure as exc:
            return work, None, exc

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="sync") as pool:
        for work, receipt, failure in pool.map(work_one, works):
            row: dict[str, Any] = {"episode": work.episode_id, "attempt": work.attempt_no}
            with session_scope() as session:
                if receipt is not None:
                    kept = record_synced(session, work, receipt, owner=owner)
                    status = (
                        ("duplicate" if receipt.duplicate else "synced") if kept else "lost_lease"
                    )
                    outcome.bytes_sent += receipt.bytes_sent
                    row |= {"status": status, "mb": round(receipt.bytes_sent / 1e6, 1)}
                else:
                    assert failure is not None
                    status = record_failure(session, settings, work, failure, owner=owner)
                    row |= {"status": status, "error": str(failure)[:200]}
                renew_leases(session, settings, owner)
            if status == "synced":
                outcome.synced += 1
            elif status == "duplicate":
                outcome.duplicates += 1
            elif status == SyncStatus.RETRY_WAIT.value:
                outcome.retry += 1
            elif status == SyncStatus.FAILED.value:
                outcome.failed += 1
            else:
                outcome.lost_lease += 1
            outcome.rows.append(row)
            if log and status not in ("synced", "duplicate"):
                log(f"{work.episode_id} {status} {row.get('error', '')}")
    if outcome.retry:
        ids = [w.job_id for w in works]
        with session_scope() as session:
            soonest = session.exec(
                select(func.min(SyncJob.next_attempt_at)).where(
                    col(SyncJob.id).in_(ids), col(SyncJob.status) == SyncStatus.RETRY_WAIT
                )
            ).one()
        outcome.next_retry_at = None if soonest is None else clock.as_utc(soonest)
    outcome.seconds = time.monotonic() - started
    return outcome


# --- ops ----------------------------------------------------------------------------------


def _episode_in_scope(session: Session, scope: Scope, episode_pk: int) -> Episode:
    episode = session.get(Episode, episode_pk)
    if episode is None or not scope.can_see(episode.factory_id):
        raise NotFoundError(f"episode {episode_pk} not found")
    return episode


def job_for(session: Session, episode_pk: int, target: SyncTarget) -> SyncJob | None:
    return session.exec(
        select(SyncJob).where(col(SyncJob.episode_id) == episode_pk, col(SyncJob.target) == target)
    ).one_or_none()


def _requeue(session: Session, job: SyncJob, actor: Actor, reason: str) -> None:
    assert job.id is not None
    transition_sync(
        session,
        job.id,
        SyncStatus.QUEUED,
        requeue=True,
        actor=actor,
        reason=reason,
        values={
            "attempt_count": 0,
            "next_attempt_at": None,
            "last_error": "",
            "progress": {},
            "lease_owner": None,
            "lease_expires_at": None,
            "request_id": current_request_id(),
        },
    )


def resync(
    session: Session,
    scope: Scope,
    settings: Settings,
    episode_pk: int,
    *,
    actor: Actor,
    reason: str = "",
) -> SyncJob:
    """Queue one approved episode again: ``failed → queued`` (retry), ``synced → queued``
    (resync), or a first job. 409 ``sync_pending`` while a job is waiting or running."""
    episode = _episode_in_scope(session, scope, episode_pk)
    target = target_of(settings)
    if target is None:
        raise ConflictError("cloud sync is off (KEYSTONE_SYNC_TARGET=off)", code="sync_off")
    if episode.status not in APPROVED:
        raise ConflictError(
            f"episode {episode_pk} is {episode.status}; only approved episodes are synced",
            code="not_approved",
            current_status=str(episode.status),
        )
    job = job_for(session, episode_pk, target)
    if job is None:
        job = enqueue(session, episode_pk, target)
        assert job is not None
        record_audit(
            session,
            actor,
            "sync.enqueue",
            entity_type="episode",
            entity_id=episode_pk,
            after={"target": str(target), "reason": reason},
            factory_id=episode.factory_id,
        )
        return job
    if job.status not in (SyncStatus.SYNCED, SyncStatus.FAILED):
        raise ConflictError(
            f"episode {episode_pk} already has a {job.status} sync job",
            code="sync_pending",
            current_status=str(job.status),
        )
    _requeue(session, job, actor, reason or "resync")
    session.refresh(job)
    return job


@dataclass(frozen=True)
class EnqueueFilter:
    factory_ids: frozenset[int] | None = None
    episode_ids: tuple[int, ...] | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    include_failed: bool = True
    include_synced: bool = False
    limit: int = 1000


@dataclass
class EnqueueResult:
    matched: int = 0
    queued: int = 0
    requeued: int = 0
    skipped: int = 0
    job_ids: list[int] = field(default_factory=list)
    # Jobs that matched and were already waiting (queued / retry_wait): a backfill pushes
    # them along with the new ones.
    waiting_ids: list[int] = field(default_factory=list)


def enqueue_matching(
    session: Session,
    scope: Scope,
    settings: Settings,
    wanted: EnqueueFilter,
    *,
    actor: Actor,
    reason: str = "",
) -> EnqueueResult:
    """Queue approved episodes matching ``wanted``: new jobs for those without one, failed
    jobs retried, synced ones resynced only with ``include_synced``; waiting or running
    jobs are left alone (skipped)."""
    target = target_of(settings)
    if target is None:
        raise ConflictError("cloud sync is off (KEYSTONE_SYNC_TARGET=off)", code="sync_off")
    where: list[ColumnElement[bool]] = [col(Episode.status).in_([s.value for s in APPROVED])]
    if scope.factory_ids is not None:
        where.append(col(Episode.factory_id).in_(sorted(scope.factory_ids)))
    if wanted.factory_ids is not None:
        where.append(col(Episode.factory_id).in_(sorted(wanted.factory_ids)))
    if wanted.episode_ids is not None:
        where.append(col(Episode.id).in_(list(wanted.episode_ids)))
    if wanted.date_from is not None:
        where.append(col(Episode.recording_date) >= wanted.date_from)
    if wanted.date_to is not None:
        where.append(col(Episode.recording_date) <= wanted.date_to)
    rows = session.exec(
        select(Episode.id, Episode.factory_id, SyncJob)
        .outerjoin(
            SyncJob, and_(col(SyncJob.episode_id) == col(Episode.id), col(SyncJob.target) == target)
        )
        .where(*where)
        .order_by(col(Episode.id))
        .limit(wanted.limit)
    ).all()
    result = EnqueueResult(matched=len(rows))
    for episode_pk, _factory_id, job in rows:
        assert episode_pk is not None
        if job is None:
            created = enqueue(session, episode_pk, target)
            assert created is not None
            assert created.id is not None
            result.queued += 1
            result.job_ids.append(created.id)
        elif (job.status == SyncStatus.FAILED and wanted.include_failed) or (
            job.status == SyncStatus.SYNCED and wanted.include_synced
        ):
            _requeue(session, job, actor, reason or "enqueue by filter")
            assert job.id is not None
            result.requeued += 1
            result.job_ids.append(job.id)
        else:
            result.skipped += 1
            if job.status in WAITING and job.id is not None:
                result.waiting_ids.append(job.id)
    if result.queued:
        record_audit(
            session,
            actor,
            "sync.enqueue",
            entity_type="sync",
            entity_id="filter",
            after={"target": str(target), "queued": result.queued, "reason": reason},
        )
    return result


def status_of(
    session: Session, scope: Scope, settings: Settings, episode_pk: int
) -> tuple[Episode, list[SyncJob]]:
    episode = _episode_in_scope(session, scope, episode_pk)
    jobs = list(
        session.exec(
            select(SyncJob).where(col(SyncJob.episode_id) == episode_pk).order_by(col(SyncJob.id))
        ).all()
    )
    return episode, jobs


def attempts_of(
    session: Session, scope: Scope, episode_pk: int, *, limit: int, offset: int
) -> tuple[list[tuple[SyncAttempt, SyncJob]], int]:
    _episode_in_scope(session, scope, episode_pk)
    where = [col(SyncJob.episode_id) == episode_pk]
    total = int(
        session.exec(
            select(func.count())
            .select_from(SyncAttempt)
            .join(SyncJob, col(SyncJob.id) == col(SyncAttempt.sync_job_id))
            .where(*where)
        ).one()
    )
    rows = session.exec(
        select(SyncAttempt, SyncJob)
        .join(SyncJob, col(SyncJob.id) == col(SyncAttempt.sync_job_id))
        .where(*where)
        .order_by(col(SyncAttempt.id).desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return [(a, j) for a, j in rows], total


def summaries(
    session: Session,
    scope: Scope,
    *,
    status: SyncStatus | None,
    factory_id: int | None,
    limit: int,
    offset: int,
) -> tuple[list[tuple[SyncJob, str]], int, dict[str, int]]:
    """Jobs in scope (newest first) with their episode's public id, plus counts by status."""
    where: list[ColumnElement[bool]] = []
    if scope.factory_ids is not None:
        where.append(col(SyncJob.factory_id).in_(sorted(scope.factory_ids)))
    if factory_id is not None:
        where.append(col(SyncJob.factory_id) == factory_id)
    counts = {s.value: 0 for s in SyncStatus}
    for value, count in session.exec(
        select(SyncJob.status, func.count()).where(*where).group_by(col(SyncJob.status))
    ).all():
        counts[str(value.value if isinstance(value, SyncStatus) else value)] = int(count)
    if status is not None:
        where.append(col(SyncJob.status) == status)
    total = int(session.exec(select(func.count()).select_from(SyncJob).where(*where)).one())
    rows = session.exec(
        select(SyncJob, Episode.episode_id)
        .join(Episode, col(Episode.id) == col(SyncJob.episode_id))
        .where(*where)
        .order_by(col(SyncJob.updated_at).desc(), col(SyncJob.id).desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return [(job, str(public)) for job, public in rows], total, counts
