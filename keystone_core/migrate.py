"""Schema migrations: upgrade/downgrade with alembic, guarded so two processes never race."""

from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from keystone_core.db import check_database
from keystone_core.errors import KeystoneError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
LOCK_NAME = "keystone_migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise KeystoneError("no migrations found", code="no_migrations")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def migration_status(engine: Engine) -> MigrationStatus:
    return MigrationStatus(current=current_revision(engine), head=head_revision())


@contextmanager
def _migration_lock(conn: Connection, lock_dir: Path, timeout_s: int) -> Iterator[None]:
    """MySQL: a named lock held by this connection. SQLite: an exclusive file lock."""
    if conn.dialect.name in {"mysql", "mariadb"}:
        got = conn.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": LOCK_NAME, "t": timeout_s})
        if got.scalar() != 1:
            raise KeystoneError(
                f"another process holds the migration lock for over {timeout_s}s",
                code="migration_lock_timeout",
            )
        try:
            yield
        finally:
            conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": LOCK_NAME})
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / "migrate.lock").open("w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KeystoneError(
                        f"another process holds the migration lock for over {timeout_s}s",
                        code="migration_lock_timeout",
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(engine: Engine, lock_dir: Path, timeout_s: int, action: str, revision: str) -> None:
    check_database(engine)
    cfg = alembic_config()
    try:
        with engine.connect() as conn, _migration_lock(conn, lock_dir, timeout_s):
            cfg.attributes["connection"] = conn
            if action == "upgrade":
                command.upgrade(cfg, revision)
            else:
                command.downgrade(cfg, revision)
            conn.commit()
    except DBAPIError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise KeystoneError(f"{action} failed: {reason}", code="migration_failed") from None


def upgrade(
    engine: Engine, *, lock_dir: Path, revision: str = "head", timeout_s: int = 120
) -> None:
    """Upgrade to ``revision``; a second process waits for the first and then finds no work."""
    _run(engine, lock_dir, timeout_s, "upgrade", revision)


def downgrade(engine: Engine, *, lock_dir: Path, revision: str, timeout_s: int = 120) -> None:
    _run(engine, lock_dir, timeout_s, "downgrade", revision)
