"""Migrations: up, down and up again, no drift from the models, a lock against racing upgrades."""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

import keystone_core.models  # noqa: F401  (registers every table)
from keystone_core import migrate
from keystone_core.db import create_db_engine
from keystone_core.errors import DependencyUnavailable, KeystoneError
from keystone_core.settings import load_settings
from tests.conftest import TEST_DB, mariadb_url, recreate_mariadb_database, unavailable

# Derived from the session's test database so parallel runs never share it.
MIGRATIONS_DB = f"{TEST_DB}_migrations"
MODEL_TABLES = set(SQLModel.metadata.tables)


def engine_for(url: str, pool_size: int = 2) -> Engine:
    return create_db_engine(
        load_settings(env="test", database_url=url, database_pool_size=pool_size)
    )


@pytest.fixture
def fresh_mariadb() -> Iterator[str]:
    """The URL of an empty, dedicated database (dropped and created for each test)."""
    try:
        recreate_mariadb_database(MIGRATIONS_DB)
    except pymysql.err.OperationalError as exc:
        unavailable(f"MariaDB ({exc.args[-1]})")
    yield mariadb_url(MIGRATIONS_DB)
    engine = engine_for(mariadb_url("mysql"))
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{MIGRATIONS_DB}`"))
    finally:
        engine.dispose()


@pytest.fixture
def fresh_sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'migrations.db'}"


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, SQLModel.metadata))


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def up_down_up(url: str, lock_dir: Path) -> None:
    engine = engine_for(url)
    try:
        assert migrate.migration_status(engine).current is None
        assert not migrate.migration_status(engine).up_to_date

        migrate.upgrade(engine, lock_dir=lock_dir)
        status = migrate.migration_status(engine)
        assert status.up_to_date, status
        assert status.current == migrate.head_revision()
        assert tables(engine) >= MODEL_TABLES

        migrate.downgrade(engine, lock_dir=lock_dir, revision="base")
        assert migrate.migration_status(engine).current is None
        assert tables(engine) & MODEL_TABLES == set()

        migrate.upgrade(engine, lock_dir=lock_dir)
        assert migrate.migration_status(engine).up_to_date
        assert tables(engine) >= MODEL_TABLES
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def upgrade_concurrently(url: str, lock_dir: Path, workers: int = 2) -> None:
    """``workers`` threads, each with its own engine, call upgrade at the same moment."""
    engines = [engine_for(url, pool_size=1) for _ in range(workers)]
    start = threading.Barrier(workers, timeout=30)
    errors: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            start.wait()
            migrate.upgrade(engine, lock_dir=lock_dir, timeout_s=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "an upgrade hung"
        assert errors == []
        assert migrate.migration_status(engines[0]).up_to_date
        assert schema_diff(engines[0]) == []
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.integration
def test_mariadb_upgrade_downgrade_upgrade_leaves_no_drift(
    fresh_mariadb: str, tmp_path: Path
) -> None:
    up_down_up(fresh_mariadb, tmp_path / "lock")


@pytest.mark.integration
def test_mariadb_concurrent_upgrades_both_succeed_at_head(
    fresh_mariadb: str, tmp_path: Path
) -> None:
    upgrade_concurrently(fresh_mariadb, tmp_path / "lock", workers=3)


@pytest.mark.integration
def test_mariadb_upgrade_to_head_twice_is_a_no_op(fresh_mariadb: str, tmp_path: Path) -> None:
    engine = engine_for(fresh_mariadb)
    try:
        migrate.upgrade(engine, lock_dir=tmp_path)
        before = tables(engine)
        migrate.upgrade(engine, lock_dir=tmp_path)
        assert tables(engine) == before
        assert migrate.migration_status(engine).up_to_date
    finally:
        engine.dispose()


@pytest.mark.integration
def test_mariadb_upgrade_gives_up_when_the_lock_stays_taken(
    fresh_mariadb: str, tmp_path: Path
) -> None:
    holder, engine = engine_for(fresh_mariadb), engine_for(fresh_mariadb)
    try:
        with holder.connect() as conn:
            taken = conn.execute(text("SELECT GET_LOCK(:n, 0)"), {"n": migrate.LOCK_NAME})
            assert taken.scalar() == 1
            with pytest.raises(KeystoneError) as raised:
                migrate.upgrade(engine, lock_dir=tmp_path, timeout_s=1)
            assert raised.value.code == "migration_lock_timeout"
            assert migrate.migration_status(engine).current is None
            conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": migrate.LOCK_NAME})
        migrate.upgrade(engine, lock_dir=tmp_path, timeout_s=10)
        assert migrate.migration_status(engine).up_to_date
    finally:
        holder.dispose()
        engine.dispose()


def test_sqlite_upgrade_downgrade_upgrade_leaves_no_drift(
    fresh_sqlite: str, tmp_path: Path
) -> None:
    up_down_up(fresh_sqlite, tmp_path / "lock")


def test_sqlite_concurrent_upgrades_both_succeed_at_head(fresh_sqlite: str, tmp_path: Path) -> None:
    upgrade_concurrently(fresh_sqlite, tmp_path / "lock")


def test_an_unreachable_database_is_a_dependency_error_quickly(tmp_path: Path) -> None:
    engine = engine_for("mysql+pymysql://root@127.0.0.1:1/x")
    started = time.monotonic()
    try:
        with pytest.raises(DependencyUnavailable, match="database unreachable") as raised:
            migrate.upgrade(engine, lock_dir=tmp_path)
    finally:
        engine.dispose()
    assert time.monotonic() - started < 10
    assert raised.value.code == "dependency_unavailable"
    assert "\n" not in raised.value.message


def test_sqlite_upgrade_gives_up_when_the_lock_stays_taken(
    fresh_sqlite: str, tmp_path: Path
) -> None:
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    engine = engine_for(fresh_sqlite)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            migrate.upgrade(engine, lock_dir=lock_dir, timeout_s=1)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    with (lock_dir / "migrate.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=5)
        gave_up = not thread.is_alive()
        fcntl.flock(handle, fcntl.LOCK_UN)
    thread.join(timeout=60)
    engine.dispose()
    assert gave_up, "upgrade still waiting for the lock 5 s after a 1 s timeout"
    [error] = outcome
    assert isinstance(error, KeystoneError)
    assert error.code == "migration_lock_timeout"
