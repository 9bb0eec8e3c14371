"""Generic create/read/update/delete with factory scope, unique checks, delete guards, audit.

Every CRUD family of the API is a :class:`Family` (a model plus its rules); these
functions do the work for all of them, inside the caller's transaction, so a request
either writes everything (row + audit) or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import Enum
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import ColumnElement, Select, func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel

from keystone_core import clock
from keystone_core.errors import ConflictError, NotFoundError, ValidationFailed
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.scope import Scope

M = TypeVar("M", bound=SQLModel)

MAX_LIMIT = 100


@dataclass(frozen=True)
class Guard:
    """Rows of ``model`` whose ``column`` points here block a delete (409 naming them)."""

    model: type[SQLModel]
    column: str
    label: str


@dataclass(frozen=True)
class Family(Generic[M]):
    """One CRUD family: its model and the rules the generic functions apply."""

    model: type[M]
    entity: str
    # Column holding the owning factory; None for global rows (catalog, robot types).
    factory_column: str | None = "factory_id"
    # Extra visibility rule beyond the factory (e.g. a collector sees only its own rows).
    visibility: Callable[[Scope], ColumnElement[bool] | None] | None = None
    unique: tuple[tuple[str, ...], ...] = ()
    guards: tuple[Guard, ...] = ()
    # Cross-row checks on create/update (same factory, valid references …).
    validate: Callable[[Session, M, Scope], None] | None = None
    order_by: tuple[str, ...] = ("id",)
    writable: frozenset[str] | None = None  # None: every column but ids/timestamps
    immutable: frozenset[str] = field(default_factory=frozenset)

    @property
    def soft_delete(self) -> bool:
        return "deleted_at" in self.model.model_fields


@dataclass(frozen=True)
class Page(Generic[M]):
    items: list[M]
    total: int
    limit: int
    offset: int


def clamp_limit(limit: int) -> int:
    return min(limit, MAX_LIMIT)


def _column(model: type[SQLModel], name: str) -> Any:
    return getattr(model, name)


def scoped(family: Family[M], scope: Scope, *, include_deleted: bool = False) -> Select[Any]:
    """SELECT of the family's rows this scope may see."""
    query: Select[Any] = select(family.model)
    if family.soft_delete and not include_deleted:
        query = query.where(_column(family.model, "deleted_at").is_(None))
    if family.factory_column and scope.factory_ids is not None:
        column = _column(family.model, family.factory_column)
        query = query.where(column.is_(None) | column.in_(sorted(scope.factory_ids)))
    if family.visibility is not None:
        rule = family.visibility(scope)
        if rule is not None:
            query = query.where(rule)
    return query


def list_rows(
    session: Session,
    family: Family[M],
    scope: Scope,
    *,
    where: Sequence[ColumnElement[bool]] = (),
    limit: int = 50,
    offset: int = 0,
    include_deleted: bool = False,
) -> Page[M]:
    query = scoped(family, scope, include_deleted=include_deleted).where(*where)
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    limit = clamp_limit(limit)
    order = [_column(family.model, name) for name in family.order_by]
    rows = session.execute(query.order_by(*order).limit(limit).offset(offset)).scalars().all()
    return Page(items=list(rows), total=int(total), limit=limit, offset=offset)


def get_row(
    session: Session,
    family: Family[M],
    scope: Scope,
    row_id: int,
    *,
    include_deleted: bool = False,
    for_update: bool = False,
) -> M:
    """The row, or NotFoundError when it is missing, deleted or outside the scope."""
    query = scoped(family, scope, include_deleted=include_deleted).where(
        _column(family.model, "id") == row_id
    )
    if for_update:
        # populate_existing: a copy already in the session must show the locked values.
        query = query.with_for_update().execution_options(populate_existing=True)
    row = session.execute(query).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"{family.entity} {row_id} not found")
    return cast(M, row)


def snapshot(row: SQLModel) -> dict[str, Any]:
    """A JSON-safe copy of a row's columns for the audit log."""
    out: dict[str, Any] = {}
    for attr in inspect(type(row)).column_attrs:
        value = getattr(row, attr.key)
        if isinstance(value, datetime | date):
            value = value.isoformat()
        elif isinstance(value, Enum):
            value = value.value
        if attr.key == "password_hash":
            value = "***"
        out[attr.columns[0].name] = value
    return out


