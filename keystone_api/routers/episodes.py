"""Episodes: list with filters, detail, edits of their descriptive metadata only, and
short-lived download links to their objects (MCAP, sidecar, QA previews)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sqlalchemy import ColumnElement
from sqlmodel import Session, col

from keystone_api.crud import ERRORS, MAX_OFFSET, NOT_FOUND
from keystone_api.deps import (
    CurrentPrincipal,
    PresignerDep,
    SessionDep,
    SettingsDep,
    StoreProbeDep,
)
from keystone_api.errors import ErrorBody
from keystone_api.schemas import IdStr, Page, RowId
from keystone_core.errors import ValidationFailed
from keystone_core.models import Episode, EpisodeStatus
from keystone_core.services import crud, episode_links
from keystone_core.services import production as svc
from keystone_core.services.episode_links import LinkKind
from keystone_core.services.production import EPISODES

router = APIRouter(prefix="/api/v1", tags=["episodes"])

Label = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]


class EpisodePatch(BaseModel):
    """Descriptive fields only: paths, checksums and QA results are evidence, never edited."""

    model_config = ConfigDict(extra="forbid")

    labels: list[Label] | None = Field(default=None, max_length=64)
    quality_flag: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(k for k, v in data.items() if v is None and k in cls.model_fields)
            if nulls:
                raise ValueError(f"{', '.join(nulls)} must not be null")
        return data


class EpisodePublic(BaseModel):
    id: IdStr
    episode_id: str
    task_id: IdStr
    task_public_id: str
    factory_id: IdStr
    order_id: IdStr
    batch_id: IdStr
    workstation_id: IdStr | None
    robot_id: IdStr | None
    device_id: str
    robot_device_id: str = Field(description="Same as device_id (name used by Synapse).")
    status: EpisodeStatus
    qa_status: EpisodeStatus = Field(description="Same as status (name used by Synapse).")
    auto_approved: bool
    sop_id: IdStr | None
    sop_slug: str
    sop_version: str
    scene_id: IdStr | None
    scene_name: str
    subscene_id: IdStr | None
    subscene_name: str
    recording_date: dt.date
    recording_started_at: dt.datetime | None
    duration_sec: float | None
    bucket: str
    mcap_path: str
    sidecar_path: str | None
    file_size_bytes: int | None
    checksum: str | None
    verified_at: dt.datetime | None
    qa_score: float | None
    approved_at: dt.datetime | None
    labels: list[str]
    quality_flag: str
    metadata: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime


def _episodes_public(session: Session, episodes: list[Episode]) -> list[EpisodePublic]:
    contexts = svc.episode_contexts(session, episodes)
    out = []
    for episode in episodes:
        assert episode.id is not None
        ctx = contexts.get(episode.id, svc.EpisodeContext())
        out.append(
            EpisodePublic(
                id=episode.id,
                episode_id=episode.episode_id,
                task_id=episode.task_id,
                task_public_id=ctx.task_public_id,
                factory_id=episode.factory_id,
                order_id=episode.order_id,
                batch_id=episode.batch_id,
                workstation_id=ctx.workstation_id,
                robot_id=episode.robot_id,
                device_id=episode.device_id,
                robot_device_id=episode.device_id,
                status=episode.status,
                qa_status=episode.status,
                auto_approved=episode.status is EpisodeStatus.AUTO_APPROVED,
                sop_id=ctx.sop_id,
                sop_slug=ctx.sop_slug,
                sop_version=ctx.sop_version,
                scene_id=ctx.scene_id,
                scene_name=ctx.scene_name,
                subscene_id=ctx.subscene_id,
                subscene_name=ctx.subscene_name,
                recording_date=episode.recording_date,
                recording_started_at=episode.recording_started_at,
                duration_sec=episode.duration_sec,
                bucket=episode.bucket,
                mcap_path=episode.mcap_path,
                sidecar_path=episode.sidecar_path,
                file_size_bytes=episode.file_size_bytes,
                checksum=episode.checksum,
                verified_at=episode.verified_at,
                qa_score=episode.qa_score,
                approved_at=episode.approved_at,
                labels=list(episode.labels),
                quality_flag=episode.quality_flag,
                metadata=episode.meta,
                created_at=episode.created_at,
                updated_at=episode.updated_at,
            )
        )
    return out


def episode_filters(
    status: Annotated[EpisodeStatus | None, Query(description="QA status.")] = None,
    factory_id: int | None = None,
    batch_id: int | None = None,
    order_id: int | None = None,
    task_id: int | None = None,
    device_id: Annotated[str | None, Query(max_length=64)] = None,
    date_from: Annotated[
        dt.date | None, Query(description="First recording date (UTC), inclusive.")
    ] = None,
    date_to: Annotated[
        dt.date | None, Query(description="Last recording date (UTC), inclusive.")
    ] = None,
) -> list[ColumnElement[bool]]:
    if date_from is not None and date_to is not None and date_from > date_to:
        raise ValidationFailed(
            f"date_from {date_from} is after date_to {date_to}",
            code="invalid_date_range",
            field="date_from",
        )
    where: list[ColumnElement[bool]] = []
    if status is not None:
        where.append(col(Episode.status) == status)
    if factory_id is not None:
        where.append(col(Episode.factory_id) == factory_id)
    if batch_id is not None:
        where.append(col(Episode.batch_id) == batch_id)
    if order_id is not None:
        where.append(col(Episode.order_id) == order_id)
    if task_id is not None:
        where.append(col(Episode.task_id) == task_id)
    if device_id is not None:
        where.append(col(Episode.device_id) == device_id)
    if date_from is not None:
        where.append(col(Episode.recording_date) >= date_from)
    if date_to is not None:
        where.append(col(Episode.recording_date) <= date_to)
    return where


EpisodeFilters = Annotated[list[ColumnElement[bool]], Depends(episode_filters)]


class EpisodePaging:
    """``limit`` (default 50; above 100 is clamped to 100) and ``offset``; episodes are never
    soft-deleted, so there is no ``include_deleted``."""

    def __init__(
        self,
        limit: Annotated[
            int, Query(ge=1, description="Page size; values above 100 give 100.")
        ] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> None:
        self.limit = crud.clamp_limit(limit)
        self.offset = offset


@router.get(
    "/episodes",
    response_model=Page[EpisodePublic],
    responses=ERRORS,
    summary="List episodes (a data collector sees its own stations' episodes)",
)
def list_episodes(
    principal: CurrentPrincipal,
    session: SessionDep,
    paging: Annotated[EpisodePaging, Depends()],
    where: EpisodeFilters,
) -> Page[EpisodePublic]:
    page = crud.list_rows(
        session, EPISODES, principal.scope, where=where, limit=paging.limit, offset=paging.offset
    )
    return Page[EpisodePublic](
        items=_episodes_public(session, page.items),
        total=page.total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get(
    "/episodes/{id}",
    response_model=EpisodePublic,
    responses={**ERRORS, **NOT_FOUND},
    summary="Get one episode",
)
def get_episode(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> EpisodePublic:
    episode = crud.get_row(session, EPISODES, principal.scope, id)
    return _episodes_public(session, [episode])[0]


@router.patch(
    "/episodes/{id}",
    response_model=EpisodePublic,
    responses={**ERRORS, **NOT_FOUND},
    summary="Edit an episode's labels, quality_flag or metadata (nothing else)",
)
def patch_episode(
    id: int, body: EpisodePatch, principal: CurrentPrincipal, session: SessionDep
) -> EpisodePublic:
    changes = body.model_dump(exclude_unset=True)
    episode = crud.update_row(session, EPISODES, principal.scope, principal.actor, id, changes)
    return _episodes_public(session, [episode])[0]


class EpisodeLink(BaseModel):
    episode_id: IdStr
    kind: LinkKind
    url: str = Field(description="Presigned GET URL of the object (`url`, as in the Go API).")
    expires_at: dt.datetime
    expires_in: int = Field(description="Seconds the URL stays valid.")
    bucket: str
    key: str


@router.get(
    "/episodes/{id}/presign",
    response_model=EpisodeLink,
    responses={
        **ERRORS,
        404: {
            "model": ErrorBody,
            "description": "no such episode in the caller's factories (`not_found`), or it "
            "has no such object — no sidecar, no preview yet, expired (`not_available`)",
        },
        503: {"model": ErrorBody, "description": "the object store cannot be reached"},
    },
    summary="A short-lived download link to the episode's MCAP, sidecar or a QA preview",
)
def presign_episode_object(
    id: RowId,
    principal: CurrentPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    presigner: PresignerDep,
    store: StoreProbeDep,
    kind: Annotated[
        LinkKind,
        Query(description="mcap | sidecar | contact_sheet | rate_timeline (QA previews)."),
    ] = "mcap",
) -> EpisodeLink:
    found = episode_links.link(
        session,
        principal.scope,
        id,
        kind,
        settings=settings,
        s3=store,
        presigner=presigner,
    )
    return EpisodeLink(
        episode_id=id,
        kind=kind,
        url=found.url,
        expires_at=found.expires_at,
        expires_in=found.expires_in,
        bucket=found.bucket,
        key=found.key,
    )
