"""Human inspection of the episodes QA could not decide: queue, claims, decisions, stats.

A claim is an ``inspections`` row with a lease: while it is live no other inspector can
claim or decide the episode; when it expires the episode is back in everyone's queue.
Claims and decisions lock the episode row first, so two inspectors racing for the same
episode are served one after the other — one wins, the other gets 409 ``claimed``. A
decision moves the episode through the state machine (``needs_inspection →
inspector_approved | rejected``), counts an approval on the order in the same
transaction, writes its ``episode.approved`` / ``episode.rejected`` outbox event, closes
the claim and is audited; the inspection rows keep the history.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, or_
from sqlmodel import Session, col, func, select

from keystone_core import clock
from keystone_core.errors import ConflictError, NotFoundError
from keystone_core.models import (
    Episode,
    EpisodeStatus,
    Inspection,
    InspectionDecision,
    QAResult,
    SyncTarget,
)
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.outbox import EventType, emit_episode_event
from keystone_core.services.production import record_approval
from keystone_core.services.scope import Scope
from keystone_core.states import transition_episode


def _visible(scope: Scope) -> ColumnElement[bool] | None:
    if scope.factory_ids is None:
        return None
    return col(Episode.factory_id).in_(sorted(scope.factory_ids))


def _live_claims(now: dt.datetime) -> Any:
    return (
        select(Inspection.episode_id)
        .where(col(Inspection.decided_at).is_(None), col(Inspection.lease_expires_at) > now)
        .subquery()
    )


@dataclass(frozen=True)
class QueueEntry:
    episode: Episode
    failing: list[dict[str, Any]]
    claimed_by: int | None
    claim_expires_at: dt.datetime | None


def queue(
    session: Session, scope: Scope, *, user_id: int, limit: int, offset: int
) -> tuple[list[QueueEntry], int]:
    """``needs_inspection`` episodes in scope, oldest first: unclaimed ones and the
    caller's own claims (another inspector's live claim hides an episode)."""
    now = clock.now()
    others = (
        select(Inspection.episode_id)
        .where(
            col(Inspection.decided_at).is_(None),
            col(Inspection.lease_expires_at) > now,
            or_(col(Inspection.user_id).is_(None), col(Inspection.user_id) != user_id),
        )
        .subquery()
    )
    where: list[ColumnElement[bool]] = [
        col(Episode.status) == EpisodeStatus.NEEDS_INSPECTION,
        col(Episode.id).not_in(select(others.c.episode_id)),
    ]
    visible = _visible(scope)
    if visible is not None:
        where.append(visible)
    total = int(session.exec(select(func.count()).select_from(Episode).where(*where)).one())
    episodes = list(
        session.exec(
            select(Episode).where(*where).order_by(col(Episode.id)).offset(offset).limit(limit)
        ).all()
    )
    ids = [e.id for e in episodes]
    failing: dict[int, list[dict[str, Any]]] = {}
    claims: dict[int, Inspection] = {}
    if ids:
        for result in session.exec(
            select(QAResult)
            .where(col(QAResult.episode_id).in_(ids))
            .order_by(col(QAResult.id).desc())
        ):
            if result.episode_id not in failing:  # newest result only
                failing[result.episode_id] = [
                    {"name": c.get("name"), "reason": c.get("reason")}
                    for c in result.checks
                    if c.get("passed") is False
                ]
        for held in session.exec(
            select(Inspection).where(
                col(Inspection.episode_id).in_(ids),
                col(Inspection.decided_at).is_(None),
                col(Inspection.lease_expires_at) > now,
            )
        ):
            claims[held.episode_id] = held
    out = []
    for episode in episodes:
        assert episode.id is not None
        mine = claims.get(episode.id)
        out.append(
            QueueEntry(
                episode,
                failing.get(episode.id, []),
                mine.user_id if mine else None,
                mine.lease_expires_at if mine else None,
            )
        )
    return out, total


def _locked_episode(session: Session, scope: Scope, episode_id: int) -> Episode:
    query = select(Episode).where(col(Episode.id) == episode_id).with_for_update()
    visible = _visible(scope)
    if visible is not None:
        query = query.where(visible)
    episode = session.exec(query).one_or_none()
    if episode is None:
        raise NotFoundError(f"episode {episode_id} not found")
    return episode


def _needs_inspection(episode: Episode) -> None:
    if episode.status != EpisodeStatus.NEEDS_INSPECTION:
        raise ConflictError(
            f"episode {episode.id} is {episode.status.value}, not needs_inspection",
            code="invalid_transition",
            current_status=episode.status.value,
        )


def _live_claim(session: Session, episode_id: int, now: dt.datetime) -> Inspection | None:
    return session.exec(
        select(Inspection)
        .where(
            col(Inspection.episode_id) == episode_id,
            col(Inspection.decided_at).is_(None),
            col(Inspection.lease_expires_at) > now,
        )
        .order_by(col(Inspection.id).desc())
    ).first()


def _refuse_others(claim: Inspection | None, user_id: int) -> None:
    if claim is not None and claim.user_id != user_id:
        raise ConflictError(
            "another inspector is reviewing this episode",
            code="claimed",
            claimed_by=str(claim.user_id),
            claim_expires_at=claim.lease_expires_at.isoformat() if claim.lease_expires_at else None,
        )


def _take(
    session: Session, scope: Scope, episode_id: int, user_id: int, inspector_id: int | None
) -> tuple[Episode, Inspection, dt.datetime]:
    """Lock the episode, check it waits for a person and nobody else holds it; the
    caller's live claim, or a new (unsaved) one."""
    episode = _locked_episode(session, scope, episode_id)
    _needs_inspection(episode)
    now = clock.now()
    current = _live_claim(session, episode_id, now)
    _refuse_others(current, user_id)
    if current is None:
        current = Inspection(
            episode_id=episode_id, user_id=user_id, inspector_id=inspector_id, claimed_at=now
        )
    return episode, current, now