def _diff(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    keys = [k for k in after if before.get(k) != after.get(k) and k != "updated_at"]
    return {k: before.get(k) for k in keys}, {k: after[k] for k in keys}


def _check_unique(session: Session, family: Family[M], row: M) -> None:
    for group in family.unique:
        if any(getattr(row, name) is None for name in group):
            continue  # NULLs never collide in a unique index
        # Soft-deleted rows keep their unique keys (history stays unambiguous), so they
        # count here too: the caller gets a clear 409 instead of a database error.
        query = select(_column(family.model, "id")).where(
            *(_column(family.model, name) == getattr(row, name) for name in group)
        )
        row_id = getattr(row, "id", None)
        if row_id is not None:
            query = query.where(_column(family.model, "id") != row_id)
        if session.execute(query.limit(1)).first() is not None:
            shown = ", ".join(f"{n}={getattr(row, n)!r}" for n in group)
            raise ConflictError(
                f"a {family.entity} with {shown} already exists",
                code="duplicate",
                field=group[-1] if len(group) == 1 else list(group),
            )


def _check_references(session: Session, family: Family[M], row: M, scope: Scope) -> None:
    """Every foreign key set on ``row`` must point at a live row the caller may see."""
    table = family.model.__table__  # type: ignore[attr-defined]
    for column in table.columns:
        value = getattr(row, column.key, None)
        if value is None or not column.foreign_keys:
            continue
        target = next(iter(column.foreign_keys)).column.table
        query = select(target.c.id).where(target.c.id == value)
        if "deleted_at" in target.c:
            query = query.where(target.c.deleted_at.is_(None))
        if "factory_id" in target.c and scope.factory_ids is not None:
            query = query.where(
                target.c.factory_id.is_(None) | target.c.factory_id.in_(sorted(scope.factory_ids))
            )
        if session.execute(query).first() is None:
            raise NotFoundError(
                f"{column.key} {value} not found", code="reference_not_found", field=column.key
            )


def _check_scope(family: Family[M], row: M, scope: Scope) -> None:
    if family.factory_column is None:
        return
    factory_id = getattr(row, family.factory_column)
    if not scope.allows(factory_id):
        raise NotFoundError(f"factory {factory_id} not found", code="reference_not_found")


def _writable(family: Family[M], values: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    fields = family.model.model_fields
    columns = {attr.key: attr.columns[0] for attr in inspect(family.model).column_attrs}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = "meta" if key == "metadata" and "meta" in fields else key
        if name not in fields or name in {"id", "created_at", "updated_at", "deleted_at"}:
            raise ValidationFailed(f"{key} cannot be set", code="field_not_writable", field=key)
        if family.writable is not None and name not in family.writable:
            raise ValidationFailed(f"{key} cannot be set", code="field_not_writable", field=key)
        if not creating and name in family.immutable:
            raise ValidationFailed(f"{key} cannot be changed", code="field_immutable", field=key)
        if value is None and not columns[name].nullable:
            raise ValidationFailed(f"{key} must not be null", code="null_not_allowed", field=key)
        out[name] = value
    return out


def _flush(session: Session, family: Family[M]) -> None:
    try:
        session.flush()
    except IntegrityError as exc:
        # The pre-checks make this rare (a concurrent insert); never a 500.
        raise ConflictError(
            f"{family.entity} conflicts with an existing row: {str(exc.orig).splitlines()[0]}",
            code="duplicate",
        ) from None


def create_row(
    session: Session, family: Family[M], scope: Scope, actor: Actor, values: Mapping[str, Any]
) -> M:
    row = family.model(**_writable(family, values, creating=True))
    with session.no_autoflush:
        _check_scope(family, row, scope)
        _check_references(session, family, row, scope)
        _check_unique(session, family, row)
        if family.validate is not None:
            family.validate(session, row, scope)
    session.add(row)
    _flush(session, family)
    record_audit(
        session,
        actor,
        f"{family.entity}.create",
        entity_type=family.entity,
        entity_id=getattr(row, "id", ""),
        after=snapshot(row),
        factory_id=_factory_of(family, row),
    )
    return row


def update_row(
    session: Session,
    family: Family[M],
    scope: Scope,
    actor: Actor,
    row_id: int,
    changes: Mapping[str, Any],
) -> M:
    row = get_row(session, family, scope, row_id, for_update=True)
    if "status" in changes and hasattr(row, "status") and _has_state_machine(family):
        raise ValidationFailed(
            "status changes go through the lifecycle routes", code="field_not_writable"
        )
    before = snapshot(row)
    # No autoflush while checking: the checks query, and a half-checked row must never
    # reach the database (a duplicate would surface as an IntegrityError, not a 409).
    with session.no_autoflush:
        for key, value in _writable(family, changes, creating=False).items():
            setattr(row, key, value)
        _check_scope(family, row, scope)
        _check_references(session, family, row, scope)
        _check_unique(session, family, row)
        if family.validate is not None:
            family.validate(session, row, scope)
    if "updated_at" in family.model.model_fields:
        row.updated_at = clock.now()
    session.add(row)
    _flush(session, family)
    old, new = _diff(before, snapshot(row))
    if new:
        record_audit(
            session,
            actor,
            f"{family.entity}.update",
            entity_type=family.entity,
            entity_id=row_id,
            before=old,
            after=new,
            factory_id=_factory_of(family, row),
        )
    return row


def delete_row(
    session: Session, family: Family[M], scope: Scope, actor: Actor, row_id: int
) -> None:
    """Soft-delete (where history matters) or delete; 409 while children refer to it."""
    row = get_row(session, family, scope, row_id, for_update=True)
    for guard in family.guards:
        query = select(func.count()).where(_column(guard.model, guard.column) == row_id)
        if "deleted_at" in guard.model.model_fields:
            query = query.where(_column(guard.model, "deleted_at").is_(None))
        count = session.execute(query).scalar_one()
        if count:
            raise ConflictError(
                f"{family.entity} {row_id} is still referenced by {count} {guard.label}",
                code="still_referenced",
                referenced_by=guard.label,
                count=int(count),
            )
    before = snapshot(row)
    if family.soft_delete:
        row.deleted_at = clock.now()
        session.add(row)
    else:
        session.delete(row)
    _flush(session, family)
    record_audit(
        session,
        actor,
        f"{family.entity}.delete",
        entity_type=family.entity,
        entity_id=row_id,
        before=before,
        factory_id=_factory_of(family, row),
    )


def _factory_of(family: Family[M], row: M) -> int | None:
    if family.factory_column is None:
        return None
    if family.factory_column == "id":
        value = getattr(row, "id", None)
    else:
        value = getattr(row, family.factory_column, None)
    return None if value is None else int(value)


def _has_state_machine(family: Family[Any]) -> bool:
    from keystone_core.states import MACHINES

    return family.entity in MACHINES
