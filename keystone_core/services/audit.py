"""Who did what: the actor of a change and the audit-log row that records it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from keystone_core.models import AuditLog


@dataclass(frozen=True)
class Actor:
    """The principal behind a change: a user, a device or Keystone itself."""

    type: str
    id: str = ""
    account: str = ""
    request_id: str | None = None
    role: str = ""
    route: str = ""

    @classmethod
    def system(cls, name: str = "keystone", request_id: str | None = None) -> Actor:
        return cls(type="system", id=name, account=name, request_id=request_id)


def record_audit(
    session: Session,
    actor: Actor,
    action: str,
    *,
    entity_type: str,
    entity_id: str | int,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    factory_id: int | None = None,
) -> AuditLog:
    """Add an audit row to the caller's transaction (committed with the change itself)."""
    row = AuditLog(
        actor_type=actor.type,
        actor_id=actor.id,
        actor_account=actor.account,
        actor_role=actor.role,
        route=actor.route,
        action=action,
        entity_type=entity_type,
        entity_id=str(entity_id),
        before=before,
        after=after,
        factory_id=factory_id,
        request_id=actor.request_id,
    )
    session.add(row)
    return row
