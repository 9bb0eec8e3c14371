"""The one database engine and session factory (SQLite for the embedded default, MySQL/MariaDB)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import DateTime, Engine, create_engine, event, text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session

from keystone_core.clock import as_utc
from keystone_core.errors import ConfigurationError, DependencyUnavailable
from keystone_core.settings import Settings

T = TypeVar("T")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; microseconds kept (MySQL DATETIME(6))."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in {"mysql", "mariadb"}:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; Keystone stores aware UTC datetimes only")
        return as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # The wait first: switching the journal mode needs the database to itself.
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL is a property of the file: set once, and not while another connection writes
    # (a mode change then fails at once, "database is locked", whatever the timeout).
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        # Failing means another connection is switching this file to WAL right now.
        with contextlib.suppress(sqlite3.OperationalError):
            cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def create_db_engine(settings: Settings) -> Engine:
    """Build an engine for ``settings.database_url`` with the options each backend needs."""
    try:
        url = make_url(settings.database_url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a terse message
        raise ConfigurationError(
            f"KEYSTONE_DATABASE_URL is not a valid database URL: {exc}"
        ) from None
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=settings.database_echo,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.get_backend_name() not in {"mysql", "mariadb"}:
        raise ConfigurationError(
            "KEYSTONE_DATABASE_URL must be sqlite:///… or mysql+pymysql://…, "
            f"not {url.get_backend_name()}"
        )
    return create_engine(
        url,
        echo=settings.database_echo,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        pool_recycle=3600,
        isolation_level="READ COMMITTED",
        connect_args={"charset": "utf8mb4", "connect_timeout": 5},
    )


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# MySQL/MariaDB: 1213 deadlock (the server rolled the transaction back), 1205 lock wait
# timeout. Both mean "run the whole transaction again".
_RETRYABLE_ERRNOS = frozenset({1213, 1205})


def is_retryable(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    return isinstance(exc, OperationalError) and bool(args) and args[0] in _RETRYABLE_ERRNOS


def run_transaction(engine: Engine, work: Callable[[Session], T], *, attempts: int = 4) -> T:
    """Run ``work`` in its own transaction, again from the start after a deadlock.

    For short, idempotent units that race with others on the same rows (device frames and
    callbacks of one task arrive together by design).
    """
    for attempt in range(1, attempts + 1):
        try:
            with session_scope(engine) as session:
                return work(session)
        except OperationalError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            time.sleep(0.02 * attempt + random.random() * 0.03)  # noqa: S311 (jitter)
    raise AssertionError("unreachable")


def check_database(engine: Engine) -> None:
    """Raise DependencyUnavailable with a one-line reason when the database cannot be reached."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise DependencyUnavailable(f"database unreachable: {reason}") from None
