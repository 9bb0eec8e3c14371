"""The API on the real services: MariaDB + SeaweedFS, health reporting each component."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from keystone_api.app import create_app
from keystone_core.db import create_db_engine
from keystone_core.settings import Settings
from keystone_core.storage import EmbeddedS3Server
from tests.conftest import make_settings
from tests.support.s3 import start_test_s3_server

pytestmark = pytest.mark.integration


def stack_settings(tmp_path: Path, database_url: str, s3: EmbeddedS3Server) -> Settings:
    return make_settings(
        tmp_path,
        database_url=database_url,
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
    )


@pytest.fixture
def client(
    tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str, s3_server: EmbeddedS3Server
) -> Iterator[TestClient]:
    with TestClient(create_app(stack_settings(tmp_path, mariadb_migrated, s3_server))) as c:
        yield c


def test_health_is_200_when_every_component_is_up(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["components"]) == {"database", "object_store", "migrations"}
    assert {c["status"] for c in body["components"].values()} == {"up"}


def test_login_and_me_on_mariadb(client: TestClient) -> None:
    login = client.post(
        "/api/v1/auth/login", json={"account": "admin", "password": "test-admin-password"}
    )
    assert login.status_code == 200
    token = login.json()["access_token"]
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["role"] == "admin"


def test_health_is_503_and_names_the_database_when_it_goes_away(client: TestClient) -> None:
    app = client.app
    healthy_engine = app.state.engine  # type: ignore[attr-defined]
    unreachable = make_settings(
        Path("/nonexistent"), database_url="mysql+pymysql://root@127.0.0.1:1/keystone"
    )
    app.state.engine = create_db_engine(unreachable)  # type: ignore[attr-defined]
    try:
        response = client.get("/api/v1/health")
    finally:
        app.state.engine.dispose()  # type: ignore[attr-defined]
        app.state.engine = healthy_engine  # type: ignore[attr-defined]
    assert response.status_code == 503
    components = response.json()["components"]
    assert components["database"]["status"] == "down"
    assert "unreachable" in components["database"]["detail"]
    assert components["migrations"]["status"] == "down"
    assert components["object_store"]["status"] == "up"


def test_health_is_503_when_the_s3_server_stops(
    tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str
) -> None:
    s3 = start_test_s3_server(tmp_path / "s3")
    try:
        with TestClient(create_app(stack_settings(tmp_path, mariadb_migrated, s3))) as c:
            assert c.get("/api/v1/health").status_code == 200
            s3.stop()
            response = c.get("/api/v1/health")
            assert response.status_code == 503
            assert response.json()["components"]["object_store"]["status"] == "down"
            assert response.json()["components"]["database"]["status"] == "up"
    finally:
        s3.stop()
