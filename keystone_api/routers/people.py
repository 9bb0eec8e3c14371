"""People: data collectors (operators), inspectors and login accounts (users)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, exists, select
from sqlmodel import col

from keystone_api.crud import CONFLICT, ERRORS, NOT_FOUND, PagingDep, add_crud_routes, equal_to
from keystone_api.deps import CurrentPrincipal, SessionDep
from keystone_api.schemas import IdStr, Metadata, Page, PartialUpdate, RowId
from keystone_core.models import DataCollector, Inspector, Role, User, UserFactory, Workstation
from keystone_core.services import accounts, crud
from keystone_core.services.crud import Family, Guard

router = APIRouter(prefix="/api/v1", tags=["people"])

PERSON_ID = r"^\S+$"
EMAIL = r"^$|^[^@\s]+@[^@\s]+$"
ACCOUNT = r"^\s*\S+\s*$"  # surrounding spaces are stripped (normalize_account)

CollectorStatus = Literal["active", "inactive", "on_leave"]
InspectorStatus = Literal["active", "inactive"]
CertificationLevel = Literal["level_1", "level_2", "senior"]


DATA_COLLECTORS = Family(
    model=DataCollector,
    entity="data_collector",
    unique=(("factory_id", "operator_id"),),
    guards=(
        Guard(Workstation, "data_collector_id", "stations"),
        Guard(User, "data_collector_id", "user accounts"),
    ),
)

INSPECTORS = Family(
    model=Inspector,
    entity="inspector",
    unique=(("factory_id", "inspector_id"),),
    guards=(Guard(User, "inspector_id", "user accounts"),),
)


class DataCollectorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory_id: int
    name: str = Field(min_length=1, max_length=128)
    operator_id: str = Field(min_length=1, max_length=100, pattern=PERSON_ID)
    email: str = Field(default="", max_length=255, pattern=EMAIL)
    certification: str = Field(default="", max_length=100)
    status: CollectorStatus = "active"
    metadata: dict[str, Any] = Field(default_factory=dict)


class DataCollectorUpdate(PartialUpdate):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    operator_id: str | None = Field(default=None, min_length=1, max_length=100, pattern=PERSON_ID)
    email: str | None = Field(default=None, max_length=255, pattern=EMAIL)
    certification: str | None = Field(default=None, max_length=100)
    status: CollectorStatus | None = None
    metadata: dict[str, Any] | None = None


class DataCollectorPublic(BaseModel):
    id: IdStr
    factory_id: IdStr
    name: str
    operator_id: str
    email: str
    certification: str
    status: str
    metadata: Metadata
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def data_collector_filters(
    factory_id: int | None = None,
    status: CollectorStatus | None = None,
    operator_id: Annotated[str | None, Query(max_length=100)] = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if factory_id is not None:
        where.append(col(DataCollector.factory_id) == factory_id)
    if status is not None:
        where.append(col(DataCollector.status) == status)
    if operator_id is not None:
        where.append(col(DataCollector.operator_id) == operator_id)
    return where


class InspectorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factory_id: int
    name: str = Field(min_length=1, max_length=128)
    inspector_id: str = Field(min_length=1, max_length=100, pattern=PERSON_ID)
    email: str = Field(default="", max_length=255, pattern=EMAIL)
    certification_level: CertificationLevel = "level_1"
    status: InspectorStatus = "active"
    metadata: dict[str, Any] = Field(default_factory=dict)


class InspectorUpdate(PartialUpdate):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    inspector_id: str | None = Field(default=None, min_length=1, max_length=100, pattern=PERSON_ID)
    email: str | None = Field(default=None, max_length=255, pattern=EMAIL)
    certification_level: CertificationLevel | None = None
    status: InspectorStatus | None = None
    metadata: dict[str, Any] | None = None


class InspectorPublic(BaseModel):
    id: IdStr
    factory_id: IdStr
    name: str
    inspector_id: str
    email: str
    certification_level: str
    status: str
    metadata: Metadata
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def inspector_filters(
    factory_id: int | None = None, status: InspectorStatus | None = None
) -> list[ColumnElement[bool]]:
    return equal_to(Inspector, factory_id=factory_id, status=status)


add_crud_routes(
    router,
    "/data_collectors",
    DATA_COLLECTORS,
    public=DataCollectorPublic,
    create=DataCollectorCreate,
    update=DataCollectorUpdate,
    filters=data_collector_filters,
)
add_crud_routes(
    router,
    "/inspectors",
    INSPECTORS,
    public=InspectorPublic,
    create=InspectorCreate,
    update=InspectorUpdate,
    filters=inspector_filters,
)


# Users: their factory scope lives in a join table and creation hashes a password, so these
# routes call the account service instead of the generic CRUD builder.


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: str = Field(min_length=1, max_length=64, pattern=ACCOUNT)
    password: str = Field(min_length=accounts.MIN_PASSWORD_LENGTH, max_length=1024)
    role: Role
    factory_ids: list[int] = Field(
        default_factory=list,
        max_length=1000,
        description="The account's factories; empty means every factory (admins only).",
    )
    display_name: str = Field(default="", max_length=128)
    data_collector_id: int | None = Field(
        default=None, description="For a data_collector account: its operator row."
    )
    inspector_id: int | None = Field(
        default=None, description="For a data_inspector account: its inspector row."
    )


class UserUpdate(PartialUpdate):
    nullable: ClassVar[frozenset[str]] = frozenset({"data_collector_id", "inspector_id"})

    display_name: str | None = Field(default=None, max_length=128)
    role: Role | None = Field(
        default=None, description="Signs the account out: its tokens carry the old role."
    )
    is_active: bool | None = None
    factory_ids: list[int] | None = Field(
        default=None, max_length=1000, description="Applies from the account's next sign-in."
    )
    password: str | None = Field(
        default=None, min_length=accounts.MIN_PASSWORD_LENGTH, max_length=1024
    )
    data_collector_id: int | None = None
    inspector_id: int | None = None


class UserPublic(BaseModel):
    """An account; the password hash never leaves the server."""

    id: IdStr
    account: str
    role: Role
    display_name: str
    is_active: bool
    factory_ids: list[IdStr]
    data_collector_id: IdStr | None
    inspector_id: IdStr | None
    last_login_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


def _user_public(user: User, factory_ids: list[int]) -> UserPublic:
    return UserPublic(
        id=str(user.id),
        account=user.account,
        role=Role(user.role),
        display_name=user.display_name,
        is_active=user.is_active,
        factory_ids=[str(f) for f in factory_ids],
        data_collector_id=None if user.data_collector_id is None else str(user.data_collector_id),
        inspector_id=None if user.inspector_id is None else str(user.inspector_id),
        last_login_at=user.last_login_at,
        created_at=user.created_at,
        updated_at=user.updated_at,
        deleted_at=user.deleted_at,
    )


@router.get(
    "/users",
    response_model=Page[UserPublic],
    summary="List user rows",
    responses=ERRORS,
    name="user.list",
)
def list_users(
    principal: CurrentPrincipal,
    session: SessionDep,
    paging: PagingDep,
    role: Role | None = None,
    is_active: bool | None = None,
    factory_id: int | None = None,
    account: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[UserPublic]:
    where: list[ColumnElement[bool]] = []
    if role is not None:
        where.append(col(User.role) == role)
    if is_active is not None:
        where.append(col(User.is_active) == is_active)
    if factory_id is not None:
        where.append(
            exists(
                select(col(UserFactory.user_id)).where(
                    col(UserFactory.user_id) == col(User.id),
                    col(UserFactory.factory_id) == factory_id,
                )
            )
        )
    if account is not None:
        where.append(col(User.account) == accounts.normalize_account(account))
    page = paging.rows(session, accounts.USERS, principal.scope, where)
    scopes = accounts.factory_ids_by_user(session, [u.id for u in page.items if u.id is not None])
    return Page[UserPublic](
        items=[_user_public(u, scopes.get(u.id or 0, [])) for u in page.items],
        total=page.total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post(
    "/users",
    status_code=201,
    response_model=UserPublic,
    summary="Create a user",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="user.create",
)
def create_user(body: UserCreate, principal: CurrentPrincipal, session: SessionDep) -> UserPublic:
    """Create an account with its role, factories and (for collectors/inspectors) person row."""
    user = accounts.create_account(
        session,
        account=body.account,
        password=body.password,
        role=body.role,
        factory_ids=body.factory_ids,
        display_name=body.display_name,
        data_collector_id=body.data_collector_id,
        inspector_id=body.inspector_id,
        scope=principal.scope,
        actor=principal.actor,
    )
    assert user.id is not None
    return _user_public(user, accounts.factory_ids_of(session, user.id))


@router.get(
    "/users/{id}",
    response_model=UserPublic,
    summary="Get one user",
    responses={**ERRORS, **NOT_FOUND},
    name="user.get",
)
def get_user(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> UserPublic:
    user = crud.get_row(session, accounts.USERS, principal.scope, id)
    return _user_public(user, accounts.factory_ids_of(session, id))


@router.put(
    "/users/{id}",
    response_model=UserPublic,
    summary="Update a user",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="user.update",
)
def update_user(
    id: int, body: UserUpdate, principal: CurrentPrincipal, session: SessionDep
) -> UserPublic:
    """Change an account. A role change or deactivation ends its sessions at once; new
    factories and a new password apply from its next sign-in. Nobody changes their own role,
    deactivates or deletes themselves (409)."""
    changes = body.model_dump(exclude_unset=True)
    user = accounts.update_account(
        session, id, changes, scope=principal.scope, actor=principal.actor
    )
    return _user_public(user, accounts.factory_ids_of(session, id))


@router.delete(
    "/users/{id}",
    status_code=204,
    response_class=Response,
    summary="Delete a user",
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    name="user.delete",
)
def delete_user(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Response:
    """Soft delete: the account stops signing in; audit history keeps its name."""
    accounts.delete_account(session, id, scope=principal.scope, actor=principal.actor)
    return Response(status_code=204)
