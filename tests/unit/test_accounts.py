"""Accounts: sign-in, creating users with a scope, the bootstrap admin, QA lease recovery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from keystone_core import clock
from keystone_core.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ValidationFailed,
)
from keystone_core.models import AuditLog, EpisodeStatus, Role, User, UserFactory
from keystone_core.security import verify_password
from keystone_core.services.accounts import (
    INVALID_CREDENTIALS,
    authenticate,
    create_user,
    ensure_admin,
    factory_ids_of,
    token_holder,
)
from keystone_core.services.audit import Actor
from keystone_core.services.episodes import release_expired_qa_leases
from keystone_core.settings import Settings
from tests.conftest import make_settings
from tests.factories import make_episode, make_factory

ACTOR = Actor(type="user", id="1", account="admin")
PASSWORD = "a-good-password"
T0 = datetime(2026, 2, 1, 9, 0, 0, tzinfo=UTC)


def audits(session: Session, action: str) -> list[AuditLog]:
    return list(session.exec(select(AuditLog).where(AuditLog.action == action)).all())


def new_user(session: Session, account: str = "alice", **options: object) -> User:
    factory = make_factory(session)
    values: dict[str, object] = {
        "account": account,
        "password": PASSWORD,
        "role": Role.DATA_INSPECTOR,
        "factory_ids": [factory.id],
        "actor": ACTOR,
    }
    values.update(options)
    return create_user(session, **values)  # type: ignore[arg-type]


def sign_in_failure(session: Session, account: str, password: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as refused:
        authenticate(session, account, password)
    return refused.value


# --- authenticate ----------------------------------------------------------------------------


def test_authenticate_returns_the_user_and_stamps_the_login(session: Session) -> None:
    user = new_user(session)
    with clock.frozen(T0):
        signed_in = authenticate(session, "alice", PASSWORD)
    assert signed_in.id == user.id
    assert signed_in.last_login_at == T0


def test_wrong_password_and_unknown_account_look_the_same(session: Session) -> None:
    new_user(session)
    wrong = sign_in_failure(session, "alice", "not-the-password")
    unknown = sign_in_failure(session, "bob", PASSWORD)
    empty = sign_in_failure(session, "", "")
    for error in (wrong, unknown, empty):
        assert error.code == "invalid_credentials"
        assert error.message == INVALID_CREDENTIALS
        assert error.details == {}


def test_account_names_are_case_and_space_insensitive_on_every_database(
    session: Session,
) -> None:
    """MariaDB's collation ignores case and trailing spaces; SQLite must behave the same."""
    user = new_user(session)
    assert authenticate(session, " ALICE ", PASSWORD).id == user.id
    with pytest.raises(ConflictError):
        create_user(
            session, account="Alice", password=PASSWORD, role=Role.ADMIN, actor=Actor.system()
        )


def test_a_disabled_user_is_refused_like_a_wrong_password(session: Session) -> None:
    user = new_user(session)
    user.is_active = False
    session.add(user)
    session.flush()
    error = sign_in_failure(session, "alice", PASSWORD)
    assert (error.code, error.message) == ("invalid_credentials", INVALID_CREDENTIALS)


def test_a_deleted_user_is_refused(session: Session) -> None:
    user = new_user(session)
    user.deleted_at = clock.now()
    session.add(user)
    session.flush()
    assert sign_in_failure(session, "alice", PASSWORD).code == "invalid_credentials"
    assert user.id is not None
    with pytest.raises(AuthenticationError):
        token_holder(session, user.id, jti="any")


# --- create_user -----------------------------------------------------------------------------


