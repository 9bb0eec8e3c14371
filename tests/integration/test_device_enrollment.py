"""Registration is gated by enrollment windows (time, networks, type, count, pre-provisioned
robots), rate-limited, audited, and never half-written; on MariaDB with a real S3 server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import (
    AuditLog,
    CredentialKind,
    DeviceCredential,
    EnrollmentWindow,
    Robot,
)
from keystone_core.storage import EmbeddedS3Server
from tests.conftest import make_settings
from tests.factories import make_factory, make_robot, make_robot_type

pytestmark = pytest.mark.integration
V1 = "/api/v1"
AXON_CONFIG = {"User-Agent": "axon-config/1.0", "Accept": "application/json"}


@pytest.fixture
def make_client(
    tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str, s3_server: EmbeddedS3Server
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def build(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "database_url": mariadb_migrated,
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_access_key": s3_server.access_key,
            "s3_secret_key": s3_server.secret_key,
        }
        values.update(overrides)
        client = TestClient(create_app(make_settings(tmp_path, **values)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def admin(client: TestClient) -> dict[str, str]:
    token = client.post(
        f"{V1}/auth/login", json={"account": "admin", "password": "test-admin-password"}
    ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def site(mariadb_engine: Engine) -> dict[str, Any]:
    with Session(mariadb_engine, expire_on_commit=False) as session:
        factory = make_factory(session)
        robot_type = make_robot_type(session)
        other_type = make_robot_type(session)
        session.commit()
        return {
            "factory": factory,
            "robot_type": robot_type,
            "other_type": other_type,
            "body": {"factory": factory.name, "robot_type": robot_type.model},
        }


def open_window(client: TestClient, admin: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = client.post(f"{V1}/enrollment_windows", json=fields, headers=admin)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def register(client: TestClient, body: dict[str, Any]) -> Any:
    return client.post(f"{V1}/devices/register", json=body, headers=AXON_CONFIG)


def robots(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(Robot)).one())


def test_without_an_open_window_registration_is_refused(
    client: TestClient, admin: dict[str, str], site: dict[str, Any], mariadb_engine: Engine
) -> None:
    refused = register(client, site["body"])
    assert refused.status_code == 403
    assert refused.json()["code"] == "enrollment_closed"
    window = open_window(client, admin, factory_id=site["factory"].id, duration_minutes=5)
    closed = client.post(f"{V1}/enrollment_windows/{window['id']}/close", headers=admin)
    assert closed.json()["is_open"] is False
    assert register(client, site["body"]).json()["code"] == "enrollment_closed"
    with Session(mariadb_engine) as session:
        expired = EnrollmentWindow(
            factory_id=site["factory"].id, expires_at=clock.now() - dt.timedelta(seconds=1)
        )
        session.add(expired)
        session.commit()
    assert register(client, site["body"]).status_code == 403
    assert robots(mariadb_engine) == 0


def test_unknown_factory_or_type_is_404_and_bad_bodies_422(
    client: TestClient, site: dict[str, Any]
) -> None:
    factory, model = site["body"]["factory"], site["body"]["robot_type"]
    assert register(client, {"factory": "nowhere", "robot_type": model}).json()["code"] == (
        "factory_not_found"
    )
    assert register(client, {"factory": factory, "robot_type": "nothing"}).json()["code"] == (
        "robot_type_not_found"
    )
    assert register(client, {"factory": factory}).status_code == 422
    assert register(client, {"factory": 1, "robot_type": model}).status_code == 422
    raw = client.post(f"{V1}/devices/register", content=b"{not json", headers=AXON_CONFIG)
    assert raw.status_code == 422


def test_a_window_admits_only_its_type_networks_and_count(
    client: TestClient, admin: dict[str, str], site: dict[str, Any], mariadb_engine: Engine
) -> None:
    factory_id = site["factory"].id
    open_window(
        client,
        admin,
        factory_id=factory_id,
        duration_minutes=5,
        robot_type_id=site["other_type"].id,
    )
    wrong_type = register(client, site["body"])
    assert (wrong_type.status_code, wrong_type.json()["code"]) == (403, "robot_type_not_enrolled")
    open_window(
        client, admin, factory_id=factory_id, duration_minutes=5, allowed_networks=["10.0.0.0/8"]
    )
    # The test client's address is not in 10.0.0.0/8.
    assert register(client, site["body"]).json()["code"] == "network_not_allowed"
    open_window(client, admin, factory_id=factory_id, duration_minutes=5, max_registrations=1)
    first = register(client, site["body"])
    assert first.status_code == 201, first.text
    assert first.json()["device_id"] == (
        f"AB-F{factory_id:04d}-T{site['robot_type'].id:04d}-000001"
    )
    second = register(client, site["body"])
    assert (second.status_code, second.json()["code"]) == (409, "enrollment_exhausted")
    assert robots(mariadb_engine) == 1


def test_registration_is_audited_and_the_token_stored_hashed(
    client: TestClient, admin: dict[str, str], site: dict[str, Any], mariadb_engine: Engine
) -> None:
    open_window(client, admin, factory_id=site["factory"].id, duration_minutes=5)
    body = register(client, site["body"]).json()
    again = register(client, site["body"]).json()
    assert again["device_id"].endswith("-000002")
    with Session(mariadb_engine) as session:
        audit = session.exec(
            select(AuditLog).where(col(AuditLog.action) == "device.register")
        ).all()
        tokens = session.exec(
            select(DeviceCredential).where(col(DeviceCredential.kind) == CredentialKind.WS_CLIENT)
        ).all()
    assert [a.actor_type for a in audit] == ["device", "device"]
    assert audit[0].after is not None
    assert audit[0].after["device_id"] == body["device_id"]
    assert len(tokens) == 2
    assert body["ws_client_auth_token"] not in {t.token_hash for t in tokens}


def test_pre_provisioned_robots_are_claimed_in_order(
    client: TestClient, admin: dict[str, str], site: dict[str, Any], mariadb_engine: Engine
) -> None:
    with Session(mariadb_engine, expire_on_commit=False) as session:
        robot = make_robot(
            session, factory_id=site["factory"].id, robot_type_id=site["robot_type"].id
        )
        session.commit()
    open_window(
        client, admin, factory_id=site["factory"].id, duration_minutes=5, robot_ids=[robot.id]
    )
    claimed = register(client, site["body"])
    assert claimed.status_code == 201, claimed.text
    assert claimed.json()["device_id"] == robot.device_id
    assert claimed.json()["robot_id"] == str(robot.id)
    assert register(client, site["body"]).json()["code"] == "enrollment_exhausted"


def test_window_input_is_validated(
    client: TestClient, admin: dict[str, str], site: dict[str, Any]
) -> None:
    factory_id = site["factory"].id
    cases = [
        ({"duration_minutes": 5, "allowed_networks": ["not-a-net"]}, "invalid_network"),
        ({"duration_minutes": 7 * 24 * 60 + 1}, "window_too_long"),
        ({"duration_minutes": 5, "robot_ids": [999_999_999]}, "invalid_robot"),
    ]
    for fields, code in cases:
        response = client.post(
            f"{V1}/enrollment_windows", json={"factory_id": factory_id, **fields}, headers=admin
        )
        assert response.status_code == 422, response.text
        assert response.json()["code"] == code
    missing = client.post(
        f"{V1}/enrollment_windows",
        json={"factory_id": 999_999_999, "duration_minutes": 5},
        headers=admin,
    )
    assert missing.status_code == 404


def test_registrations_are_rate_limited(
    make_client: Callable[..., TestClient], site: dict[str, Any]
) -> None:
    client = make_client(registration_rate_per_minute=2)
    statuses = [register(client, site["body"]).status_code for _ in range(3)]
    assert statuses == [403, 403, 429]


@pytest.mark.parametrize("mode", ["shared", "none"])
def test_object_store_modes_without_iam(
    make_client: Callable[..., TestClient], site: dict[str, Any], mode: str
) -> None:
    client = make_client(device_s3_credentials=mode)
    admin_token = client.post(
        f"{V1}/auth/login", json={"account": "admin", "password": "test-admin-password"}
    ).json()["access_token"]
    open_window(
        client,
        {"Authorization": f"Bearer {admin_token}"},
        factory_id=site["factory"].id,
        duration_minutes=5,
    )
    s3 = register(client, site["body"]).json()["s3"]
    assert s3["credentials"] == mode
    assert bool(s3["access_key"]) is (mode == "shared")


def test_a_store_without_iam_fails_registration_without_leaving_anything(
    make_client: Callable[..., TestClient], site: dict[str, Any], mariadb_engine: Engine
) -> None:
    client = make_client(s3_endpoint_url="http://127.0.0.1:9")  # nothing listens there
    admin_token = client.post(
        f"{V1}/auth/login", json={"account": "admin", "password": "test-admin-password"}
    ).json()["access_token"]
    open_window(
        client,
        {"Authorization": f"Bearer {admin_token}"},
        factory_id=site["factory"].id,
        duration_minutes=5,
    )
    failed = register(client, site["body"])
    assert failed.status_code == 503
    assert failed.json()["code"] == "object_store_credentials_unavailable"
    assert robots(mariadb_engine) == 0
    with Session(mariadb_engine) as session:
        window = session.exec(select(EnrollmentWindow)).one()
    assert window.registered_count == 0
