"""The receiver's own schema and engine (SQLite or MySQL/MariaDB), apart from Keystone's.

The receiver keeps two tables in its own ``MetaData`` and creates them with ``create_all``
when it starts (:func:`create_tables`): it is a reference implementation small enough that
its schema is the code below. A deployment that changes the schema later adds migrations.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

from keystone_receiver.settings import ENV_PREFIX, ReceiverSettings, ReceiverSettingsError

T = TypeVar("T")
_MYSQL = ("mysql", "mariadb")


def utcnow() -> datetime:
    """The receiver's one clock."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; microseconds kept (MySQL ``DATETIME(6)``)."""

    impl = DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; the receiver stores aware UTC datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def ascii_string(length: int) -> TypeEngine[str]:
    """Identifiers, names and keys: ASCII and case-sensitive everywhere.

    MariaDB's default collations compare case-insensitively, which would make ``Ep1`` and
    ``ep1`` one episode while S3 keeps them apart.
    """
    return String(length).with_variant(
        mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), *_MYSQL
    )


class EpisodeStatus(StrEnum):
    INCOMPLETE = "incomplete"
    COMPLETE = "complete"


class ObjectState(StrEnum):
    """Where one object of the current session is.

    ``awaiting_upload`` (single PUT, or multipart before its upload exists) →
    ``uploading_parts`` (multipart upload created) → ``verified``; a mismatch found at
    ``complete`` sends it back to ``awaiting_upload``.
    """

    AWAITING_UPLOAD = "awaiting_upload"
    UPLOADING_PARTS = "uploading_parts"
    VERIFIED = "verified"


def _enum_column(enum: type[StrEnum]) -> SqlEnum:
    return SqlEnum(
        enum,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class ReceiverBase(DeclarativeBase):
    """Declarative base with the receiver's own metadata (never Keystone's)."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER keys only
_TABLE_ARGS: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}


class ReceivedEpisode(ReceiverBase):
    """One episode a sender pushes: its current session and whether it is complete."""

    __tablename__ = "receiver_episodes"
    __table_args__ = (_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    episode_id: Mapped[str] = mapped_column(ascii_string(128), unique=True)
    factory_id: Mapped[str] = mapped_column(ascii_string(128))
    device_id: Mapped[str] = mapped_column(ascii_string(128))
    task_id: Mapped[str] = mapped_column(ascii_string(128))
    status: Mapped[EpisodeStatus] = mapped_column(_enum_column(EpisodeStatus))
    session: Mapped[str] = mapped_column(ascii_string(64))
    # Proof of exactly-once for tests and operators: sessions opened, completions recorded.
    session_count: Mapped[int] = mapped_column(Integer, default=1)
    complete_count: Mapped[int] = mapped_column(Integer, default=0)
    episode_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    objects: Mapped[list[ReceivedObject]] = relationship(
        back_populates="episode",
        cascade="all, delete-orphan",
        order_by="ReceivedObject.position",
        passive_deletes=True,
    )


class ReceivedObject(ReceiverBase):
    """One object of an episode's current session."""

    __tablename__ = "receiver_objects"
    __table_args__ = (UniqueConstraint("episode_pk", "name"), _TABLE_ARGS)

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    episode_pk: Mapped[int] = mapped_column(
        _ID, ForeignKey("receiver_episodes.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(ascii_string(128))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(ascii_string(64))
    key: Mapped[str] = mapped_column(ascii_string(600))
    state: Mapped[ObjectState] = mapped_column(_enum_column(ObjectState))
    upload_id: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    part_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    episode: Mapped[ReceivedEpisode] = relationship(back_populates="objects")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin); pysqlite's implicit BEGIN would
    # start DEFERRED transactions, and two of those that both read and then write deadlock
    # instead of waiting for each other.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        with contextlib.suppress(sqlite3.OperationalError):  # another connection switches it
            cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # One writer at a time, queued by busy_timeout: the SQLite stand-in for row locks.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_receiver_engine(settings: ReceiverSettings) -> Engine:
    """An engine for ``settings.database_url`` (SQLite: the parent directory is created)."""
    try:
        url = make_url(settings.database_url)
    except Exception as exc:  # sqlalchemy's ArgumentError has a terse message
        raise ReceiverSettingsError(
            f"{ENV_PREFIX}DATABASE_URL is not a valid database URL: {exc}"
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend not in _MYSQL:
        raise ReceiverSettingsError(
            f"{ENV_PREFIX}DATABASE_URL must be sqlite:///… or mysql+pymysql://…, not {backend}"
        )
    return create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        pool_recycle=3600,
        isolation_level="READ COMMITTED",
        connect_args={"charset": "utf8mb4", "connect_timeout": 5},
    )


def create_tables(engine: Engine) -> None:
    """Create the receiver's tables if missing (run at every start; a no-op once they exist)."""
    try:
        ReceiverBase.metadata.create_all(engine)
    except OperationalError:
        # Two processes starting together: the loser's CREATE meets the winner's table.
        time.sleep(0.5)
        ReceiverBase.metadata.create_all(engine)


def check_database(engine: Engine) -> None:
    """Return if the database answers; raise OperationalError (or similar) otherwise."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# MySQL/MariaDB 1213 deadlock and 1205 lock wait timeout: run the whole transaction again.
_RETRYABLE_ERRNOS = frozenset({1213, 1205})


def _is_retryable(exc: OperationalError) -> bool:
    args = tuple(getattr(exc.orig, "args", ()))
    return bool(args) and args[0] in _RETRYABLE_ERRNOS


def run_transaction(engine: Engine, work: Callable[[Session], T], *, attempts: int = 4) -> T:
    """Run ``work`` in its own transaction, again from the start after a deadlock."""
    for attempt in range(1, attempts + 1):
        try:
            with transaction(engine) as session:
                return work(session)
        except OperationalError as exc:
            if attempt == attempts or not _is_retryable(exc):
                raise
            time.sleep(0.02 * attempt + random.random() * 0.03)  # noqa: S311 (jitter)
    raise AssertionError("unreachable")
