"""QA results and reruns of one episode (the scoring itself runs in Dagster)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from keystone_api.crud import CONFLICT, ERRORS, NOT_FOUND
from keystone_api.deps import CurrentPrincipal, SessionDep
from keystone_api.schemas import IdStr, RowId
from keystone_core.errors import ConflictError
from keystone_core.models import EpisodeStatus, QATier
from keystone_core.services import crud
from keystone_core.services import qa as qa_service
from keystone_core.services.production import EPISODES

router = APIRouter(prefix="/api/v1/qa", tags=["qa"])


class CheckPublic(BaseModel):
    name: str
    passed: bool | None = Field(description="null: the check does not apply (not scored).")
    value: Any
    threshold: Any
    reason: str
    weight: float
    cap: float = Field(description="Highest score the episode can have when this check fails.")
    fatal: bool = Field(description="A failure makes the verdict qa_failed.")


class QAResultPublic(BaseModel):
    id: IdStr
    tier: QATier
    score: float
    verdict: EpisodeStatus
    hard_failure: bool
    checks: list[CheckPublic]
    run_id: str | None
    started_at: dt.datetime
    finished_at: dt.datetime


class EpisodeChecks(BaseModel):
    episode_id: IdStr
    episode_public_id: str
    status: EpisodeStatus
    qa_score: float | None
    results: list[QAResultPublic] = Field(description="Newest first; the first is current.")


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: Literal["fast", "thorough", "auto"] = "thorough"
    reason: str = Field(default="QA rerun requested", max_length=500)


class RerunAccepted(BaseModel):
    episode_id: IdStr
    status: EpisodeStatus
    tier: str


@router.get(
    "/episodes/{id}/checks",
    response_model=EpisodeChecks,
    responses={**ERRORS, **NOT_FOUND},
    summary="QA results of an episode: every check with value, threshold and reason",
)
def episode_checks(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> EpisodeChecks:
    episode = crud.get_row(session, EPISODES, principal.scope, id)
    assert episode.id is not None
    rows = qa_service.results(session, episode.id)
    return EpisodeChecks(
        episode_id=episode.id,
        episode_public_id=episode.episode_id,
        status=episode.status,
        qa_score=episode.qa_score,
        results=[
            QAResultPublic(
                id=r.id or 0,
                tier=r.tier,
                score=r.score,
                verdict=r.verdict,
                hard_failure=r.hard_failure,
                checks=[CheckPublic.model_validate(c) for c in r.checks],
                run_id=r.run_id,
                started_at=r.started_at,
                finished_at=r.finished_at,
            )
            for r in rows
        ],
    )


@router.post(
    "/episodes/{id}/run",
    status_code=202,
    response_model=RerunAccepted,
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Score an episode again (audited); the pending-QA sensor picks it up",
)
def rerun_episode(
    id: RowId, body: RerunRequest, principal: CurrentPrincipal, session: SessionDep
) -> RerunAccepted:
    episode = crud.get_row(session, EPISODES, principal.scope, id)
    assert episode.id is not None
    if episode.status == EpisodeStatus.QA_RUNNING:
        raise ConflictError(
            "the episode is being scored now; ask again when it has a result",
            code="qa_running",
            current_status=episode.status.value,
        )
    if episode.status == EpisodeStatus.PENDING_QA:
        qa_service.request_tier(session, episode.id, body.tier)
    else:
        qa_service.requeue(
            session, [episode.id], principal.actor, tier=body.tier, reason=body.reason
        )
    return RerunAccepted(episode_id=episode.id, status=EpisodeStatus.PENDING_QA, tier=body.tier)
