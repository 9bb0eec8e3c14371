"""Request dependencies: settings, a DB session, the authenticated principal and role lists."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_core.db import session_scope
from keystone_core.errors import AuthenticationError, PermissionDeniedError
from keystone_core.models import Role, User
from keystone_core.security import decode_access_token
from keystone_core.services.accounts import get_active_user
from keystone_core.services.audit import Actor
from keystone_core.settings import Settings


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; commits when the handler returns, rolls back on error."""
    with session_scope(get_engine(request)) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <access_token>`")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of a request."""

    user: User
    role: Role
    factory_ids: tuple[int, ...]
    request_id: str | None

    @property
    def all_factories(self) -> bool:
        return self.role is Role.ADMIN and not self.factory_ids

    def can_see_factory(self, factory_id: int) -> bool:
        return self.all_factories or factory_id in self.factory_ids

    @property
    def actor(self) -> Actor:
        return Actor(
            type="user",
            id=str(self.user.id),
            account=self.user.account,
            request_id=self.request_id,
        )


def get_principal(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise AuthenticationError(
            "missing bearer token (Authorization: Bearer <token>)", code="missing_token"
        )
    claims = decode_access_token(settings, credentials.credentials)
    try:
        user_id = int(claims.sub)
    except ValueError:
        raise AuthenticationError("access token is invalid", code="invalid_token") from None
    user = get_active_user(session, user_id)
    # The token's role and scope must still hold: a changed account needs a new login.
    if user.role != claims.role:
        raise AuthenticationError("account role changed; sign in again", code="invalid_token")
    return Principal(
        user=user,
        role=claims.role,
        factory_ids=claims.factory_ids,
        request_id=getattr(request.state, "request_id", None),
    )


def allow(*roles: Role) -> Callable[..., Principal]:
    """A dependency that admits only ``roles``; every non-public route declares one."""
    allowed = frozenset(roles)

    def dependency(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if principal.role not in allowed:
            raise PermissionDeniedError(
                f"role {principal.role.value} may not do this", code="forbidden"
            )
        return principal

    dependency.allowed_roles = allowed  # type: ignore[attr-defined]
    return dependency


def public(reason: str) -> Callable[[], None]:
    """Mark a route as deliberately unauthenticated (health, login, metrics, device bootstrap)."""

    def dependency() -> None:
        return None

    dependency.public_reason = reason  # type: ignore[attr-defined]
    return dependency


ALL_ROLES = tuple(Role)
