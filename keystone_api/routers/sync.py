"""Cloud sync operations: enqueue, resync, status, logs, summary, config.

The API only records intent (a ``queued`` job row, audited); Dagster's ``due_sync_sensor``
picks it up and pushes. Route and field names follow the Go implementation where it has
them (``/sync/episodes…``, ``attempt_count``, ``next_retry_at``, ``error_message``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keystone_api.crud import CONFLICT, ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep, SettingsDep
from keystone_api.schemas import MAX_ROW_ID, IdStr, Page, RowId
from keystone_core.errors import NotFoundError
from keystone_core.models import EpisodeStatus, SyncJob, SyncStatus, SyncTarget
from keystone_core.services import sync as svc
from keystone_core.sync.targets import describe_target
from keystone_core.sync.transfer import MIB

router = APIRouter(prefix="/api/v1/sync", tags=["sync"])

MAX_FILTER_EPISODES = 10_000
RowIdIn = Annotated[int, Field(ge=1, le=MAX_ROW_ID)]


class SyncJobPublic(BaseModel):
    id: IdStr
    episode_id: IdStr
    episode_public_id: str
    factory_id: IdStr
    target: SyncTarget
    status: SyncStatus
    attempt_count: int
    next_retry_at: dt.datetime | None = Field(description="When a retry_wait job is due.")
    error_message: str
    destination_path: str
    bytes_transferred: int
    lease_owner: str | None = Field(description="The Dagster run holding an in_progress job.")
    lease_expires_at: dt.datetime | None
    created_at: dt.datetime = Field(description="When the job was queued (at approval).")
    updated_at: dt.datetime
    synced_at: dt.datetime | None


def _job(job: SyncJob, public_id: str) -> SyncJobPublic:
    assert job.id is not None
    return SyncJobPublic(
        id=job.id,
        episode_id=job.episode_id,
        episode_public_id=public_id,
        factory_id=job.factory_id,
        target=job.target,
        status=job.status,
        attempt_count=job.attempt_count,
        next_retry_at=job.next_attempt_at,
        error_message=job.last_error,
        destination_path=job.destination,
        bytes_transferred=job.bytes_transferred,
        lease_owner=job.lease_owner,
        lease_expires_at=job.lease_expires_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        synced_at=job.synced_at,
    )


class EnqueueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    episode_ids: list[RowIdIn] | None = Field(
        default=None, max_length=MAX_FILTER_EPISODES, description="Episode row ids."
    )
    factory_id: RowIdIn | None = None
    date_from: dt.date | None = Field(default=None, description="Recording date (UTC), from.")
    date_to: dt.date | None = Field(default=None, description="Recording date (UTC), to.")
    include_failed: bool = Field(default=True, description="Retry failed jobs too.")
    include_synced: bool = Field(default=False, description="Resync synced episodes too.")
    limit: int = Field(default=1000, ge=1, le=MAX_FILTER_EPISODES)
    reason: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _bounded(self) -> EnqueueRequest:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("date_from is after date_to")
        if self.episode_ids is None and self.factory_id is None and self.date_from is None:
            raise ValueError("give episode_ids, factory_id or date_from (no unbounded enqueue)")
        return self


class EnqueueResult(BaseModel):
    matched: int = Field(description="Approved episodes that matched the filter.")
    queued: int = Field(description="New sync jobs.")
    requeued: int = Field(description="Failed (or synced, with include_synced) jobs queued again.")
    skipped: int = Field(description="Already queued, running, or synced.")
    job_ids: list[IdStr]


class ResyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500)


class EpisodeSyncStatus(BaseModel):
    episode_id: IdStr
    episode_public_id: str
    episode_status: EpisodeStatus
    approved_at: dt.datetime | None
    cloud_synced: bool = Field(description="A verified copy exists on the configured target.")
    cloud_synced_at: dt.datetime | None
    jobs: list[SyncJobPublic]


class SyncAttemptPublic(BaseModel):
    id: IdStr
    sync_job_id: IdStr
    target: SyncTarget
    attempt_no: int
    status: str = Field(description="synced, duplicate, retry, failed, lease_expired, … or ''.")
    started_at: dt.datetime
    completed_at: dt.datetime | None
    duration_sec: float | None
    bytes_transferred: int
    http_status: int | None
    error_message: str
    run_id: str | None


class SyncSummaryPage(Page[SyncJobPublic]):
    counts: dict[str, int] = Field(description="Jobs in scope by status (ignores `status`).")


class SyncConfigPublic(BaseModel):
    target: str = Field(description="s3, http or off.")
    destination: dict[str, Any] = Field(description="Endpoint/bucket/prefix or receiver URL.")
    auto_scan_enabled: bool = Field(description="Approvals queue sync jobs automatically.")
    max_retries: int = Field(description="Attempts before a job is failed.")
    backoff_base_s: float
    backoff_cap_s: float
    lease_minutes: int
    part_size_bytes: int
    workers: int
    batch_max: int
    include_qa_report: bool
    edge_retention_days: int | None


@router.post(
    "/episodes",
    status_code=202,
    response_model=EnqueueResult,
    responses={**ERRORS, **CONFLICT},
    summary="Queue approved episodes matching a filter (missing and failed jobs; audited)",
)
def enqueue_episodes(
    body: EnqueueRequest,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> EnqueueResult:
    if body.factory_id is not None and not principal.scope.can_see(body.factory_id):
        raise NotFoundError(f"factory {body.factory_id} not found")
    result = svc.enqueue_matching(
        session,
        principal.scope,
        settings,
        svc.EnqueueFilter(
            factory_ids=None if body.factory_id is None else frozenset({body.factory_id}),
            episode_ids=None if body.episode_ids is None else tuple(body.episode_ids),
            date_from=body.date_from,
            date_to=body.date_to,
            include_failed=body.include_failed,
            include_synced=body.include_synced,
            limit=body.limit,
        ),
        actor=principal.actor,
        reason=body.reason,
    )
    return EnqueueResult(
        matched=result.matched,
        queued=result.queued,
        requeued=result.requeued,
        skipped=result.skipped,
        job_ids=result.job_ids,
    )


@router.post(
    "/episodes/{id}/resync",
    status_code=202,
    response_model=SyncJobPublic,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Queue one approved episode again (failed → retry, synced → resync; audited)",
)
def resync_episode(
    id: RowId,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    body: ResyncRequest | None = None,
) -> SyncJobPublic:
    job = svc.resync(
        session,
        principal.scope,
        settings,
        id,
        actor=principal.actor,
        reason=body.reason if body else "",
    )
    episode, _jobs = svc.status_of(session, principal.scope, settings, id)
    return _job(job, episode.episode_id)


@router.get(
    "/episodes/summary",
    response_model=SyncSummaryPage,
    responses={**ERRORS},
    summary="Sync jobs in scope, most recently changed first, with counts by status",
)
def sync_summary(
    principal: CurrentPrincipal,
    session: SessionDep,
    status: SyncStatus | None = None,
    factory_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> SyncSummaryPage:
    limit = min(limit, 100)
    rows, total, counts = svc.summaries(
        session, principal.scope, status=status, factory_id=factory_id, limit=limit, offset=offset
    )
    return SyncSummaryPage(
        items=[_job(job, public) for job, public in rows],
        total=total,
        limit=limit,
        offset=offset,
        counts=counts,
    )


@router.get(
    "/episodes/{id}/status",
    response_model=EpisodeSyncStatus,
    responses={**ERRORS, **NOT_FOUND},
    summary="Sync state of one episode",
)
def sync_status(
    id: RowId, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> EpisodeSyncStatus:
    episode, jobs = svc.status_of(session, principal.scope, settings, id)
    assert episode.id is not None
    current = svc.target_of(settings)
    synced = [j for j in jobs if j.target == current and j.status == SyncStatus.SYNCED]
    return EpisodeSyncStatus(
        episode_id=episode.id,
        episode_public_id=episode.episode_id,
        episode_status=episode.status,
        approved_at=episode.approved_at,
        cloud_synced=bool(synced),
        cloud_synced_at=synced[0].synced_at if synced else None,
        jobs=[_job(j, episode.episode_id) for j in jobs],
    )


@router.get(
    "/episodes/{id}/logs",
    response_model=Page[SyncAttemptPublic],
    responses={**ERRORS, **NOT_FOUND},
    summary="Every sync attempt of one episode, newest first",
)
def sync_logs(
    id: RowId,
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[SyncAttemptPublic]:
    limit = min(limit, 100)
    rows, total = svc.attempts_of(session, principal.scope, id, limit=limit, offset=offset)
    items = []
    for attempt, job in rows:
        assert attempt.id is not None
        duration = (
            (attempt.finished_at - attempt.started_at).total_seconds()
            if attempt.finished_at
            else None
        )
        items.append(
            SyncAttemptPublic(
                id=attempt.id,
                sync_job_id=attempt.sync_job_id,
                target=job.target,
                attempt_no=attempt.attempt_no,
                status=attempt.outcome,
                started_at=attempt.started_at,
                completed_at=attempt.finished_at,
                duration_sec=duration,
                bytes_transferred=attempt.bytes_transferred,
                http_status=attempt.http_status,
                error_message=attempt.error,
                run_id=attempt.run_id,
            )
        )
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/config",
    response_model=SyncConfigPublic,
    responses={**ERRORS},
    summary="The cloud sync configuration in effect (no secrets)",
)
def sync_config(settings: SettingsDep) -> SyncConfigPublic:
    return SyncConfigPublic(
        target=settings.sync_target,
        destination=describe_target(settings),
        auto_scan_enabled=settings.sync_target != "off",
        max_retries=settings.sync_max_attempts,
        backoff_base_s=settings.sync_backoff_base_s,
        backoff_cap_s=svc.BACKOFF_CAP_S,
        lease_minutes=settings.sync_lease_minutes,
        part_size_bytes=settings.sync_part_size_mib * MIB,
        workers=settings.sync_workers,
        batch_max=settings.sync_batch_max,
        include_qa_report=settings.sync_include_qa_report,
        edge_retention_days=settings.edge_retention_days,
    )
