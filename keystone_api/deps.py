"""Request dependencies: settings, a DB session, the authenticated principal and role lists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_api.access import ROUTE_ACCESS, Device, Public
from keystone_core.db import session_scope
from keystone_core.errors import AuthenticationError, PermissionDeniedError
from keystone_core.models import Role, User
from keystone_core.security import decode_access_token
from keystone_core.services.accounts import token_holder
from keystone_core.services.audit import Actor
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings
from keystone_core.storage import create_presign_client


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
    jti: str
    expires_at: int
    request_id: str | None
    route: str = ""

    @property
    def all_factories(self) -> bool:
        return self.role is Role.ADMIN and not self.factory_ids

    def can_see_factory(self, factory_id: int) -> bool:
        return self.all_factories or factory_id in self.factory_ids

    @property
    def scope(self) -> Scope:
        return Scope(
            role=self.role,
            factory_ids=None if self.all_factories else frozenset(self.factory_ids),
            user_id=self.user.id,
            data_collector_id=self.user.data_collector_id,
            inspector_id=self.user.inspector_id,
        )

    @property
    def actor(self) -> Actor:
        return Actor(
            type="user",
            id=str(self.user.id),
            account=self.user.account,
            request_id=self.request_id,
            role=self.role.value,
            route=self.route,
        )


def _authenticate(
    request: Request,
    settings: Settings,
    session: Session,
    credentials: HTTPAuthorizationCredentials | None,
    route: str,
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
    user, factory_ids = token_holder(session, user_id, claims.jti)
    # The token's role and scope must still hold: a changed account needs a new login.
    if user.role != claims.role:
        raise AuthenticationError("account role changed; sign in again", code="invalid_token")
    if sorted(claims.factory_ids) != factory_ids:
        raise AuthenticationError("factory scope changed; sign in again", code="invalid_token")
    return Principal(
        user=user,
        role=claims.role,
        factory_ids=claims.factory_ids,
        jti=claims.jti,
        expires_at=claims.exp,
        request_id=getattr(request.state, "request_id", None),
        route=route,
    )


def authorize(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal | None:
    """Apply the route's rule from :data:`keystone_api.access.ROUTE_ACCESS` to the caller."""
    route = request.scope.get("route")
    template = getattr(route, "path", request.url.path)
    rule = ROUTE_ACCESS.get((request.method, template))
    if rule is None:  # create_app refuses such an app; this guards against HEAD and the like
        raise PermissionDeniedError("no access rule for this route", code="forbidden")
    if isinstance(rule, Public | Device):
        return None  # open, or the handler checks a device or task token
    principal = _authenticate(
        request, settings, session, credentials, f"{request.method} {template}"
    )
    # Hand the connection back now: a route that then waits (a device RPC, an event
    # stream) must not hold a pooled connection for the whole wait. The next query of
    # the request starts a new transaction.
    session.commit()
    if principal.role not in rule:
        raise PermissionDeniedError(
            f"role {principal.role.value} may not call {request.method} {template}",
            code="forbidden",
        )
    return principal


def current_principal(
    principal: Annotated[Principal | None, Depends(authorize)],
) -> Principal:
    if principal is None:
        raise AuthenticationError("this route needs a signed-in caller", code="missing_token")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def get_presigner(request: Request) -> Any:
    """The client that signs download links (for ``s3_public_endpoint_url``); made once
    per app on first use — it never connects, so it needs no start-up check."""
    presigner = getattr(request.app.state, "s3_presign", None)
    if presigner is None:
        presigner = create_presign_client(get_app_settings(request))
        request.app.state.s3_presign = presigner
    return presigner


def get_store_probe(request: Request) -> Any:
    """The object-store client for quick checks (one attempt, ~3 s at most)."""
    return request.app.state.s3_probe


# boto3 clients are typed ``S3Client`` only under TYPE_CHECKING: ``Any`` here.
PresignerDep = Annotated[Any, Depends(get_presigner)]
StoreProbeDep = Annotated[Any, Depends(get_store_probe)]
