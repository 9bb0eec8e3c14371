"""Robot types, config templates, robots and stations through the API on real MariaDB."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core.models import (
    AuditLog,
    Batch,
    BatchStatus,
    Role,
    User,
)
from keystone_core.services.accounts import create_user
from keystone_core.services.audit import Actor
from tests.conftest import make_settings
from tests.factories import (
    make_batch,
    make_data_collector,
    make_factory,
    make_robot,
    make_robot_type,
)

pytestmark = pytest.mark.integration

V1 = "/api/v1"
PASSWORD = "correct-horse-battery"
Headers = dict[str, str]


@dataclass(frozen=True)
class World:
    """Two factories: A with robots/collectors, B with one of each."""

    factory_a: int
    factory_b: int
    robot_type: int
    robot_type_model: str
    other_robot_type: int
    robot_a1: int
    robot_a2: int
    robot_b: int
    device_a1: str
    collector_a1: int
    collector_a2: int
    collector_b: int
    admin: Headers
    manager_a: Headers
    admin_user_id: int


@pytest.fixture
def client(tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str) -> Iterator[TestClient]:
    settings = make_settings(
        tmp_path, database_url=mariadb_migrated, s3_endpoint_url="http://127.0.0.1:1"
    )
    with TestClient(create_app(settings)) as c:
        yield c


def login(client: TestClient, account: str, password: str) -> Headers:
    response = client.post(f"{V1}/auth/login", json={"account": account, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def add_user(
    engine: Engine,
    account: str,
    role: Role,
    factory_ids: list[int],
    *,
    data_collector_id: int | None = None,
) -> None:
    with Session(engine) as session:
        user = create_user(
            session,
            account=account,
            password=PASSWORD,
            role=role,
            factory_ids=factory_ids,
            actor=Actor.system("test"),
        )
        user.data_collector_id = data_collector_id
        session.add(user)
        session.commit()


def _id(row: Any) -> int:
    assert row.id is not None
    return int(row.id)


@pytest.fixture
def world(client: TestClient, mariadb_engine: Engine) -> World:
    with Session(mariadb_engine, expire_on_commit=False) as session:
        factory_a = make_factory(session)
        factory_b = make_factory(session)
        robot_type = make_robot_type(session)
        other_type = make_robot_type(session)
        a1 = make_robot(session, factory_id=factory_a.id, robot_type_id=robot_type.id)
        a2 = make_robot(session, factory_id=factory_a.id, robot_type_id=robot_type.id)
        b = make_robot(session, factory_id=factory_b.id, robot_type_id=robot_type.id)
        c1 = make_data_collector(session, factory_id=factory_a.id)
        c2 = make_data_collector(session, factory_id=factory_a.id)
        cb = make_data_collector(session, factory_id=factory_b.id)
        session.commit()
    add_user(mariadb_engine, "manager-a", Role.PRODUCTION_MANAGER, [_id(factory_a)])
    admin = login(client, "admin", "test-admin-password")
    return World(
        factory_a=_id(factory_a),
        factory_b=_id(factory_b),
        robot_type=_id(robot_type),
        robot_type_model=robot_type.model,
        other_robot_type=_id(other_type),
        robot_a1=_id(a1),
        robot_a2=_id(a2),
        robot_b=_id(b),
        device_a1=a1.device_id,
        collector_a1=_id(c1),
        collector_a2=_id(c2),
        collector_b=_id(cb),
        admin=admin,
        manager_a=login(client, "manager-a", PASSWORD),
        admin_user_id=int(client.get(f"{V1}/auth/me", headers=admin).json()["id"]),
    )


def audit_rows(engine: Engine, entity_type: str, entity_id: str | int) -> list[AuditLog]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(AuditLog)
                .where(
                    col(AuditLog.entity_type) == entity_type,
                    col(AuditLog.entity_id) == str(entity_id),
                )
                .order_by(col(AuditLog.id))
            ).all()
        )


def create_station(client: TestClient, headers: Headers, **body: Any) -> dict[str, Any]:
    response = client.post(f"{V1}/stations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


# --- robot types ----------------------------------------------------------------------


def test_robot_type_crud_duplicate_model_and_audit(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    body = {"name": "Arm v2", "model": "arm-v2", "ros_topics": ["/camera/image", "/joints"]}
    created = client.post(f"{V1}/robot_types", json=body, headers=world.admin)
    assert created.status_code == 201, created.text
    rt = created.json()
    assert rt["id"] == str(int(rt["id"]))
    assert rt["ros_topics"] == ["/camera/image", "/joints"]

    listed = client.get(f"{V1}/robot_types", params={"model": "arm-v2"}, headers=world.admin)
    assert [i["id"] for i in listed.json()["items"]] == [rt["id"]]
    assert listed.json()["total"] == 1

    dup = client.post(f"{V1}/robot_types", json=body, headers=world.admin)
    assert dup.status_code == 409
    assert dup.json()["code"] == "duplicate"
    assert dup.json()["detail"]["field"] == "model"

    updated = client.put(
        f"{V1}/robot_types/{rt['id']}", json={"manufacturer": "ArcheBase"}, headers=world.admin
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["manufacturer"] == "ArcheBase"

    # Everyone reads the catalog of types, only admins write it.
    assert client.get(f"{V1}/robot_types/{rt['id']}", headers=world.manager_a).status_code == 200
    forbidden = client.post(
        f"{V1}/robot_types", json={"name": "x", "model": "x"}, headers=world.manager_a
    )
    assert forbidden.status_code == 403

    assert client.delete(f"{V1}/robot_types/{rt['id']}", headers=world.admin).status_code == 204
    assert client.get(f"{V1}/robot_types/{rt['id']}", headers=world.admin).status_code == 404

    actions = [a.action for a in audit_rows(mariadb_engine, "robot_type", rt["id"])]
    assert actions == ["robot_type.create", "robot_type.update", "robot_type.delete"]


def test_robot_type_bad_input_is_422(client: TestClient, world: World) -> None:
    cases: list[dict[str, Any]] = [
        {"name": "x" * 129, "model": "m"},
        {"name": "n", "model": ""},
        {"name": "n", "model": "m", "ros_topics": ["t" * 256]},
        {"name": "n", "model": "m", "unknown": 1},
    ]
    for body in cases:
        response = client.post(f"{V1}/robot_types", json=body, headers=world.admin)
        assert response.status_code == 422, body
    null_name = client.put(
        f"{V1}/robot_types/{world.robot_type}", json={"name": None}, headers=world.admin
    )
    assert null_name.status_code == 422


def test_robot_type_with_robots_cannot_be_deleted(client: TestClient, world: World) -> None:
    response = client.delete(f"{V1}/robot_types/{world.robot_type}", headers=world.admin)
    assert response.status_code == 409
    assert response.json()["code"] == "still_referenced"
    assert response.json()["detail"]["referenced_by"] == "robots"
    assert response.json()["detail"]["count"] == 3


# --- config templates -----------------------------------------------------------------

RECORDER = (
    "device: {{ device_id }}\nrobot: {{robot_id}}\nfactory: {{ factory_id }}\n"
    "type: {{ robot_type_id }} ({{ robot_model }})\nrpc: {{ recorder_rpc_url }}\n"
    "dataset:\n  path: /axon/recording\nrecording:\n  sidecar:\n    mode: always\n"
)
RECORDER_V2 = RECORDER.replace("device:", "device_v2:")


def test_config_templates_lifecycle(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    base = f"{V1}/robot_types/{world.robot_type}/config_templates"
    empty = client.get(base, headers=world.manager_a)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {
        "templates": [
            {"filename": "recorder.yaml", "exists": False, "updated_at": None},
            {"filename": "transfer.yaml", "exists": False, "updated_at": None},
        ]
    }
    assert client.get(f"{base}/recorder.yaml", headers=world.admin).status_code == 404

    put = client.put(f"{base}/recorder.yaml", json={"content": RECORDER}, headers=world.admin)
    assert put.status_code == 200, put.text
    assert put.json()["content"] == RECORDER
    extra = client.put(f"{base}/extra.conf", json={"content": "a=1\n"}, headers=world.admin)
    assert extra.status_code == 200

    listed = client.get(base, headers=world.admin).json()["templates"]
    assert [(t["filename"], t["exists"]) for t in listed] == [
        ("recorder.yaml", True),
        ("transfer.yaml", False),
        ("extra.conf", True),
    ]
    assert listed[0]["updated_at"] is not None

    replaced = client.put(
        f"{base}/recorder.yaml", json={"content": RECORDER_V2}, headers=world.admin
    )
    assert replaced.status_code == 200
    got = client.get(f"{base}/recorder.yaml", headers=world.manager_a)
    assert got.json()["content"] == RECORDER_V2

    # Only admins write templates.
    denied = client.put(f"{base}/recorder.yaml", json={"content": "x"}, headers=world.manager_a)
    assert denied.status_code == 403

    assert client.delete(f"{base}/extra.conf", headers=world.admin).status_code == 204
    assert client.delete(f"{base}/extra.conf", headers=world.admin).status_code == 404
    assert client.get(f"{base}/extra.conf", headers=world.admin).status_code == 404

    # The audit trail keeps the content each write replaced.
    with Session(mariadb_engine) as session:
        rows = session.exec(
            select(AuditLog)
            .where(col(AuditLog.entity_type) == "robot_config_template")
            .order_by(col(AuditLog.id))
        ).all()
    assert [r.action for r in rows] == [
        "robot_config_template.create",
        "robot_config_template.create",
        "robot_config_template.update",
        "robot_config_template.delete",
    ]
    assert rows[2].before == {
        "robot_type_id": world.robot_type,
        "filename": "recorder.yaml",
        "content": RECORDER,
    }
    assert rows[2].after is not None
    assert rows[2].after["content"] == RECORDER_V2
    assert rows[2].actor_role == "admin"


@pytest.mark.parametrize(
    ("filename", "status"),
    [
        # Clients collapse a literal "..", so send it encoded.
        ("%2E%2E", 422),
        ("a\\b.yaml", 422),
        ("x" * 129, 422),
        ("bad name.yaml", 422),
        ("semi;colon", 422),
        # A slash (even encoded) is a different path: no such route.
        ("a%2Fb.yaml", 404),
    ],
)
def test_config_template_filename_is_validated(
    client: TestClient, world: World, filename: str, status: int
) -> None:
    url = f"{V1}/robot_types/{world.robot_type}/config_templates/{filename}"
    response = client.put(url, json={"content": "a: 1\n"}, headers=world.admin)
    assert response.status_code == status, response.text
    public = client.get(f"{V1}/robot_types/{world.robot_type}/configs/{filename}")
    assert public.status_code == status


def test_config_template_content_is_validated(client: TestClient, world: World) -> None:
    url = f"{V1}/robot_types/{world.robot_type}/config_templates/recorder.yaml"
    cases = {
        "empty_template": "  \n",
        "template_too_large": "é" * 40_000,  # 80 000 bytes: over the TEXT column
        "unknown_placeholder": "secret: {{ s3_secret_key }}\n",
    }
    for code, content in cases.items():
        response = client.put(url, json={"content": content}, headers=world.admin)
        assert response.status_code == 422, code
        assert response.json()["code"] == code
    missing_type = client.put(
        f"{V1}/robot_types/999999/config_templates/recorder.yaml",
        json={"content": "a: 1\n"},
        headers=world.admin,
    )
    assert missing_type.status_code == 404


def test_rendered_config_is_public_and_fills_the_device_identity(
    client: TestClient, world: World
) -> None:
    base = f"{V1}/robot_types/{world.robot_type}"
    put = client.put(
        f"{base}/config_templates/recorder.yaml", json={"content": RECORDER}, headers=world.admin
    )
    assert put.status_code == 200

    # What axon-config downloads: no credentials, the template as stored.
    raw = client.get(f"{base}/configs/recorder.yaml")
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.text == RECORDER

    rendered = client.get(f"{base}/configs/recorder.yaml", params={"device_id": world.device_a1})
    assert rendered.status_code == 200, rendered.text
    # Identity is filled here; the endpoint stays for axon-config to fill on the device.
    assert rendered.text == (
        f"device: {world.device_a1}\nrobot: {world.robot_a1}\nfactory: {world.factory_a}\n"
        f"type: {world.robot_type} ({world.robot_type_model})\n"
        "rpc: {{ recorder_rpc_url }}\n"
        "dataset:\n  path: /axon/recording\nrecording:\n  sidecar:\n    mode: always\n"
    )

    unknown = client.get(f"{base}/configs/recorder.yaml", params={"device_id": "nope"})
    assert unknown.status_code == 404
    # A device of another robot type is unknown here.
    other = client.get(
        f"{V1}/robot_types/{world.other_robot_type}/configs/recorder.yaml",
        params={"device_id": world.device_a1},
    )
    assert other.status_code == 404
    # Standard files without a stored template fall back to the defaults; others are 404.
    assert client.get(f"{base}/configs/transfer.yaml").status_code == 200
    assert client.get(f"{base}/configs/other.yaml").status_code == 404
    bad_device = client.get(f"{base}/configs/recorder.yaml", params={"device_id": "../x"})
    assert bad_device.status_code == 422


# --- robots ---------------------------------------------------------------------------


def test_robot_crud_filters_and_soft_delete(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    body = {
        "factory_id": world.factory_a,
        "robot_type_id": world.robot_type,
        "device_id": "AB-F0001-T0002-000003",
        "asset_id": "asset-7",
        "metadata": {"arm": "left"},
    }
    created = client.post(f"{V1}/robots", json=body, headers=world.manager_a)
    assert created.status_code == 201, created.text
    robot = created.json()
    assert robot["status"] == "active"
    assert robot["metadata"] == {"arm": "left"}
    assert robot["factory_id"] == str(world.factory_a)

    def ids(**params: Any) -> list[str]:
        response = client.get(f"{V1}/robots", params=params, headers=world.admin)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["items"]]

    assert ids(device_id="AB-F0001-T0002-000003") == [robot["id"]]
    assert len(ids(factory_id=world.factory_a)) == 3
    assert len(ids(robot_type_id=world.robot_type)) == 4
    assert ids(robot_type_id=world.other_robot_type) == []

    updated = client.put(
        f"{V1}/robots/{robot['id']}",
        json={"status": "maintenance", "metadata": {"arm": "right"}},
        headers=world.manager_a,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "maintenance"
    assert updated.json()["metadata"] == {"arm": "right"}
    assert ids(status="maintenance") == [robot["id"]]

    dup_device = client.post(
        f"{V1}/robots", json={**body, "asset_id": None}, headers=world.manager_a
    )
    assert dup_device.status_code == 409
    assert dup_device.json()["detail"]["field"] == "device_id"
    dup_asset = client.post(
        f"{V1}/robots", json={**body, "device_id": "other-1"}, headers=world.manager_a
    )
    assert dup_asset.status_code == 409
    assert dup_asset.json()["detail"]["field"] == "asset_id"

    asset_taken = client.put(
        f"{V1}/robots/{world.robot_a1}", json={"asset_id": "asset-7"}, headers=world.manager_a
    )
    assert asset_taken.status_code == 409
    assert asset_taken.json()["detail"]["field"] == "asset_id"

    assert client.delete(f"{V1}/robots/{robot['id']}", headers=world.manager_a).status_code == 204
    assert client.get(f"{V1}/robots/{robot['id']}", headers=world.admin).status_code == 404
    assert robot["id"] not in ids()
    assert robot["id"] in ids(include_deleted=True)

    actions = [a.action for a in audit_rows(mariadb_engine, "robot", robot["id"])]
    assert actions == ["robot.create", "robot.update", "robot.delete"]
    first = audit_rows(mariadb_engine, "robot", robot["id"])[0]
    assert first.actor_account == "manager-a"
    assert first.actor_role == "production_manager"
    assert first.factory_id == world.factory_a


def test_robot_bad_input_is_422(client: TestClient, world: World) -> None:
    good = {
        "factory_id": world.factory_a,
        "robot_type_id": world.robot_type,
        "device_id": "dev-422",
    }
    cases: list[dict[str, Any]] = [
        {**good, "status": "broken"},
        {**good, "device_id": "has space"},
        {**good, "device_id": "d" * 65},
        {**good, "name": "n" * 129},
        {**good, "asset_id": ""},
        {**good, "factory_id": "abc"},
    ]
    for body in cases:
        response = client.post(f"{V1}/robots", json=body, headers=world.admin)
        assert response.status_code == 422, body
    robot = f"{V1}/robots/{world.robot_a1}"
    assert client.put(robot, json={"status": "lost"}, headers=world.admin).status_code == 422
    assert client.put(robot, json={"device_id": "new"}, headers=world.admin).status_code == 422
    assert client.put(robot, json={"status": None}, headers=world.admin).status_code == 422
    listing = client.get(f"{V1}/robots", params={"status": "lost"}, headers=world.admin)
    assert listing.status_code == 422
    assert client.get(f"{V1}/robots", params={"limit": 0}, headers=world.admin).status_code == 422
    clamped = client.get(f"{V1}/robots", params={"limit": 1000}, headers=world.admin)
    assert clamped.json()["limit"] == 100
    unknown_type = client.post(
        f"{V1}/robots", json={**good, "robot_type_id": 999999}, headers=world.admin
    )
    assert unknown_type.status_code == 404
    assert unknown_type.json()["code"] == "reference_not_found"


def test_robot_at_a_station_cannot_be_deleted_retired_or_moved(
    client: TestClient, world: World
) -> None:
    create_station(
        client, world.admin, factory_id=world.factory_a, name="S1", robot_id=world.robot_a1
    )
    robot = f"{V1}/robots/{world.robot_a1}"
    deleted = client.delete(robot, headers=world.admin)
    assert deleted.status_code == 409
    assert deleted.json()["code"] == "still_referenced"
    assert deleted.json()["detail"]["referenced_by"] == "stations"

    retired = client.put(robot, json={"status": "retired"}, headers=world.admin)
    assert retired.status_code == 409
    assert retired.json()["code"] == "robot_bound"
    moved = client.put(robot, json={"factory_id": world.factory_b}, headers=world.admin)
    assert moved.status_code == 409
    assert moved.json()["detail"]["field"] == "factory_id"
    # Maintenance keeps it at its station.
    assert client.put(robot, json={"status": "maintenance"}, headers=world.admin).status_code == 200


# --- stations -------------------------------------------------------------------------


def test_station_crud_and_binding_history(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    station = create_station(
        client,
        world.manager_a,
        factory_id=world.factory_a,
        name="Line 1",
        robot_id=world.robot_a1,
        data_collector_id=world.collector_a1,
        metadata={"bay": 3},
    )
    assert station["robot_id"] == str(world.robot_a1)
    assert station["metadata"] == {"bay": 3}
    url = f"{V1}/stations/{station['id']}"

    # Rebind: a1 → a2, then a2 → none, then a1 again.
    for robot_id in (world.robot_a2, None, world.robot_a1):
        response = client.put(url, json={"robot_id": robot_id}, headers=world.manager_a)
        assert response.status_code == 200, response.text
        assert response.json()["robot_id"] == (None if robot_id is None else str(robot_id))
    renamed = client.put(url, json={"status": "break", "name": "Line 1b"}, headers=world.admin)
    assert renamed.status_code == 200
    assert renamed.json()["status"] == "break"

    history = client.get(f"{V1}/robots/{world.robot_a1}/workstation_history", headers=world.admin)
    assert history.status_code == 200, history.text
    page = history.json()
    assert page["total"] == 2
    newest, oldest = page["items"]
    assert newest["unbound_at"] is None
    assert newest["workstation_id"] == station["id"]
    assert newest["workstation_name"] == "Line 1b"
    assert oldest["unbound_at"] is not None
    assert oldest["bound_at"] <= oldest["unbound_at"] <= newest["bound_at"]
    assert oldest["bound_by_user_id"] is not None

    a2 = client.get(
        f"{V1}/robots/{world.robot_a2}/workstation_history",
        params={"limit": 500},
        headers=world.manager_a,
    ).json()
    assert a2["limit"] == 100
    assert [(i["unbound_at"] is None) for i in a2["items"]] == [False]
    assert a2["items"][0]["bound_by_user_id"] is not None

    # Deleting the station closes the open binding and frees robot and collector.
    assert client.delete(url, headers=world.manager_a).status_code == 204
    assert client.get(url, headers=world.admin).status_code == 404
    closed = client.get(
        f"{V1}/robots/{world.robot_a1}/workstation_history", headers=world.admin
    ).json()
    assert all(i["unbound_at"] is not None for i in closed["items"])
    create_station(
        client,
        world.admin,
        factory_id=world.factory_a,
        name="Line 2",
        robot_id=world.robot_a1,
        data_collector_id=world.collector_a1,
    )

    actions = [a.action for a in audit_rows(mariadb_engine, "station", station["id"])]
    assert actions == ["station.create"] + ["station.update"] * 4 + ["station.delete"]


def test_station_binding_records_who_bound(client: TestClient, world: World) -> None:
    create_station(
        client, world.admin, factory_id=world.factory_a, name="S", robot_id=world.robot_a2
    )
    history = client.get(f"{V1}/robots/{world.robot_a2}/workstation_history", headers=world.admin)
    assert history.json()["items"][0]["bound_by_user_id"] == str(world.admin_user_id)


def test_station_rules(client: TestClient, world: World, mariadb_engine: Engine) -> None:
    first = create_station(
        client,
        world.admin,
        factory_id=world.factory_a,
        name="S1",
        robot_id=world.robot_a1,
        data_collector_id=world.collector_a1,
    )

    def post(**body: Any) -> Any:
        return client.post(
            f"{V1}/stations", json={"factory_id": world.factory_a, **body}, headers=world.admin
        )

    robot_taken = post(name="S2", robot_id=world.robot_a1)
    assert robot_taken.status_code == 409
    assert robot_taken.json()["code"] == "robot_already_bound"
    assert robot_taken.json()["detail"]["station_id"] == first["id"]
    collector_taken = post(name="S2", data_collector_id=world.collector_a1)
    assert collector_taken.status_code == 409
    assert collector_taken.json()["code"] == "data_collector_already_bound"

    other_factory_robot = post(name="S2", robot_id=world.robot_b)
    assert other_factory_robot.status_code == 422
    assert other_factory_robot.json()["code"] == "factory_mismatch"
    assert other_factory_robot.json()["detail"]["field"] == "robot_id"
    other_factory_collector = post(name="S2", data_collector_id=world.collector_b)
    assert other_factory_collector.status_code == 422
    assert other_factory_collector.json()["detail"]["field"] == "data_collector_id"

    duplicate = post(name="S1")
    assert duplicate.status_code == 409
    assert duplicate.json()["code"] == "duplicate"
    assert duplicate.json()["detail"]["field"] == ["factory_id", "name"]

    assert post(name="S2", status="closed").status_code == 422
    assert post(name="").status_code == 422
    assert post(name="n" * 129).status_code == 422
    assert post(name="S2", robot_id=999999).status_code == 404

    second = create_station(client, world.admin, factory_id=world.factory_a, name="S2")
    url = f"{V1}/stations/{second['id']}"
    steal = client.put(url, json={"robot_id": world.robot_a1}, headers=world.admin)
    assert steal.status_code == 409
    assert steal.json()["code"] == "robot_already_bound"
    rename = client.put(url, json={"name": "S1"}, headers=world.admin)
    assert rename.status_code == 409
    assert rename.json()["code"] == "duplicate"
    move = client.put(url, json={"factory_id": world.factory_b}, headers=world.admin)
    assert move.status_code == 422
    assert client.put(url, json={"status": "paused"}, headers=world.admin).status_code == 422
    assert client.put(url, json={"name": None}, headers=world.admin).status_code == 422

    with Session(mariadb_engine) as session:
        retired = make_robot(
            session,
            factory_id=world.factory_a,
            robot_type_id=world.robot_type,
            status="retired",
        )
        session.commit()
        retired_id = retired.id
    refused = client.put(url, json={"robot_id": retired_id}, headers=world.admin)
    assert refused.status_code == 409
    assert refused.json()["code"] == "robot_retired"

    # Nothing of the refused writes was kept.
    assert [a.action for a in audit_rows(mariadb_engine, "station", second["id"])] == [
        "station.create"
    ]


def test_station_with_open_work_cannot_be_deleted(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    station = create_station(
        client, world.admin, factory_id=world.factory_a, name="S", robot_id=world.robot_a1
    )
    with Session(mariadb_engine) as session:
        batch = make_batch(session, factory_id=world.factory_a, workstation_id=int(station["id"]))
        session.commit()
        batch_id = batch.id
    url = f"{V1}/stations/{station['id']}"
    refused = client.delete(url, headers=world.admin)
    assert refused.status_code == 409
    assert refused.json()["code"] == "still_referenced"
    assert refused.json()["detail"]["referenced_by"] == "open batches"
    # The refused delete left the binding open.
    history = client.get(f"{V1}/robots/{world.robot_a1}/workstation_history", headers=world.admin)
    assert history.json()["items"][0]["unbound_at"] is None

    with Session(mariadb_engine) as session:
        row = session.get(Batch, batch_id)
        assert row is not None
        row.status = BatchStatus.COMPLETED
        session.add(row)
        session.commit()
    assert client.delete(url, headers=world.admin).status_code == 204


def test_station_filters_and_lookup(client: TestClient, world: World) -> None:
    s1 = create_station(
        client,
        world.admin,
        factory_id=world.factory_a,
        name="S1",
        robot_id=world.robot_a1,
        data_collector_id=world.collector_a1,
    )
    s2 = create_station(
        client, world.admin, factory_id=world.factory_a, name="S2", status="offline"
    )
    sb = create_station(client, world.admin, factory_id=world.factory_b, name="SB")

    def ids(**params: Any) -> list[str]:
        response = client.get(f"{V1}/stations", params=params, headers=world.admin)
        assert response.status_code == 200, response.text
        return [s["id"] for s in response.json()["items"]]

    assert ids(factory_id=world.factory_a) == [s1["id"], s2["id"]]
    assert ids(status="offline") == [s2["id"]]
    assert ids(robot_id=world.robot_a1) == [s1["id"]]
    assert ids(data_collector_id=world.collector_a1) == [s1["id"]]
    assert (
        client.get(f"{V1}/stations", params={"status": "x"}, headers=world.admin).status_code == 422
    )

    assert client.delete(f"{V1}/stations/{s2['id']}", headers=world.admin).status_code == 204
    lookup = client.post(
        f"{V1}/stations/lookup",
        json={"workstation_ids": [s1["id"], s2["id"], sb["id"], "999999"]},
        headers=world.admin,
    )
    assert lookup.status_code == 200, lookup.text
    items = {i["id"]: i for i in lookup.json()["items"]}
    assert set(items) == {s1["id"], s2["id"], sb["id"]}
    assert items[s2["id"]]["deleted"] is True
    assert items[s1["id"]]["deleted"] is False
    assert items[s1["id"]]["robot_serial"] == world.device_a1
    assert items[s1["id"]]["collector_operator_id"] is not None
    assert items[sb["id"]]["robot_serial"] is None

    too_many = client.post(
        f"{V1}/stations/lookup", json={"workstation_ids": list(range(101))}, headers=world.admin
    )
    assert too_many.status_code == 422
    empty = client.post(f"{V1}/stations/lookup", json={"workstation_ids": []}, headers=world.admin)
    assert empty.json() == {"items": []}


# --- factory scope and collectors -----------------------------------------------------


def test_manager_of_factory_a_gets_404_for_factory_b(client: TestClient, world: World) -> None:
    sb = create_station(
        client, world.admin, factory_id=world.factory_b, name="SB", robot_id=world.robot_b
    )
    headers = world.manager_a
    robot_b = f"{V1}/robots/{world.robot_b}"
    assert client.get(robot_b, headers=headers).status_code == 404
    assert client.put(robot_b, json={"name": "x"}, headers=headers).status_code == 404
    assert client.delete(robot_b, headers=headers).status_code == 404
    assert client.get(f"{robot_b}/workstation_history", headers=headers).status_code == 404
    station_b = f"{V1}/stations/{sb['id']}"
    assert client.get(station_b, headers=headers).status_code == 404
    assert client.put(station_b, json={"name": "x"}, headers=headers).status_code == 404
    assert client.delete(station_b, headers=headers).status_code == 404

    robots = client.get(f"{V1}/robots", headers=headers).json()
    assert {r["factory_id"] for r in robots["items"]} == {str(world.factory_a)}
    assert robots["total"] == 2
    assert client.get(f"{V1}/stations", headers=headers).json()["total"] == 0
    lookup = client.post(
        f"{V1}/stations/lookup", json={"workstation_ids": [sb["id"]]}, headers=headers
    )
    assert lookup.json() == {"items": []}

    into_b = client.post(
        f"{V1}/robots",
        json={"factory_id": world.factory_b, "robot_type_id": world.robot_type, "device_id": "z"},
        headers=headers,
    )
    assert into_b.status_code == 404
    b_robot_in_a = client.post(
        f"{V1}/stations",
        json={"factory_id": world.factory_a, "name": "S", "robot_id": world.robot_b},
        headers=headers,
    )
    assert b_robot_in_a.status_code == 404
    assert b_robot_in_a.json()["code"] == "reference_not_found"
    move_to_b = client.put(
        f"{V1}/robots/{world.robot_a1}", json={"factory_id": world.factory_b}, headers=headers
    )
    assert move_to_b.status_code == 404


def test_data_collector_sees_only_its_station(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    own = create_station(
        client,
        world.admin,
        factory_id=world.factory_a,
        name="Own",
        robot_id=world.robot_a1,
        data_collector_id=world.collector_a1,
    )
    other = create_station(
        client,
        world.admin,
        factory_id=world.factory_a,
        name="Other",
        robot_id=world.robot_a2,
        data_collector_id=world.collector_a2,
    )
    add_user(
        mariadb_engine,
        "collector-1",
        Role.DATA_COLLECTOR,
        [world.factory_a],
        data_collector_id=world.collector_a1,
    )
    headers = login(client, "collector-1", PASSWORD)

    listed = client.get(f"{V1}/stations", headers=headers).json()
    assert [s["id"] for s in listed["items"]] == [own["id"]]
    assert listed["total"] == 1
    assert client.get(f"{V1}/stations/{own['id']}", headers=headers).status_code == 200
    assert client.get(f"{V1}/stations/{other['id']}", headers=headers).status_code == 404
    lookup = client.post(
        f"{V1}/stations/lookup",
        json={"workstation_ids": [own["id"], other["id"]]},
        headers=headers,
    )
    assert [i["id"] for i in lookup.json()["items"]] == [own["id"]]

    robots = client.get(f"{V1}/robots", headers=headers).json()
    assert [r["id"] for r in robots["items"]] == [str(world.robot_a1)]
    assert client.get(f"{V1}/robots/{world.robot_a2}", headers=headers).status_code == 404

    # Collectors read; they do not write stations or see binding history.
    denied = client.post(
        f"{V1}/stations", json={"factory_id": world.factory_a, "name": "X"}, headers=headers
    )
    assert denied.status_code == 403
    history = client.get(f"{V1}/robots/{world.robot_a1}/workstation_history", headers=headers)
    assert history.status_code == 403


def test_collector_account_without_a_collector_sees_no_station(
    client: TestClient, world: World, mariadb_engine: Engine
) -> None:
    create_station(
        client,
        world.admin,
        factory_id=world.factory_a,
        name="Own",
        data_collector_id=world.collector_a1,
    )
    add_user(mariadb_engine, "collector-x", Role.DATA_COLLECTOR, [world.factory_a])
    headers = login(client, "collector-x", PASSWORD)
    assert client.get(f"{V1}/stations", headers=headers).json()["total"] == 0
    assert client.get(f"{V1}/robots", headers=headers).json()["total"] == 0
    with Session(mariadb_engine) as session:
        user = session.exec(select(User).where(col(User.account) == "collector-x")).one()
        assert user.data_collector_id is None


def test_anonymous_is_401_on_every_non_public_route(client: TestClient, world: World) -> None:
    for method, url in [
        ("GET", f"{V1}/robots"),
        ("GET", f"{V1}/stations"),
        ("GET", f"{V1}/robot_types"),
        ("POST", f"{V1}/stations/lookup"),
        ("GET", f"{V1}/robot_types/{world.robot_type}/config_templates"),
    ]:
        assert client.request(method, url).status_code == 401, url


def test_renaming_a_robot_type_to_an_existing_model_is_409(
    client: TestClient, world: World
) -> None:
    response = client.put(
        f"{V1}/robot_types/{world.other_robot_type}",
        json={"model": world.robot_type_model},
        headers=world.admin,
    )
    assert response.status_code == 409
    assert response.json()["detail"]["field"] == "model"


def test_concurrent_binds_of_one_robot_leave_exactly_one_station(
    client: TestClient, world: World
) -> None:
    def bind(n: int) -> int:
        response = client.post(
            f"{V1}/stations",
            json={"factory_id": world.factory_a, "name": f"Race {n}", "robot_id": world.robot_a1},
            headers=world.admin,
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(bind, range(8)))
    assert statuses == [201] + [409] * 7
    stations = client.get(
        f"{V1}/stations", params={"robot_id": world.robot_a1}, headers=world.admin
    ).json()
    assert stations["total"] == 1
    history = client.get(f"{V1}/robots/{world.robot_a1}/workstation_history", headers=world.admin)
    assert history.json()["total"] == 1


@pytest.mark.parametrize(
    ("filename", "content", "code"),
    [
        ("recorder.yaml", RECORDER.replace("mode: always", "mode: none"), "sidecar_mode_required"),
        (
            "recorder.yaml",
            RECORDER.replace("/axon/recording", "/tmp/elsewhere"),
            "data_path_mismatch",
        ),
        ("recorder.yaml", "dataset: [unclosed\n", "invalid_yaml"),
        (
            "transfer.yaml",
            "scanner:\n  data_dir: /axon/recording\n  require_json_sidecar: false\n",
            "sidecar_required",
        ),
        (
            "transfer.yaml",
            "scanner:\n  data_dir: /data\n  require_json_sidecar: true\n",
            "data_path_mismatch",
        ),
    ],
)
def test_device_templates_must_keep_sidecar_mode_and_one_data_directory(
    client: TestClient, world: World, filename: str, content: str, code: str
) -> None:
    base = f"{V1}/robot_types/{world.robot_type}/config_templates"
    response = client.put(f"{base}/{filename}", json={"content": content}, headers=world.admin)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code


def test_robot_types_without_templates_get_keystones_defaults(
    client: TestClient, world: World
) -> None:
    for filename in ("recorder.yaml", "transfer.yaml"):
        response = client.get(f"{V1}/robot_types/{world.robot_type}/configs/{filename}")
        assert response.status_code == 200
        assert "{{ " in response.text  # placeholders for axon-config, no secrets
    recorder = client.get(f"{V1}/robot_types/{world.robot_type}/configs/recorder.yaml").text
    assert "mode: always" in recorder
    assert '"{{ ws_client_auth_token }}"' in recorder
