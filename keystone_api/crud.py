"""Build the five routes of a CRUD family (list, create, get, update, delete) from its schemas.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures built
below at runtime, and they refer to the schema classes passed in.
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel
from sqlalchemy import ColumnElement
from sqlmodel import Session, SQLModel

from keystone_api.deps import CurrentPrincipal, SessionDep, SettingsDep
from keystone_api.errors import ErrorBody
from keystone_api.schemas import Page, RowId
from keystone_core.services import crud
from keystone_core.services.audit import Actor
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings

M = TypeVar("M", bound=SQLModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing, expired or revoked token"},
    403: {"model": ErrorBody, "description": "the caller's role may not do this"},
    422: {"model": ErrorBody, "description": "invalid input"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such row in the caller's factories"}
}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "duplicate, wrong state or still referenced"}
}


MAX_OFFSET = 1_000_000_000


def equal_to(model: type[SQLModel], **values: Any) -> list[ColumnElement[bool]]:
    """``column == value`` for every filter the caller gave (``None`` means not given)."""
    return [getattr(model, name) == value for name, value in values.items() if value is not None]


def no_filters() -> list[ColumnElement[bool]]:
    return []


class Paging:
    """``limit`` (default 50; above 100 is clamped to 100) and ``offset``."""

    def __init__(
        self,
        limit: Annotated[
            int, Query(ge=1, description="Page size; values above 100 give 100.")
        ] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        include_deleted: Annotated[bool, Query(description="Also list soft-deleted rows.")] = False,
    ) -> None:
        self.limit = crud.clamp_limit(limit)
        self.offset = offset
        self.include_deleted = include_deleted

    def rows(
        self,
        session: Session,
        family: crud.Family[M],
        scope: Scope,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> crud.Page[M]:
        """This page of ``family``'s rows visible to ``scope``."""
        return crud.list_rows(
            session,
            family,
            scope,
            where=where,
            limit=self.limit,
            offset=self.offset,
            include_deleted=self.include_deleted,
        )


PagingDep = Annotated[Paging, Depends()]


def add_crud_routes(
    router: APIRouter,
    path: str,
    family: crud.Family[M],
    *,
    public: type[BaseModel],
    create: type[BaseModel] | None,
    update: type[BaseModel] | None,
    filters: Callable[..., Sequence[ColumnElement[bool]]] = no_filters,
    update_method: str = "PUT",
    delete: bool = True,
    before_delete: Callable[[Session, int, Scope], None] | None = None,
    after_delete: Callable[[Session, Settings, Actor, int], None] | None = None,
) -> None:
    """Mount list/create/get/update/delete for ``family`` under ``path`` on ``router``."""
    entity = family.entity
    page_model = Page[public]  # type: ignore[valid-type]

    def to_public(row: Any) -> Any:
        return public.model_validate(row, from_attributes=True)

    def list_items(
        principal: CurrentPrincipal,
        session: SessionDep,
        paging: PagingDep,
        where: Annotated[Sequence[ColumnElement[bool]], Depends(filters)],
    ) -> Any:
        page = paging.rows(session, family, principal.scope, where)
        return page_model(
            items=[to_public(r) for r in page.items],
            total=page.total,
            limit=page.limit,
            offset=page.offset,
        )

    router.add_api_route(
        path,
        list_items,
        methods=["GET"],
        response_model=page_model,
        summary=f"List {entity} rows",
        responses=ERRORS,
        name=f"{entity}.list",
    )

    def get_item(id: RowId, principal: CurrentPrincipal, session: SessionDep) -> Any:
        return to_public(crud.get_row(session, family, principal.scope, id))

    router.add_api_route(
        f"{path}/{{id}}",
        get_item,
        methods=["GET"],
        response_model=public,
        summary=f"Get one {entity}",
        responses={**ERRORS, **NOT_FOUND},
        name=f"{entity}.get",
    )

    if create is not None:
        create_model = create

        def create_item(
            body: create_model,  # type: ignore[valid-type]
            principal: CurrentPrincipal,
            session: SessionDep,
        ) -> Any:
            values = body.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
            row = crud.create_row(session, family, principal.scope, principal.actor, values)
            return to_public(row)

        router.add_api_route(
            path,
            create_item,
            methods=["POST"],
            status_code=201,
            response_model=public,
            summary=f"Create a {entity}",
            responses={**ERRORS, **NOT_FOUND, **CONFLICT},
            name=f"{entity}.create",
        )

    if update is not None:
        update_model = update

        def update_item(
            id: RowId,
            body: update_model,  # type: ignore[valid-type]
            principal: CurrentPrincipal,
            session: SessionDep,
        ) -> Any:
            changes = body.model_dump(exclude_unset=True)  # type: ignore[attr-defined]
            row = crud.update_row(session, family, principal.scope, principal.actor, id, changes)
            return to_public(row)

        router.add_api_route(
            f"{path}/{{id}}",
            update_item,
            methods=[update_method],
            response_model=public,
            summary=f"Update a {entity}",
            responses={**ERRORS, **NOT_FOUND, **CONFLICT},
            name=f"{entity}.update",
        )

    if delete:

        def delete_item(
            id: RowId,
            principal: CurrentPrincipal,
            session: SessionDep,
            settings: SettingsDep,
        ) -> Response:
            if before_delete is not None:
                # A family-specific rule the generic guards cannot express.
                before_delete(session, id, principal.scope)
            crud.delete_row(session, family, principal.scope, principal.actor, id)
            if after_delete is not None:
                # Consequences in the same transaction (e.g. revoking a robot's credentials).
                after_delete(session, settings, principal.actor, id)
            return Response(status_code=204)

        router.add_api_route(
            f"{path}/{{id}}",
            delete_item,
            methods=["DELETE"],
            status_code=204,
            response_class=Response,
            summary=f"Delete a {entity}",
            responses={**ERRORS, **NOT_FOUND, **CONFLICT},
            name=f"{entity}.delete",
        )
