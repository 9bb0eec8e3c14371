"""Shared fixtures: settings, SQLite and MariaDB engines, a real S3 server, an API client.

Integration fixtures need the MariaDB on 127.0.0.1:3306 and a local SeaweedFS. Outside CI
a missing service skips those tests; with ``CI=true`` it fails them, so CI can never pass
without having exercised the real services.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy import Engine, text
from sqlmodel import Session, SQLModel

import keystone_core.models  # noqa: F401  (registers tables)
from keystone_core import migrate
from keystone_core.db import create_db_engine
from keystone_core.settings import Settings, get_settings, load_settings

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
MARIADB_HOST = os.environ.get("KEYSTONE_TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("KEYSTONE_TEST_MARIADB_PORT", "3306"))
MARIADB_USER = os.environ.get("KEYSTONE_TEST_MARIADB_USER", "root")
MARIADB_PASSWORD = os.environ.get("KEYSTONE_TEST_MARIADB_PASSWORD", "")
# Override to run two suites side by side on one MariaDB (each drops and recreates its own).
TEST_DB = os.environ.get("KEYSTONE_TEST_DATABASE", "keystone_test")
TEST_DAGSTER_DB = TEST_DB.replace("keystone_", "keystone_dagster_", 1)

hypothesis_settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.register_profile("dev", max_examples=100, deadline=None)
hypothesis_settings.register_profile("thorough", max_examples=1000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if IN_CI else "dev"))


def unavailable(what: str) -> None:
    """Fail in CI, skip elsewhere: a missing real service must never pass CI silently."""
    if IN_CI:
        pytest.fail(f"{what} is unavailable in CI: integration tests need it", pytrace=False)
    pytest.skip(f"{what} unavailable")


def mariadb_url(database: str) -> str:
    auth = MARIADB_USER + (f":{MARIADB_PASSWORD}" if MARIADB_PASSWORD else "")
    return f"mysql+pymysql://{auth}@{MARIADB_HOST}:{MARIADB_PORT}/{database}"


def recreate_mariadb_database(name: str) -> None:
    conn = pymysql.connect(
        host=MARIADB_HOST,
        port=MARIADB_PORT,
        user=MARIADB_USER,
        password=MARIADB_PASSWORD,
        connect_timeout=5,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _fresh_settings_cache() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": "test",
        "data_dir": tmp_path / "data",
        "database_url": f"sqlite:///{tmp_path / 'keystone.db'}",
        "secret_key": "test-secret-key-with-enough-length-0123456789",
        "admin_password": "test-admin-password",
        # No Dagster daemon beats in these tests (tests/integration/test_health_heartbeat.py
        # turns it on).
        "health_require_dagster": False,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Test settings on a fresh SQLite file (no object store)."""
    return make_settings(tmp_path)


@pytest.fixture
def sqlite_engine(settings: Settings) -> Iterator[Engine]:
    """A fresh SQLite database with every table (create_all: migrations are tested apart)."""
    engine = create_db_engine(settings)
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(sqlite_engine: Engine) -> Iterator[Session]:
    with Session(sqlite_engine, expire_on_commit=False) as s:
        yield s


@pytest.fixture(scope="session")
def mariadb_database() -> str:
    """The URL of a freshly created ``keystone_test`` database (no tables yet)."""
    try:
        recreate_mariadb_database(TEST_DB)
        recreate_mariadb_database(TEST_DAGSTER_DB)
    except pymysql.err.OperationalError as exc:
        unavailable(f"MariaDB at {MARIADB_HOST}:{MARIADB_PORT} ({exc.args[-1]})")
    return mariadb_url(TEST_DB)


@pytest.fixture(scope="session")
def mariadb_migrated(mariadb_database: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``keystone_test`` migrated to head once per session."""
    settings = load_settings(env="test", database_url=mariadb_database)
    engine = create_db_engine(settings)
    migrate.upgrade(engine, lock_dir=tmp_path_factory.mktemp("lock"))
    engine.dispose()
    return mariadb_database


def _clear_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET FOREIGN_KEY_CHECKS=0"))
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
        conn.execute(text("SET FOREIGN_KEY_CHECKS=1"))


@pytest.fixture
def mariadb_engine(mariadb_migrated: str) -> Iterator[Engine]:
    """An engine on the migrated MariaDB test database, emptied after each test."""
    settings = load_settings(env="test", database_url=mariadb_migrated, database_pool_size=4)
    engine = create_db_engine(settings)
    yield engine
    _clear_tables(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real SeaweedFS S3 server for the whole session."""
    from tests.support.s3 import start_test_s3_server

    try:
        server = start_test_s3_server(tmp_path_factory.mktemp("s3"))
    except Exception as exc:  # any failure to start is "unavailable"
        unavailable(f"S3 server (weed mini): {exc}")
        raise
    yield server
    server.stop()