def claim(
    session: Session,
    scope: Scope,
    episode_id: int,
    *,
    user_id: int,
    inspector_id: int | None,
    lease: dt.timedelta,
) -> Inspection:
    """Claim (or extend the caller's claim on) an episode for ``lease``."""
    _episode, current, now = _take(session, scope, episode_id, user_id, inspector_id)
    current.lease_expires_at = now + lease
    session.add(current)
    session.flush()
    return current


def decide(
    session: Session,
    scope: Scope,
    episode_id: int,
    *,
    actor: Actor,
    user_id: int,
    inspector_id: int | None,
    decision: InspectionDecision,
    reason: str,
    failed_tags: list[str],
    sync_target: SyncTarget | None,
) -> Inspection:
    """Approve or reject. Without a claim of the caller's own, the decision claims and
    closes in one step — unless another inspector holds a live claim (409 ``claimed``)."""
    episode, inspection, now = _take(session, scope, episode_id, user_id, inspector_id)
    inspection.decision = decision
    inspection.reason = reason
    inspection.failed_tags = failed_tags
    inspection.decided_at = now
    inspection.lease_expires_at = None
    session.add(inspection)
    approved = decision == InspectionDecision.APPROVED
    target = EpisodeStatus.INSPECTOR_APPROVED if approved else EpisodeStatus.REJECTED
    transition_episode(
        session,
        episode_id,
        target,
        expected={EpisodeStatus.NEEDS_INSPECTION},
        values={"approved_at": now} if approved else None,
    )
    decided = {"decided_by": str(user_id), "reason": reason[:500], "failed_tags": failed_tags}
    if approved:
        record_approval(
            session,
            episode_id,
            sync_target=sync_target,
            details=decided,
            request_id=actor.request_id,
        )
    else:
        emit_episode_event(
            session,
            EventType.EPISODE_REJECTED,
            episode_id,
            request_id=actor.request_id,
            **decided,
        )
    record_audit(
        session,
        actor,
        f"episode.inspection.{decision.value}",
        entity_type="episode",
        entity_id=episode_id,
        before={"status": EpisodeStatus.NEEDS_INSPECTION.value},
        after={"status": target.value, "reason": reason, "failed_tags": failed_tags},
        factory_id=episode.factory_id,
    )
    session.flush()
    return inspection


@dataclass(frozen=True)
class InspectorStats:
    user_id: int
    approved: int
    rejected: int
    median_review_s: float | None


@dataclass(frozen=True)
class Stats:
    waiting: int
    claimed: int
    oldest_waiting_s: float | None
    inspectors: list[InspectorStats]


def stats(session: Session, scope: Scope, *, since: dt.datetime) -> Stats:
    """Queue size and age, live claims, and decisions per inspector since ``since``."""
    now = clock.now()
    visible = _visible(scope)
    waiting_where: list[ColumnElement[bool]] = [
        col(Episode.status) == EpisodeStatus.NEEDS_INSPECTION
    ]
    if visible is not None:
        waiting_where.append(visible)
    waiting, oldest = session.exec(
        select(func.count(), func.min(Episode.updated_at)).where(*waiting_where)
    ).one()
    live = _live_claims(now)
    claimed = session.exec(
        select(func.count())
        .select_from(Episode)
        .where(*waiting_where, col(Episode.id).in_(select(live.c.episode_id)))
    ).one()
    decided_where: list[ColumnElement[bool]] = [
        col(Inspection.decided_at).is_not(None),
        col(Inspection.decided_at) >= since,
    ]
    rows = session.exec(
        select(Inspection, Episode.factory_id)
        .join(Episode, and_(col(Episode.id) == col(Inspection.episode_id)))
        .where(*decided_where, *([visible] if visible is not None else []))
    ).all()
    per_user: dict[int, list[Inspection]] = {}
    for inspection, _factory in rows:
        if inspection.user_id is not None:
            per_user.setdefault(inspection.user_id, []).append(inspection)
    inspectors = []
    for uid, decided in sorted(per_user.items()):
        durations = sorted(
            (i.decided_at - i.claimed_at).total_seconds() for i in decided if i.decided_at
        )
        inspectors.append(
            InspectorStats(
                user_id=uid,
                approved=sum(1 for i in decided if i.decision == InspectionDecision.APPROVED),
                rejected=sum(1 for i in decided if i.decision == InspectionDecision.REJECTED),
                median_review_s=round(durations[len(durations) // 2], 1) if durations else None,
            )
        )
    return Stats(
        waiting=int(waiting),
        claimed=int(claimed),
        oldest_waiting_s=round((now - oldest).total_seconds(), 1) if oldest else None,
        inspectors=inspectors,
    )
