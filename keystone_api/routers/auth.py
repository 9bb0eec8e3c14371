"""Sign-in and the caller's own account."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from keystone_api.deps import CurrentPrincipal, SessionDep, SettingsDep
from keystone_api.errors import ErrorBody
from keystone_api.ratelimits import LOGIN, client_ip, hit
from keystone_api.schemas import LoginRequest, MeResponse, PasswordChange, TokenResponse
from keystone_core.models import Role
from keystone_core.security import issue_access_token
from keystone_core.services.accounts import (
    authenticate,
    change_password,
    factory_ids_of,
    normalize_account,
    revoke_token,
)

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post(
    "/login",
    response_model=TokenResponse,
    responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
)
def login(
    body: LoginRequest, request: Request, session: SessionDep, settings: SettingsDep
) -> TokenResponse:
    """Exchange account and password for a bearer token (rate-limited per IP and account)."""
    hit(
        request,
        LOGIN,
        f"login:ip:{client_ip(request)}",
        f"login:account:{normalize_account(body.account)}",
    )
    user = authenticate(session, body.account, body.password)
    assert user.id is not None
    scope = factory_ids_of(session, user.id)
    token, expires_in = issue_access_token(
        settings, subject=str(user.id), role=Role(user.role), factory_ids=scope
    )
    return TokenResponse(access_token=token, expires_in=expires_in, role=Role(user.role))


@router.get("/me", response_model=MeResponse, responses={401: {"model": ErrorBody}})
def me(principal: CurrentPrincipal) -> MeResponse:
    """The signed-in account, its role and factory scope (empty = all, admin only)."""
    user = principal.user
    return MeResponse(
        id=str(user.id),
        account=user.account,
        role=principal.role,
        display_name=user.display_name,
        factory_ids=[str(f) for f in principal.factory_ids],
        data_collector_id=None if user.data_collector_id is None else str(user.data_collector_id),
        inspector_id=None if user.inspector_id is None else str(user.inspector_id),
    )


@router.post(
    "/logout",
    status_code=204,
    response_class=Response,
    responses={401: {"model": ErrorBody}},
)
def logout(principal: CurrentPrincipal, session: SessionDep) -> Response:
    """Revoke this token (its ``jti``) until it expires."""
    assert principal.user.id is not None
    revoke_token(
        session,
        jti=principal.jti,
        user_id=principal.user.id,
        expires_at=principal.expires_at,
        actor=principal.actor,
    )
    return Response(status_code=204)


@router.post(
    "/password",
    status_code=204,
    response_class=Response,
    responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
def password(body: PasswordChange, principal: CurrentPrincipal, session: SessionDep) -> Response:
    """Change the caller's own password (the current one is required)."""
    change_password(
        session,
        principal.user,
        current_password=body.current_password,
        new_password=body.new_password,
        actor=principal.actor,
    )
    return Response(status_code=204)
