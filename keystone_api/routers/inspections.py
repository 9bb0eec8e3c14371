"""Human inspection: the queue of doubtful episodes, claims, decisions and throughput."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from keystone_api.crud import CONFLICT, ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, PresignerDep, SessionDep, SettingsDep
from keystone_api.schemas import IdStr, Page, RowId
from keystone_core import clock
from keystone_core.models import EpisodeStatus, InspectionDecision
from keystone_core.services import crud, episode_links
from keystone_core.services import inspections as svc
from keystone_core.services.sync import target_of as sync_target_of
from keystone_core.settings import Settings

router = APIRouter(prefix="/api/v1/inspections", tags=["inspections"])

Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]


class FailingCheck(BaseModel):
    name: str | None
    reason: str | None


class QueuePreview(BaseModel):
    """Presigned links to the QA previews; null until QA has generated them."""

    contact_sheet_url: str | None
    rate_timeline_url: str | None
    generated_at: str | None


class QueueDownload(BaseModel):
    """Presigned links to the episode's objects (sidecar: null when it has none)."""

    mcap_url: str | None
    sidecar_url: str | None


class QueueItem(BaseModel):
    episode_id: IdStr
    episode_public_id: str
    factory_id: IdStr
    device_id: str
    recording_date: dt.date
    qa_score: float | None
    failing_checks: list[FailingCheck]
    claimed_by: IdStr | None = Field(description="Your own live claim, if any.")
    claim_expires_at: dt.datetime | None
    checks_url: str
    preview: QueuePreview
    download: QueueDownload
    links_expire_at: dt.datetime = Field(description="When the presigned URLs stop working.")


class ClaimOut(BaseModel):
    episode_id: IdStr
    claimed_at: dt.datetime
    lease_expires_at: dt.datetime


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2048)
    failed_tags: list[Tag] = Field(default_factory=list, max_length=32)


class RejectIn(ApproveIn):
    reason: str = Field(min_length=1, max_length=2048, description="Required for a rejection.")


class DecisionOut(BaseModel):
    episode_id: IdStr
    status: EpisodeStatus
    decision: InspectionDecision
    reason: str
    failed_tags: list[str]
    decided_at: dt.datetime


class InspectorStatsOut(BaseModel):
    user_id: IdStr
    approved: int
    rejected: int
    median_review_s: float | None


class StatsOut(BaseModel):
    waiting: int
    claimed: int
    oldest_waiting_s: float | None
    since: dt.datetime
    inspectors: list[InspectorStatsOut]


@router.get(
    "/queue",
    response_model=Page[QueueItem],
    responses=ERRORS,
    summary="Episodes waiting for a person, oldest first (others' live claims hidden)",
)
def inspection_queue(
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    presigner: PresignerDep,
    limit: Annotated[int, Query(ge=1, description="Page size; values above 100 give 100.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[QueueItem]:
    assert principal.user.id is not None
    limit = crud.clamp_limit(limit)
    entries, total = svc.queue(
        session, principal.scope, user_id=principal.user.id, limit=limit, offset=offset
    )
    items = []
    for entry in entries:
        episode = entry.episode
        assert episode.id is not None
        # Signed locally: no query and no request per row.
        urls, expire_at = episode_links.links(settings, presigner, episode)
        preview = (episode.meta or {}).get("preview")
        generated = preview.get("generated_at") if isinstance(preview, dict) else None
        items.append(
            QueueItem(
                episode_id=episode.id,
                episode_public_id=episode.episode_id,
                factory_id=episode.factory_id,
                device_id=episode.device_id,
                recording_date=episode.recording_date,
                qa_score=episode.qa_score,
                failing_checks=[FailingCheck.model_validate(c) for c in entry.failing],
                claimed_by=entry.claimed_by,
                claim_expires_at=entry.claim_expires_at,
                checks_url=f"/api/v1/qa/episodes/{episode.id}/checks",
                preview=QueuePreview(
                    contact_sheet_url=urls["contact_sheet"],
                    rate_timeline_url=urls["rate_timeline"],
                    generated_at=str(generated) if generated else None,
                ),
                download=QueueDownload(mcap_url=urls["mcap"], sidecar_url=urls["sidecar"]),
                links_expire_at=expire_at,
            )
        )
    return Page[QueueItem](items=items, total=total, limit=limit, offset=offset)


@router.post(
    "/{id}/claim",
    response_model=ClaimOut,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Claim an episode for review (a lease; claiming again extends it)",
)
def claim_episode(
    id: RowId, request: Request, principal: CurrentPrincipal, session: SessionDep
) -> ClaimOut:
    assert principal.user.id is not None
    minutes = request.app.state.settings.inspection_lease_minutes
    held = svc.claim(
        session,
        principal.scope,
        id,
        user_id=principal.user.id,
        inspector_id=principal.user.inspector_id,
        lease=dt.timedelta(minutes=minutes),
    )
    assert held.lease_expires_at is not None
    return ClaimOut(
        episode_id=id, claimed_at=held.claimed_at, lease_expires_at=held.lease_expires_at
    )


def _decide(
    id: int,
    principal: Any,
    session: SessionDep,
    decision: InspectionDecision,
    body: ApproveIn,
    settings: Settings,
) -> DecisionOut:
    done = svc.decide(
        session,
        principal.scope,
        id,
        actor=principal.actor,
        user_id=principal.user.id,
        inspector_id=principal.user.inspector_id,
        decision=decision,
        reason=body.reason,
        failed_tags=list(body.failed_tags),
        sync_target=sync_target_of(settings),
    )
    assert done.decided_at is not None
    approved = decision == InspectionDecision.APPROVED
    return DecisionOut(
        episode_id=id,
        status=EpisodeStatus.INSPECTOR_APPROVED if approved else EpisodeStatus.REJECTED,
        decision=decision,
        reason=done.reason,
        failed_tags=done.failed_tags,
        decided_at=done.decided_at,
    )


@router.post(
    "/{id}/approve",
    response_model=DecisionOut,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Approve an episode (needs_inspection → inspector_approved)",
)
def approve_episode(
    id: RowId,
    body: ApproveIn,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> DecisionOut:
    return _decide(id, principal, session, InspectionDecision.APPROVED, body, settings)


@router.post(
    "/{id}/reject",
    response_model=DecisionOut,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Reject an episode with a reason (needs_inspection → rejected)",
)
def reject_episode(
    id: RowId,
    body: RejectIn,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
) -> DecisionOut:
    return _decide(id, principal, session, InspectionDecision.REJECTED, body, settings)


@router.get(
    "/stats",
    response_model=StatsOut,
    responses=ERRORS,
    summary="Queue size and age, live claims, decisions per inspector",
)
def inspection_stats(
    principal: CurrentPrincipal,
    session: SessionDep,
    hours: Annotated[int, Query(ge=1, le=24 * 90, description="Window for decisions.")] = 24,
) -> StatsOut:
    since = clock.now() - dt.timedelta(hours=hours)
    result = svc.stats(session, principal.scope, since=since)
    return StatsOut(
        waiting=result.waiting,
        claimed=result.claimed,
        oldest_waiting_s=result.oldest_waiting_s,
        since=since,
        inspectors=[
            InspectorStatsOut(
                user_id=i.user_id,
                approved=i.approved,
                rejected=i.rejected,
                median_review_s=i.median_review_s,
            )
            for i in result.inspectors
        ],
    )