def test_create_user_stores_a_hash_the_scope_and_an_audit_row(session: Session) -> None:
    first, second = make_factory(session), make_factory(session)
    assert first.id is not None
    assert second.id is not None
    user = create_user(
        session,
        account="  carol  ",
        password=PASSWORD,
        role=Role.PRODUCTION_MANAGER,
        factory_ids=[second.id, first.id, second.id],
        actor=ACTOR,
    )
    session.commit()
    assert user.id is not None
    assert user.account == "carol"
    assert user.display_name == "carol"
    assert user.role is Role.PRODUCTION_MANAGER
    assert user.password_hash != PASSWORD
    assert verify_password(PASSWORD, user.password_hash)
    assert factory_ids_of(session, user.id) == sorted([first.id, second.id])

    [row] = audits(session, "user.create")
    assert (row.entity_type, row.entity_id) == ("user", str(user.id))
    assert (row.actor_type, row.actor_account) == ("user", "admin")
    assert row.after == {
        "account": "carol",
        "role": "production_manager",
        "factory_ids": sorted([first.id, second.id]),
    }
    assert PASSWORD not in str(row.after)


def test_an_admin_may_have_no_factories(session: Session) -> None:
    user = create_user(session, account="root", password=PASSWORD, role=Role.ADMIN, actor=ACTOR)
    assert user.id is not None
    assert factory_ids_of(session, user.id) == []


@pytest.mark.parametrize("password", ["", "short", "7-chars"])
def test_a_weak_password_is_refused(session: Session, password: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        new_user(session, password=password)
    assert refused.value.code == "weak_password"
    assert session.exec(select(User)).all() == []


@pytest.mark.parametrize("account", ["", "   "])
def test_an_empty_account_is_refused(session: Session, account: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        new_user(session, account=account)
    assert refused.value.code == "invalid_account"


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.ADMIN])
def test_non_admins_need_a_factory(session: Session, role: Role) -> None:
    with pytest.raises(ValidationFailed) as refused:
        new_user(session, role=role, factory_ids=[])
    assert refused.value.code == "factory_scope_required"
    assert session.exec(select(User)).all() == []


def test_an_unknown_factory_is_not_found(session: Session) -> None:
    known = make_factory(session)
    with pytest.raises(NotFoundError, match="987654"):
        new_user(session, factory_ids=[known.id, 987654])
    assert session.exec(select(User)).all() == []


def test_a_deleted_factory_is_not_found(session: Session) -> None:
    gone = make_factory(session, deleted_at=clock.now())
    with pytest.raises(NotFoundError):
        new_user(session, factory_ids=[gone.id])


def test_a_duplicate_account_is_a_conflict(session: Session) -> None:
    new_user(session, account="dave")
    with pytest.raises(ConflictError) as refused:
        new_user(session, account="dave", password="another-password")
    assert refused.value.code == "account_exists"
    assert len(session.exec(select(User)).all()) == 1
    assert len(audits(session, "user.create")) == 1


# --- ensure_admin ----------------------------------------------------------------------------


def test_ensure_admin_creates_the_admin_from_settings(session: Session, settings: Settings) -> None:
    admin = ensure_admin(session, settings)
    session.commit()
    assert admin.account == settings.admin_account == "admin"
    assert admin.role is Role.ADMIN
    assert admin.id is not None
    assert factory_ids_of(session, admin.id) == []
    assert authenticate(session, "admin", settings.admin_password.get_secret_value()) is admin
    assert len(audits(session, "user.create")) == 1


def test_ensure_admin_is_idempotent(session: Session, settings: Settings) -> None:
    first = ensure_admin(session, settings)
    session.commit()
    stored_hash, updated = first.password_hash, first.updated_at
    second = ensure_admin(session, settings)
    session.commit()
    assert second.id == first.id
    assert second.password_hash == stored_hash
    assert second.updated_at == updated
    assert len(session.exec(select(User)).all()) == 1
    assert audits(session, "user.bootstrap_admin") == []


