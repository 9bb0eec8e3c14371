"""Sign-in and the caller's own account."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from keystone_api.deps import ALL_ROLES, Principal, SessionDep, SettingsDep, allow, public
from keystone_api.errors import ErrorBody
from keystone_api.schemas import LoginRequest, MeResponse, TokenResponse
from keystone_core.models import Role
from keystone_core.security import issue_access_token
from keystone_core.services.accounts import authenticate, factory_ids_of

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post(
    "/login",
    response_model=TokenResponse,
    dependencies=[Depends(public("sign-in"))],
    responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
def login(body: LoginRequest, session: SessionDep, settings: SettingsDep) -> TokenResponse:
    """Exchange account and password for a bearer token."""
    user = authenticate(session, body.account, body.password)
    assert user.id is not None
    scope = factory_ids_of(session, user.id)
    token, expires_in = issue_access_token(
        settings, subject=str(user.id), role=Role(user.role), factory_ids=scope
    )
    return TokenResponse(access_token=token, expires_in=expires_in, role=Role(user.role))


@router.get("/me", response_model=MeResponse, responses={401: {"model": ErrorBody}})
def me(principal: Annotated[Principal, Depends(allow(*ALL_ROLES))]) -> MeResponse:
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
