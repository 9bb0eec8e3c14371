"""Accounts: sign-in, the bootstrap admin, creating users with a role and factory scope."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, delete, exists, func
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ValidationFailed,
)
from keystone_core.models import (
    DataCollector,
    Factory,
    Inspector,
    RevokedToken,
    Role,
    User,
    UserFactory,
)
from keystone_core.security import hash_password, password_needs_rehash, verify_password
from keystone_core.services.audit import Actor, record_audit
from keystone_core.services.crud import Family, get_row
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings

MIN_PASSWORD_LENGTH = 8
INVALID_CREDENTIALS = "account or password is incorrect"


def normalize_account(account: str) -> str:
    """Accounts compare case- and space-insensitively on every database (MySQL's default
    collation already does; SQLite does not), so they are stored and looked up normalized."""
    return account.strip().lower()


def authenticate(session: Session, account: str, password: str) -> User:
    """Return the active user for these credentials; one message for every failure."""
    account = normalize_account(account)
    user = session.exec(
        select(User).where(User.account == account, col(User.deleted_at).is_(None))
    ).first()
    ok = verify_password(password, user.password_hash if user else None)
    if user is None or not ok or not user.is_active:
        raise AuthenticationError(INVALID_CREDENTIALS, code="invalid_credentials")
    if password_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = clock.now()
    session.add(user)
    return user


def token_holder(session: Session, user_id: int, jti: str) -> tuple[User, list[int]]:
    """The active user behind a token and its current factory scope, in one query.

    Every authenticated request needs the account (active? role?), whether the token was
    signed out, and the account's factories; one round trip instead of three.
    """
    revoked = exists().where(col(RevokedToken.jti) == jti)
    factories = (
        select(func.group_concat(UserFactory.factory_id))
        .where(UserFactory.user_id == user_id)
        .scalar_subquery()
    )
    row = session.execute(
        select(User, revoked.label("revoked"), factories.label("factories")).where(
            col(User.id) == user_id
        )
    ).first()
    if row is None:
        raise AuthenticationError("account is disabled or gone", code="invalid_token")
    if row.revoked:
        raise AuthenticationError("access token was signed out", code="token_revoked")
    user: User = row[0]
    if user.deleted_at is not None or not user.is_active:
        raise AuthenticationError("account is disabled or gone", code="invalid_token")
    scope = sorted(int(f) for f in str(row.factories).split(",")) if row.factories else []
    return user, scope


def factory_ids_of(session: Session, user_id: int) -> list[int]:
    rows = session.exec(
        select(UserFactory.factory_id)
        .where(UserFactory.user_id == user_id)
        .order_by(col(UserFactory.factory_id))
    )
    return list(rows)


def _validate_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationFailed(
            f"password must have at least {MIN_PASSWORD_LENGTH} characters", code="weak_password"
        )


def _validate_scope(session: Session, role: Role, factory_ids: Sequence[int]) -> list[int]:
    unique = sorted(set(factory_ids))
    if not unique and role is not Role.ADMIN:
        raise ValidationFailed(
            f"a {role.value} account needs at least one factory (all factories is admin-only)",
            code="factory_scope_required",
        )
    if unique:
        found = set(
            session.exec(
                select(Factory.id).where(
                    col(Factory.id).in_(unique), col(Factory.deleted_at).is_(None)
                )
            )
        )
        missing = [f for f in unique if f not in found]
        if missing:
            raise NotFoundError(f"factories not found: {', '.join(map(str, missing))}")
    return unique


def create_user(
    session: Session,
    *,
    account: str,
    password: str,
    role: Role,
    factory_ids: Sequence[int] = (),
    display_name: str = "",
    actor: Actor,
) -> User:
    """Create an account; its factory scope is stored with it in the same transaction."""
    account = normalize_account(account)
    if not account:
        raise ValidationFailed("account must not be empty", code="invalid_account")
    _validate_password(password)
    scope = _validate_scope(session, role, factory_ids)
    if session.exec(select(User.id).where(User.account == account)).first() is not None:
        raise ConflictError(f"account {account!r} already exists", code="account_exists")
    user = User(
        account=account,
        password_hash=hash_password(password),
        role=role,
        display_name=display_name or account,
    )
    session.add(user)
    session.flush()
    assert user.id is not None
    for factory_id in scope:
        session.add(UserFactory(user_id=user.id, factory_id=factory_id))
    record_audit(
        session,
        actor,
        "user.create",
        entity_type="user",
        entity_id=user.id,
        after={"account": account, "role": role.value, "factory_ids": scope},
    )
    return user


def ensure_admin(session: Session, settings: Settings) -> User:
    """Create the admin account from settings, or bring its password and role in line."""
    account = normalize_account(settings.admin_account)
    password = settings.admin_password.get_secret_value()
    user = session.exec(select(User).where(User.account == account)).first()
    actor = Actor.system("bootstrap")
    if user is None:
        return create_user(
            session, account=account, password=password, role=Role.ADMIN, actor=actor
        )
    before = {
        "role": user.role,
        "is_active": user.is_active,
        "deleted": user.deleted_at is not None,
    }
    password_reset = not verify_password(password, user.password_hash)
    changed = password_reset
    if password_reset:
        user.password_hash = hash_password(password)
    if user.role != Role.ADMIN or not user.is_active or user.deleted_at is not None:
        user.role, user.is_active, user.deleted_at = Role.ADMIN, True, None
        session.execute(delete(UserFactory).where(col(UserFactory.user_id) == user.id))
        changed = True
    if changed:
        user.updated_at = clock.now()
        session.add(user)
        record_audit(
            session,
            actor,
            "user.bootstrap_admin",
            entity_type="user",
            entity_id=user.id or 0,
            before=before,
            after={"role": Role.ADMIN.value, "is_active": True, "password_reset": password_reset},
        )
    return user


def revoke_token(
    session: Session, *, jti: str, user_id: int, expires_at: int, actor: Actor
) -> None:
    """Sign a token out: refused from now on until it would have expired anyway."""
    if session.get(RevokedToken, jti) is None:
        session.add(
            RevokedToken(
                jti=jti, user_id=user_id, expires_at=datetime.fromtimestamp(expires_at, UTC)
            )
        )
        record_audit(session, actor, "auth.logout", entity_type="user", entity_id=user_id)


def purge_expired_revocations(session: Session) -> int:
    """Drop deny-list rows of tokens that have expired (they are refused anyway)."""
    result = session.execute(delete(RevokedToken).where(col(RevokedToken.expires_at) < clock.now()))
    return int(result.rowcount)  # type: ignore[attr-defined]


def change_password(
    session: Session, user: User, *, current_password: str, new_password: str, actor: Actor
) -> None:
    if not verify_password(current_password, user.password_hash):
        raise AuthenticationError("current password is incorrect", code="invalid_credentials")
    _validate_password(new_password)
    user.password_hash = hash_password(new_password)
    user.updated_at = clock.now()
    session.add(user)
    record_audit(
        session,
        actor,
        "user.password_change",
        entity_type="user",
        entity_id=user.id or 0,
        after={"password": "changed"},
    )


# Managing accounts (the admin-only /users routes).

ACCOUNT_FIELDS = frozenset(
    {
        "display_name",
        "role",
        "is_active",
        "factory_ids",
        "password",
        "data_collector_id",
        "inspector_id",
    }
)


def visible_users(scope: Scope) -> ColumnElement[bool] | None:
    """A scoped admin manages only accounts whose every factory lies in its own scope: it can
    neither see nor change an account reaching beyond it (nor an all-factories admin)."""
    if scope.factory_ids is None:
        return None
    allowed = sorted(scope.factory_ids)
    mine = col(UserFactory.user_id) == col(User.id)
    inside = exists(
        select(UserFactory.user_id).where(mine, col(UserFactory.factory_id).in_(allowed))
    )
    outside = exists(
        select(UserFactory.user_id).where(mine, col(UserFactory.factory_id).not_in(allowed))
    )
    return inside & ~outside


USERS: Family[User] = Family(
    model=User, entity="user", factory_column=None, visibility=visible_users
)


def factory_ids_by_user(session: Session, user_ids: Sequence[int]) -> dict[int, list[int]]:
    """The factory scope of many accounts in one query, so a list page costs no N+1."""
    out: dict[int, list[int]] = {user_id: [] for user_id in user_ids}
    if not out:
        return out
    rows = session.exec(
        select(UserFactory.user_id, UserFactory.factory_id)
        .where(col(UserFactory.user_id).in_(sorted(out)))
        .order_by(col(UserFactory.factory_id))
    )
    for user_id, factory_id in rows:
        out[user_id].append(factory_id)
    return out


def _is_self(actor: Actor, user: User) -> bool:
    return actor.type == "user" and actor.id == str(user.id)


def _account_state(user: User, factory_ids: Sequence[int]) -> dict[str, Any]:
    """What the audit log records of an account (never the password hash)."""
    return {
        "account": user.account,
        "role": Role(user.role).value,
        "display_name": user.display_name,
        "is_active": user.is_active,
        "factory_ids": list(factory_ids),
        "data_collector_id": user.data_collector_id,
        "inspector_id": user.inspector_id,
    }


def _check_grant(scope: Scope, factory_ids: Sequence[int]) -> None:
    """A scoped admin can grant only factories it has itself, never "every factory"."""
    if scope.factory_ids is None:
        return
    if not factory_ids:
        raise PermissionDeniedError(
            "only an admin with access to every factory can grant access to every factory",
            code="forbidden",
        )
    outside = [f for f in factory_ids if f not in scope.factory_ids]
    if outside:
        raise NotFoundError(
            f"factories not found: {', '.join(map(str, outside))}",
            code="reference_not_found",
            field="factory_ids",
        )


def _check_person(
    session: Session,
    *,
    field: str,
    person: DataCollector | Inspector | None,
    person_id: int,
    factory_ids: Sequence[int],
    scope: Scope,
    user_id: int | None,
) -> None:
    if person is None or person.deleted_at is not None or not scope.allows(person.factory_id):
        raise NotFoundError(
            f"{field} {person_id} not found", code="reference_not_found", field=field
        )
    if person.factory_id not in factory_ids:
        raise ValidationFailed(
            f"{field} {person_id} belongs to factory {person.factory_id}, "
            "which is not among the account's factory_ids",
            code="link_outside_factories",
            field=field,
        )
    # One account per person: two logins recording as one operator would blur the history.
    taken = select(User.id).where(
        col(getattr(User, field)) == person_id, col(User.deleted_at).is_(None)
    )
    if user_id is not None:
        taken = taken.where(col(User.id) != user_id)
    if session.exec(taken).first() is not None:
        raise ConflictError(
            f"another account is already linked to {field} {person_id}",
            code="duplicate",
            field=field,
        )


def _check_links(
    session: Session,
    *,
    role: Role,
    factory_ids: Sequence[int],
    data_collector_id: int | None,
    inspector_id: int | None,
    scope: Scope,
    user_id: int | None,
) -> None:
    """A collector (inspector) account may link to a live data collector (inspector) row of
    its own factories; other roles link to none."""
    links: tuple[tuple[str, int | None, type[DataCollector | Inspector], Role], ...] = (
        ("data_collector_id", data_collector_id, DataCollector, Role.DATA_COLLECTOR),
        ("inspector_id", inspector_id, Inspector, Role.DATA_INSPECTOR),
    )
    for field, person_id, model, owner_role in links:
        if person_id is None:
            continue
        if role is not owner_role:
            raise ValidationFailed(
                f"{field} is only for {owner_role.value} accounts",
                code="link_role_mismatch",
                field=field,
            )
        _check_person(
            session,
            field=field,
            person=cast("DataCollector | Inspector | None", session.get(model, person_id)),
            person_id=person_id,
            factory_ids=factory_ids,
            scope=scope,
            user_id=user_id,
        )


def create_account(
    session: Session,
    *,
    account: str,
    password: str,
    role: Role,
    factory_ids: Sequence[int] = (),
    display_name: str = "",
    data_collector_id: int | None = None,
    inspector_id: int | None = None,
    scope: Scope,
    actor: Actor,
) -> User:
    """:func:`create_user` for the API: the caller may grant only its own factories, a taken
    account is a 409 naming the field, and the account is linked to its person row."""
    normalized = normalize_account(account)
    # Deleted accounts keep their name (the column is unique): audit rows refer to it.
    if normalized and session.exec(select(User.id).where(User.account == normalized)).first():
        raise ConflictError(
            f"an account {normalized!r} already exists", code="duplicate", field="account"
        )
    factories = _validate_scope(session, role, factory_ids)
    _check_grant(scope, factories)
    _check_links(
        session,
        role=role,
        factory_ids=factories,
        data_collector_id=data_collector_id,
        inspector_id=inspector_id,
        scope=scope,
        user_id=None,
    )
    user = create_user(
        session,
        account=account,
        password=password,
        role=role,
        factory_ids=factories,
        display_name=display_name,
        actor=actor,
    )
    if data_collector_id is not None or inspector_id is not None:
        user.data_collector_id = data_collector_id
        user.inspector_id = inspector_id
        session.add(user)
        links = {"data_collector_id": data_collector_id, "inspector_id": inspector_id}
        record_audit(
            session,
            actor,
            "user.link",
            entity_type="user",
            entity_id=user.id or 0,
            after={k: v for k, v in links.items() if v is not None},
        )
    # Callers may run without autoflush; what they read next must see the scope rows.
    session.flush()
    return user


def update_account(
    session: Session, user_id: int, changes: Mapping[str, Any], *, scope: Scope, actor: Actor
) -> User:
    """Change an account. A role change ends its sessions at once (tokens carry the role and
    are refused once it differs); deactivating or deleting does too. A new factory scope or
    password applies from the next sign-in: issued tokens keep their scope until they expire."""
    unknown = sorted(set(changes) - ACCOUNT_FIELDS)
    if unknown:
        raise ValidationFailed(
            f"{', '.join(unknown)} cannot be changed", code="field_not_writable", field=unknown[0]
        )
    user = get_row(session, USERS, scope, user_id, for_update=True)
    assert user.id is not None
    old_factories = factory_ids_of(session, user.id)
    before = _account_state(user, old_factories)
    role = Role(changes.get("role", user.role))
    is_active = bool(changes.get("is_active", user.is_active))
    if _is_self(actor, user) and role != user.role:
        raise ConflictError("you cannot change your own role", code="self_demotion")
    if _is_self(actor, user) and not is_active:
        raise ConflictError("you cannot deactivate your own account", code="self_deactivation")
    factories = _validate_scope(session, role, changes.get("factory_ids", old_factories))
    _check_grant(scope, factories)
    data_collector_id = changes.get("data_collector_id", user.data_collector_id)
    inspector_id = changes.get("inspector_id", user.inspector_id)
    _check_links(
        session,
        role=role,
        factory_ids=factories,
        data_collector_id=data_collector_id,
        inspector_id=inspector_id,
        scope=scope,
        user_id=user.id,
    )
    if "password" in changes:
        _validate_password(changes["password"])
        user.password_hash = hash_password(changes["password"])
    if "display_name" in changes:
        user.display_name = changes["display_name"] or user.account
    user.role, user.is_active = role, is_active
    user.data_collector_id, user.inspector_id = data_collector_id, inspector_id
    if factories != old_factories:
        session.execute(delete(UserFactory).where(col(UserFactory.user_id) == user.id))
        for factory_id in factories:
            session.add(UserFactory(user_id=user.id, factory_id=factory_id))
    user.updated_at = clock.now()
    session.add(user)
    session.flush()
    after = _account_state(user, factories)
    changed = [k for k in after if before[k] != after[k]]
    old = {k: before[k] for k in changed}
    new = {k: after[k] for k in changed}
    if "password" in changes:
        new |= {"password": "changed"}  # the same marker as change_password, never a hash
    if new:
        record_audit(
            session,
            actor,
            "user.update",
            entity_type="user",
            entity_id=user.id,
            before=old,
            after=new,
        )
    return user


def delete_account(session: Session, user_id: int, *, scope: Scope, actor: Actor) -> None:
    """Soft delete: the account stops authenticating at once; its history stays."""
    user = get_row(session, USERS, scope, user_id, for_update=True)
    assert user.id is not None
    if _is_self(actor, user):
        raise ConflictError("you cannot delete your own account", code="self_delete")
    before = _account_state(user, factory_ids_of(session, user.id))
    user.deleted_at = user.updated_at = clock.now()
    session.add(user)
    session.flush()
    record_audit(
        session, actor, "user.delete", entity_type="user", entity_id=user.id, before=before
    )