def test_ensure_admin_follows_a_changed_password(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    ensure_admin(session, settings)
    session.commit()
    changed = make_settings(tmp_path, admin_password="a-rotated-admin-password")
    admin = ensure_admin(session, changed)
    session.commit()
    assert authenticate(session, "admin", "a-rotated-admin-password").id == admin.id
    assert sign_in_failure(session, "admin", "test-admin-password").code == "invalid_credentials"
    [row] = audits(session, "user.bootstrap_admin")
    assert row.actor_type == "system"
    assert len(session.exec(select(User)).all()) == 1
    # A second call with the same settings changes nothing more.
    ensure_admin(session, changed)
    session.commit()
    assert len(audits(session, "user.bootstrap_admin")) == 1


def test_ensure_admin_restores_a_demoted_or_disabled_admin(
    session: Session, settings: Settings
) -> None:
    admin = ensure_admin(session, settings)
    factory = make_factory(session)
    assert admin.id is not None
    assert factory.id is not None
    admin.role, admin.is_active, admin.deleted_at = Role.DATA_INSPECTOR, False, clock.now()
    session.add(admin)
    session.add(UserFactory(user_id=admin.id, factory_id=factory.id))
    session.commit()

    restored = ensure_admin(session, settings)
    session.commit()
    assert restored.id == admin.id
    assert (restored.role, restored.is_active, restored.deleted_at) == (Role.ADMIN, True, None)
    assert factory_ids_of(session, admin.id) == []
    [row] = audits(session, "user.bootstrap_admin")
    assert row.before == {"role": "data_inspector", "is_active": False, "deleted": True}


def test_ensure_admin_audit_says_whether_the_password_was_reset(
    session: Session, settings: Settings
) -> None:
    admin = ensure_admin(session, settings)
    admin.is_active = False
    session.add(admin)
    session.commit()
    ensure_admin(session, settings)
    session.commit()
    [row] = audits(session, "user.bootstrap_admin")
    assert row.after is not None
    assert row.after.get("password_reset") is not True


# --- QA lease recovery -----------------------------------------------------------------------


def test_release_expired_qa_leases_only_touches_expired_qa_running(session: Session) -> None:
    lease_end = T0 + timedelta(minutes=10)
    expired = make_episode(
        session,
        status=EpisodeStatus.QA_RUNNING,
        qa_lease_owner="run-1",
        qa_lease_expires_at=lease_end,
    )
    live = make_episode(
        session,
        status=EpisodeStatus.QA_RUNNING,
        qa_lease_owner="run-2",
        qa_lease_expires_at=lease_end + timedelta(minutes=30),
    )
    finished = make_episode(
        session,
        status=EpisodeStatus.AUTO_APPROVED,
        qa_lease_owner="run-3",
        qa_lease_expires_at=lease_end - timedelta(minutes=5),
    )
    waiting = make_episode(session, status=EpisodeStatus.PENDING_QA)
    session.commit()

    with clock.frozen(T0) as move:
        assert release_expired_qa_leases(session) == []
        move(lease_end)  # expiry is exclusive: at the instant itself the lease still holds
        assert release_expired_qa_leases(session) == []
        move(lease_end + timedelta(microseconds=1))
        released = release_expired_qa_leases(session)
        session.commit()
        assert release_expired_qa_leases(session) == []

    assert released == [expired.id]
    session.expire_all()
    assert expired.status is EpisodeStatus.PENDING_QA
    assert (expired.qa_lease_owner, expired.qa_lease_expires_at) == (None, None)
    assert expired.updated_at == lease_end + timedelta(microseconds=1)
    assert (live.status, live.qa_lease_owner) == (EpisodeStatus.QA_RUNNING, "run-2")
    assert (finished.status, finished.qa_lease_owner) == (EpisodeStatus.AUTO_APPROVED, "run-3")
    assert waiting.status is EpisodeStatus.PENDING_QA
    # Lease recovery is an ordinary edge, not an audited requeue.
    assert audits(session, "episode.requeue") == []


def test_release_expired_qa_leases_respects_the_limit_oldest_first(session: Session) -> None:
    episodes = [
        make_episode(
            session,
            status=EpisodeStatus.QA_RUNNING,
            qa_lease_expires_at=T0 - timedelta(minutes=m),
        )
        for m in (1, 3, 2)
    ]
    session.commit()
    with clock.frozen(T0):
        first = release_expired_qa_leases(session, limit=2)
        rest = release_expired_qa_leases(session, limit=2)
    assert first == [episodes[1].id, episodes[2].id]
    assert rest == [episodes[0].id]
