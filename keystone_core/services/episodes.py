"""Episode QA bookkeeping that is not a QA check itself (leases, recovery)."""

from __future__ import annotations

from sqlalchemy import or_
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import TransitionConflict
from keystone_core.models import Episode, EpisodeStatus
from keystone_core.states import transition_episode


def release_expired_qa_leases(session: Session, *, limit: int = 500) -> list[int]:
    """Return episodes whose QA lease expired to ``pending_qa``; ids of those released.

    A QA run that died (process killed, host lost) leaves ``qa_running`` behind; without
    this the episode would never be scored. Each release is a conditional update, so a
    run that finishes at the same moment wins or loses cleanly.
    """
    now = clock.now()
    expired = session.exec(
        select(Episode.id)
        .where(
            Episode.status == EpisodeStatus.QA_RUNNING,
            # A running episode without a lease was claimed by a broken path: recover it too.
            or_(col(Episode.qa_lease_expires_at) < now, col(Episode.qa_lease_expires_at).is_(None)),
        )
        .order_by(col(Episode.qa_lease_expires_at))
        .limit(limit)
    ).all()
    released: list[int] = []
    for episode_id in expired:
        assert episode_id is not None
        try:
            transition_episode(
                session,
                episode_id,
                EpisodeStatus.PENDING_QA,
                expected={EpisodeStatus.QA_RUNNING},
                values={"qa_lease_owner": None, "qa_lease_expires_at": None},
            )
        except TransitionConflict:
            continue  # finished or released by someone else meanwhile
        released.append(episode_id)
    return released
