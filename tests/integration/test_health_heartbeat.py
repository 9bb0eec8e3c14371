"""The Dagster daemon in ``/api/v1/health``: the heartbeat sensor writes the row, the API
judges its age (MariaDB + SeaweedFS, the sensor evaluated as the daemon does)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import SkipReason, build_sensor_context
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import ComponentHeartbeat
from keystone_core.services.heartbeats import (
    DAGSTER_DAEMON,
    heartbeat_state,
    latest_heartbeat,
    record_heartbeat,
)
from keystone_core.storage import EmbeddedS3Server
from keystone_pipelines.defs.health import keystone_heartbeat_sensor
from keystone_pipelines.resources import KeystoneDatabase
from tests.conftest import make_settings

pytestmark = pytest.mark.integration


def api(tmp_path: Path, url: str, s3: EmbeddedS3Server, **overrides: object) -> TestClient:
    settings = make_settings(
        tmp_path,
        database_url=url,
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        **{"health_require_dagster": True, **overrides},
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(
    tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str, s3_server: EmbeddedS3Server
) -> Iterator[TestClient]:
    with api(tmp_path, mariadb_migrated, s3_server) as c:
        yield c


def tick(url: str) -> SkipReason:
    """One evaluation of the heartbeat sensor, as the daemon runs it."""
    resources = {"database": KeystoneDatabase(database_url=url)}
    with build_sensor_context(resources=resources) as context:
        result = keystone_heartbeat_sensor(context)
    assert isinstance(result, SkipReason)  # it never launches a run
    return result


def test_no_heartbeat_yet_is_503_naming_the_dagster_daemon(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["dagster_daemon"] == {"status": "down", "detail": "no heartbeat yet"}
    others = {k: v["status"] for k, v in body["components"].items() if k != "dagster_daemon"}
    assert others == {"database": "up", "object_store": "up", "migrations": "up"}


def test_a_sensor_tick_makes_health_200_and_a_stale_beat_makes_it_503_again(
    client: TestClient, mariadb_engine: Engine, mariadb_migrated: str
) -> None:
    assert "heartbeat written at" in (tick(mariadb_migrated).skip_message or "")
    response = client.get("/api/v1/health")
    assert response.status_code == 200, response.text
    daemon = response.json()["components"]["dagster_daemon"]
    assert daemon["status"] == "up"
    assert daemon["detail"].startswith("last heartbeat ")
    with Session(mariadb_engine) as session:
        row = session.exec(select(ComponentHeartbeat)).one()
    assert row.name == DAGSTER_DAEMON
    assert row.detail["pid"] == os.getpid()
    assert row.detail["code_location"] == "keystone_pipelines"
    assert row.detail["host"]
    beat_at = clock.as_utc(row.beat_at)

    # Just inside the limit (180 s by default) it is still up; past it, 503 with the age.
    with clock.frozen(beat_at + dt.timedelta(seconds=179)) as move:
        assert client.get("/api/v1/health").status_code == 200
        move(beat_at + dt.timedelta(seconds=412))
        stale = client.get("/api/v1/health")
    assert stale.status_code == 503
    assert stale.json()["components"]["dagster_daemon"] == {
        "status": "down",
        "detail": "last heartbeat 412 s ago (limit 180 s)",
    }
    # The next tick brings it back.
    with clock.frozen(beat_at + dt.timedelta(seconds=413)):
        tick(mariadb_migrated)
        assert client.get("/api/v1/health").status_code == 200


def test_the_age_limit_is_a_setting(
    tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str, s3_server: EmbeddedS3Server
) -> None:
    tick(mariadb_migrated)
    with Session(mariadb_engine) as session:
        beat = latest_heartbeat(session, DAGSTER_DAEMON)
    assert beat is not None
    with api(tmp_path, mariadb_migrated, s3_server, dagster_heartbeat_max_age_s=600) as c:
        with clock.frozen(clock.as_utc(beat.beat_at) + dt.timedelta(seconds=412)):
            assert c.get("/api/v1/health").status_code == 200
        with clock.frozen(clock.as_utc(beat.beat_at) + dt.timedelta(seconds=601)):
            response = c.get("/api/v1/health")
    assert response.status_code == 503
    assert "limit 600 s" in response.json()["components"]["dagster_daemon"]["detail"]


def test_an_api_without_dagster_leaves_it_out(
    tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str, s3_server: EmbeddedS3Server
) -> None:
    with api(tmp_path, mariadb_migrated, s3_server, health_require_dagster=False) as c:
        response = c.get("/api/v1/health")
    assert response.status_code == 200
    assert "dagster_daemon" not in response.json()["components"]


def test_a_database_that_is_down_takes_the_daemon_component_down_too(
    client: TestClient, mariadb_migrated: str
) -> None:
    tick(mariadb_migrated)
    app = client.app
    healthy = app.state.engine  # type: ignore[attr-defined]
    from keystone_core.db import create_db_engine

    app.state.engine = create_db_engine(  # type: ignore[attr-defined]
        make_settings(Path("/nonexistent"), database_url="mysql+pymysql://root@127.0.0.1:1/x")
    )
    try:
        response = client.get("/api/v1/health")
    finally:
        app.state.engine.dispose()  # type: ignore[attr-defined]
        app.state.engine = healthy  # type: ignore[attr-defined]
    assert response.status_code == 503
    assert response.json()["components"]["dagster_daemon"] == {
        "status": "down",
        "detail": "database is down",
    }


def test_record_heartbeat_upserts_one_row_per_component(mariadb_engine: Engine) -> None:
    start = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
    with clock.frozen(start) as move, Session(mariadb_engine) as session:
        record_heartbeat(session, DAGSTER_DAEMON, {"pid": 1})
        session.commit()
        move(start + dt.timedelta(seconds=30))
        second = record_heartbeat(session, DAGSTER_DAEMON, {"pid": 2})
        session.commit()
        record_heartbeat(session, "other", {})
        session.commit()
        assert clock.as_utc(second.beat_at) == start + dt.timedelta(seconds=30)
        rows = {r.name: r for r in session.exec(select(ComponentHeartbeat)).all()}
        assert set(rows) == {DAGSTER_DAEMON, "other"}
        assert rows[DAGSTER_DAEMON].detail == {"pid": 2}
        state = heartbeat_state(session, DAGSTER_DAEMON, max_age_s=180)
        assert state.up
        assert state.age_s == 0
        assert heartbeat_state(session, "never", max_age_s=180).detail == "no heartbeat yet"
