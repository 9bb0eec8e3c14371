"""Accounts: sign-in, the bootstrap admin, creating users with a role and factory scope."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import delete
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import AuthenticationError, ConflictError, NotFoundError, ValidationFailed
from keystone_core.models import Factory, RevokedToken, Role, User, UserFactory
from keystone_core.security import hash_password, password_needs_rehash, verify_password
from keystone_core.services.audit import Actor, record_audit
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


def get_active_user(session: Session, user_id: int) -> User:
    """The user behind a token; a deleted or disabled account no longer authenticates."""
    user = session.get(User, user_id)
    if user is None or user.deleted_at is not None or not user.is_active:
        raise AuthenticationError("account is disabled or gone", code="invalid_token")
    return user


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


def is_token_revoked(session: Session, jti: str) -> bool:
    return session.get(RevokedToken, jti) is not None


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
