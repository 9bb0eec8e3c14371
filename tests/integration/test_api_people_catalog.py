"""People, catalog and audit routes on MariaDB: CRUD, factory scope, conflicts, bad input, audit."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import AuditLog, Role, Workstation
from keystone_core.services.accounts import create_user
from keystone_core.services.audit import Actor
from tests.conftest import make_settings
from tests.factories import (
    make_data_collector,
    make_factory,
    make_inspector,
    make_order,
    make_scene,
    make_skill,
    make_sop,
    make_subscene,
    make_task,
    make_workstation,
)

pytestmark = pytest.mark.integration

V1 = "/api/v1"
ADMIN_PASSWORD = "test-admin-password"
PM_PASSWORD = "manager-password"


@dataclass
class Api:
    """A TestClient that remembers every successful write, to check each left an audit row."""

    client: TestClient
    writes: list[tuple[str, str, str]] = field(default_factory=list)

    def login(self, account: str, password: str) -> dict[str, str]:
        response = self.client.post(
            f"{V1}/auth/login", json={"account": account, "password": password}
        )
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    def call(
        self, method: str, path: str, headers: dict[str, str], **kwargs: Any
    ) -> httpx.Response:
        response: httpx.Response = self.client.request(method, V1 + path, headers=headers, **kwargs)
        if method != "GET" and response.status_code < 300:
            template = re.sub(r"/\d+$", "/{id}", V1 + path.split("?")[0])
            request_id = response.headers["x-request-id"]
            self.writes.append((request_id, f"{method} {template}", path))
        return response

    def get(self, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
        return self.call("GET", path, headers, **kw)

    def post(self, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
        return self.call("POST", path, headers, **kw)

    def put(self, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
        return self.call("PUT", path, headers, **kw)

    def delete(self, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
        return self.call("DELETE", path, headers, **kw)


@dataclass(frozen=True)
class World:
    factory_a: int
    factory_b: int
    admin: dict[str, str]
    manager: dict[str, str]  # production manager of factory A
    manager_id: int


@pytest.fixture
def api(tmp_path: Path, mariadb_engine: Engine, mariadb_migrated: str) -> Iterator[Api]:
    settings = make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        s3_endpoint_url="http://127.0.0.1:1",
        s3_access_key="k",
        s3_secret_key="s",
    )
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        yield api
    # Every successful write left an audit row of its request with the caller's role and route.
    with Session(mariadb_engine) as session:
        for request_id, route, path in api.writes:
            rows = session.exec(select(AuditLog).where(AuditLog.request_id == request_id)).all()
            assert rows, f"{route} ({path}) wrote no audit row"
            for row in rows:
                assert row.actor_type == "user"
                assert row.actor_role, f"{route}: audit row without actor_role"
                assert row.route == route


@pytest.fixture
def world(api: Api, mariadb_engine: Engine) -> World:
    with Session(mariadb_engine) as session:
        a = make_factory(session)
        b = make_factory(session)
        assert a.id is not None
        assert b.id is not None
        manager = create_user(
            session,
            account="pm-a",
            password=PM_PASSWORD,
            role=Role.PRODUCTION_MANAGER,
            factory_ids=[a.id],
            actor=Actor.system("test"),
        )
        session.commit()
        ids = (a.id, b.id, manager.id)
    assert ids[2] is not None
    return World(
        factory_a=ids[0],
        factory_b=ids[1],
        admin=api.login("admin", ADMIN_PASSWORD),
        manager=api.login("pm-a", PM_PASSWORD),
        manager_id=ids[2],
    )


def seed(engine: Engine, build: Any) -> Any:
    """Run ``build(session)`` in a committed transaction and return its result."""
    with Session(engine, expire_on_commit=False) as session:
        result = build(session)
        session.commit()
        return result


# Data collectors and inspectors.


def test_data_collector_crud_and_filters(api: Api, world: World) -> None:
    body = {
        "factory_id": world.factory_a,
        "name": "Ada",
        "operator_id": "op-ada",
        "email": "ada@example.com",
        "metadata": {"shift": "early"},
    }
    created = api.post("/data_collectors", world.admin, json=body)
    assert created.status_code == 201, created.text
    row = created.json()
    assert isinstance(row["id"], str)
    assert row["factory_id"] == str(world.factory_a)
    assert row["status"] == "active"
    assert row["metadata"] == {"shift": "early"}
    other = api.post(
        "/data_collectors",
        world.admin,
        json={"factory_id": world.factory_b, "name": "Bob", "operator_id": "op-ada"},
    )
    assert other.status_code == 201, "the same operator_id is fine in another factory"

    listed = api.get(f"/data_collectors?factory_id={world.factory_a}", world.admin).json()
    assert listed["total"] == 1
    assert listed["items"][0]["id"] == row["id"]
    assert api.get("/data_collectors?operator_id=op-ada", world.admin).json()["total"] == 2
    assert api.get("/data_collectors?status=on_leave", world.admin).json()["total"] == 0

    updated = api.put(
        f"/data_collectors/{row['id']}",
        world.admin,
        json={"status": "on_leave", "metadata": {"shift": "late"}},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["status"] == "on_leave"
    assert updated.json()["metadata"] == {"shift": "late"}
    assert api.get("/data_collectors?status=on_leave", world.admin).json()["total"] == 1

    assert api.delete(f"/data_collectors/{row['id']}", world.admin).status_code == 204
    assert api.get(f"/data_collectors/{row['id']}", world.admin).status_code == 404
    assert api.get("/data_collectors", world.admin).json()["total"] == 1
    with_deleted = api.get("/data_collectors?include_deleted=true", world.admin).json()
    assert with_deleted["total"] == 2


def test_inspector_crud_and_filters(api: Api, world: World) -> None:
    created = api.post(
        "/inspectors",
        world.manager,
        json={
            "factory_id": world.factory_a,
            "name": "Ines",
            "inspector_id": "qa-1",
            "certification_level": "senior",
        },
    )
    assert created.status_code == 201, created.text
    row = created.json()
    assert row["certification_level"] == "senior"
    assert row["status"] == "active"
    assert api.get(f"/inspectors/{row['id']}", world.manager).json()["name"] == "Ines"
    assert api.get("/inspectors?status=inactive", world.manager).json()["total"] == 0

    updated = api.put(
        f"/inspectors/{row['id']}",
        world.manager,
        json={"status": "inactive", "certification_level": "level_2"},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["certification_level"] == "level_2"
    page = api.get(f"/inspectors?status=inactive&factory_id={world.factory_a}", world.manager)
    assert [i["id"] for i in page.json()["items"]] == [row["id"]]
    assert api.delete(f"/inspectors/{row['id']}", world.manager).status_code == 204
    assert api.get(f"/inspectors/{row['id']}", world.manager).status_code == 404


def test_a_manager_of_factory_a_gets_404_for_factory_b(
    api: Api, world: World, mariadb_engine: Engine
) -> None:
    def build(session: Session) -> dict[str, int]:
        scene_b = make_scene(session, factory_id=world.factory_b)
        ids = {
            "collector_a": make_data_collector(session, factory_id=world.factory_a).id,
            "collector_b": make_data_collector(session, factory_id=world.factory_b).id,
            "inspector_b": make_inspector(session, factory_id=world.factory_b).id,
            "scene_b": scene_b.id,
            "subscene_b": make_subscene(session, scene_id=scene_b.id).id,
        }
        return {k: int(v) for k, v in ids.items() if v is not None}

    ids = seed(mariadb_engine, build)
    pm = world.manager
    for path in (
        f"/data_collectors/{ids['collector_b']}",
        f"/inspectors/{ids['inspector_b']}",
        f"/scenes/{ids['scene_b']}",
        f"/subscenes/{ids['subscene_b']}",
    ):
        assert api.get(path, pm).status_code == 404, path
        assert api.put(path, pm, json={"name": "taken over"}).status_code == 404, path
        assert api.delete(path, pm).status_code == 404, path
        assert api.get(path, world.admin).status_code == 200, path

    listed = api.get("/data_collectors", pm).json()
    assert [c["id"] for c in listed["items"]] == [str(ids["collector_a"])]
    assert api.get(f"/data_collectors?factory_id={world.factory_b}", pm).json()["total"] == 0
    assert api.get("/subscenes", pm).json()["total"] == 0

    for path, body in (
        ("/data_collectors", {"factory_id": world.factory_b, "name": "x", "operator_id": "x"}),
        ("/inspectors", {"factory_id": world.factory_b, "name": "x", "inspector_id": "x"}),
        ("/scenes", {"factory_id": world.factory_b, "name": "mine now"}),
        ("/subscenes", {"scene_id": ids["scene_b"], "name": "mine now"}),
    ):
        response = api.post(path, pm, json=body)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["code"] == "reference_not_found"
    # Moving its own collector into factory B is not possible either.
    move = api.put(
        f"/data_collectors/{ids['collector_a']}", pm, json={"factory_id": world.factory_b}
    )
    assert move.status_code == 422


def test_global_scenes_are_visible_to_managers_but_only_admins_change_them(
    api: Api, world: World, mariadb_engine: Engine
) -> None:
    def build(session: Session) -> tuple[int, int]:
        scene = make_scene(session, factory_id=None)
        sub = make_subscene(session, scene_id=scene.id)
        return int(scene.id or 0), int(sub.id or 0)

    scene_id, sub_id = seed(mariadb_engine, build)
    pm = world.manager
    assert api.get(f"/scenes/{scene_id}", pm).json()["factory_id"] is None
    assert api.get(f"/subscenes/{sub_id}", pm).status_code == 200
    assert api.post("/scenes", pm, json={"name": "everywhere"}).status_code == 403
    assert api.put(f"/scenes/{scene_id}", pm, json={"description": "x"}).status_code == 403
    assert api.delete(f"/scenes/{scene_id}", pm).status_code == 403
    assert api.post("/subscenes", pm, json={"scene_id": scene_id, "name": "n"}).status_code == 403
    assert api.put(f"/subscenes/{sub_id}", pm, json={"name": "n"}).status_code == 403
    assert api.delete(f"/subscenes/{sub_id}", pm).status_code == 403

    own = api.post("/scenes", pm, json={"factory_id": world.factory_a, "name": "own"})
    assert own.status_code == 201, own.text
    admin_global = api.post("/scenes", world.admin, json={"name": "shared"})
    assert admin_global.status_code == 201
    assert admin_global.json()["factory_id"] is None
    page = api.get(f"/scenes?factory_id={world.factory_a}", pm).json()
    assert [s["name"] for s in page["items"]] == ["own"]
    assert api.get("/scenes?name=shared", pm).json()["total"] == 1


# Catalog.


def test_catalog_crud_happy_paths(api: Api, world: World) -> None:
    pm = world.manager
    scene = api.post(
        "/scenes",
        pm,
        json={
            "factory_id": world.factory_a,
            "name": "Kitchen",
            "initial_scene_layout_template": "table: {{ table }}",
        },
    )
    assert scene.status_code == 201, scene.text
    scene_id = scene.json()["id"]
    sub = api.post("/subscenes", pm, json={"scene_id": scene_id, "name": "Sink"})
    assert sub.status_code == 201, sub.text
    assert sub.json()["scene_id"] == scene_id
    assert api.get(f"/subscenes?scene_id={scene_id}", pm).json()["total"] == 1
    renamed = api.put(f"/subscenes/{sub.json()['id']}", pm, json={"name": "Sink 2"})
    assert renamed.json()["name"] == "Sink 2"

    skill = api.post("/skills", pm, json={"slug": "pick", "metadata": {"hands": 2}})
    assert skill.status_code == 201, skill.text
    assert skill.json()["version"] == "1.0.0"
    assert skill.json()["metadata"] == {"hands": 2}
    assert api.post("/skills", pm, json={"slug": "place", "version": "2.0"}).status_code == 201
    assert api.get("/skills?slug=place", world.manager).json()["items"][0]["version"] == "2.0"
    sop = api.post(
        "/sops",
        pm,
        json={"slug": "pick-and-place", "skill_sequence": ["pick", "place"], "content": "1. …"},
    )
    assert sop.status_code == 201, sop.text
    assert sop.json()["skill_sequence"] == ["pick", "place"]
    sop_id = sop.json()["id"]
    changed = api.put(f"/sops/{sop_id}", pm, json={"skill_sequence": ["place"]})
    assert changed.status_code == 200, changed.text
    assert changed.json()["skill_sequence"] == ["place"]
    described = api.put(f"/skills/{skill.json()['id']}", pm, json={"description": "grab it"})
    assert described.json()["description"] == "grab it"

    # Deletes in dependency order; each row is then gone.
    for path in (
        f"/sops/{sop_id}",
        f"/skills/{skill.json()['id']}",
        f"/subscenes/{sub.json()['id']}",
        f"/scenes/{scene_id}",
    ):
        assert api.delete(path, pm).status_code == 204, path
        assert api.get(path, pm).status_code == 404, path


def test_duplicates_are_409_naming_the_field(
    api: Api, world: World, mariadb_engine: Engine
) -> None:
    admin = world.admin

    def conflict(path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert api.post(path, admin, json=body).status_code == 201, path
        again = api.post(path, admin, json=body)
        assert again.status_code == 409, (path, again.text)
        error: dict[str, Any] = again.json()
        assert error["code"] == "duplicate"
        return error

    error = conflict(
        "/data_collectors", {"factory_id": world.factory_a, "name": "A", "operator_id": "op-1"}
    )
    assert error["detail"]["field"] == ["factory_id", "operator_id"]
    assert "operator_id='op-1'" in error["message"]
    error = conflict(
        "/inspectors", {"factory_id": world.factory_a, "name": "I", "inspector_id": "qa-1"}
    )
    assert error["detail"]["field"] == ["factory_id", "inspector_id"]
    error = conflict("/scenes", {"factory_id": world.factory_a, "name": "Lab"})
    assert error["detail"]["field"] == "name"
    scene_id = api.get("/scenes?name=Lab", admin).json()["items"][0]["id"]
    error = conflict("/subscenes", {"scene_id": scene_id, "name": "Bench"})
    assert error["detail"]["field"] == ["scene_id", "name"]
    error = conflict("/skills", {"slug": "wipe", "version": "1.0.0"})
    assert error["detail"]["field"] == ["slug", "version"]
    error = conflict("/sops", {"slug": "clean", "skill_sequence": ["wipe"]})
    assert error["detail"]["field"] == ["slug", "version"]
    user = {"account": "Dup", "password": "long-enough", "role": "admin"}
    error = conflict("/users", user)
    assert error["detail"]["field"] == "account"
    # Accounts compare case-insensitively.
    assert api.post("/users", admin, json={**user, "account": "DUP"}).status_code == 409

    # An update that would collide is a 409 too.
    other = api.post("/scenes", admin, json={"factory_id": world.factory_a, "name": "Lab 2"})
    clash = api.put(f"/scenes/{other.json()['id']}", admin, json={"name": "Lab"})
    assert clash.status_code == 409
    assert clash.json()["detail"]["field"] == "name"


def test_deletes_with_live_references_are_409(
    api: Api, world: World, mariadb_engine: Engine
) -> None:
    def build(session: Session) -> dict[str, int]:
        collector = make_data_collector(session, factory_id=world.factory_a)
        station = make_workstation(
            session, factory_id=world.factory_a, data_collector_id=collector.id
        )
        scene_with_sub = make_scene(session, factory_id=world.factory_a)
        make_subscene(session, scene_id=scene_with_sub.id)
        scene_with_order = make_scene(session, factory_id=world.factory_a)
        make_order(session, factory_id=world.factory_a, scene_id=scene_with_order.id)
        subscene = make_subscene(session, scene_id=make_scene(session, factory_id=None).id)
        sop = make_sop(session)
        make_task(session, factory_id=world.factory_a, subscene_id=subscene.id, sop_id=sop.id)
        skill = make_skill(session, slug="used-by-sop")
        make_sop(session, skill_sequence=["used-by-sop"])
        ids = {
            "collector": collector.id,
            "station": station.id,
            "scene_with_sub": scene_with_sub.id,
            "scene_with_order": scene_with_order.id,
            "subscene": subscene.id,
            "sop": sop.id,
            "skill": skill.id,
        }
        return {k: int(v) for k, v in ids.items() if v is not None}

    ids = seed(mariadb_engine, build)
    admin = world.admin
    for path, label in (
        (f"/data_collectors/{ids['collector']}", "stations"),
        (f"/scenes/{ids['scene_with_sub']}", "subscenes"),
        (f"/scenes/{ids['scene_with_order']}", "orders"),
        (f"/subscenes/{ids['subscene']}", "tasks"),
        (f"/sops/{ids['sop']}", "tasks"),
        (f"/skills/{ids['skill']}", "sops"),
    ):
        response = api.delete(path, admin)
        assert response.status_code == 409, (path, response.text)
        assert response.json()["code"] == "still_referenced"
        assert response.json()["detail"]["referenced_by"] == label
        assert label in response.json()["message"]
        assert api.get(path, admin).status_code == 200, "nothing was deleted"

    # A soft-deleted station no longer holds its collector.
    def retire_station(session: Session) -> None:
        station = session.get(Workstation, ids["station"])
        assert station is not None
        station.deleted_at = clock.now()
        session.add(station)

    seed(mariadb_engine, retire_station)
    assert api.delete(f"/data_collectors/{ids['collector']}", admin).status_code == 204

    # Another live version of the slug keeps the SOP satisfiable, so this version may go.
    again = api.post("/skills", admin, json={"slug": "used-by-sop", "version": "2.0.0"})
    assert again.status_code == 201
    assert api.delete(f"/skills/{ids['skill']}", admin).status_code == 204
    last = api.delete(f"/skills/{again.json()['id']}", admin)
    assert last.status_code == 409
    assert last.json()["detail"]["referenced_by"] == "sops"


def test_bad_input_is_422(api: Api, world: World) -> None:
    admin = world.admin
    collector = {"factory_id": world.factory_a, "name": "C", "operator_id": "op-c"}
    inspector = {"factory_id": world.factory_a, "name": "I", "inspector_id": "qa-c"}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/data_collectors", {**collector, "status": "asleep"}),
        ("POST", "/data_collectors", {**collector, "name": "n" * 129}),
        ("POST", "/data_collectors", {**collector, "operator_id": "has space"}),
        ("POST", "/data_collectors", {**collector, "email": "not-an-email"}),
        ("POST", "/data_collectors", {**collector, "password": "go-style"}),
        ("POST", "/inspectors", {**inspector, "certification_level": "guru"}),
        ("POST", "/inspectors", {**inspector, "status": "on_leave"}),
        ("POST", "/scenes", {"name": ""}),
        ("POST", "/scenes", {"name": "big", "initial_scene_layout_template": "x" * 16_001}),
        ("POST", "/skills", {"slug": "Not A Slug"}),
        ("POST", "/skills", {"slug": "ok", "version": "v" * 21}),
        ("POST", "/sops", {"slug": "s", "skill_sequence": ["BAD SLUG"]}),
        ("POST", "/users", {"account": "u1", "password": "short", "role": "admin"}),
        ("POST", "/users", {"account": "u2", "password": "long-enough", "role": "wizard"}),
        ("POST", "/users", {"account": "u3", "password": "long-enough", "role": "data_collector"}),
    ]
    for method, path, body in cases:
        response = api.call(method, path, admin, json=body)
        assert response.status_code == 422, (method, path, body, response.text)

    created = api.post("/data_collectors", admin, json=collector).json()
    for change in ({"status": "gone"}, {"name": None}, {"name": "x" * 129}, {"id": "5"}):
        response = api.put(f"/data_collectors/{created['id']}", admin, json=change)
        assert response.status_code == 422, (change, response.text)
    for query in ("status=asleep", "limit=0", "offset=-1"):
        assert api.get(f"/data_collectors?{query}", admin).status_code == 422, query
    assert api.get("/inspectors?status=on_leave", admin).status_code == 422
    assert api.get("/data_collectors?limit=1000", admin).json()["limit"] == 100

    unknown = api.post("/sops", admin, json={"slug": "s", "skill_sequence": ["nope", "nada"]})
    assert unknown.status_code == 422
    assert unknown.json()["code"] == "unknown_skills"
    assert unknown.json()["detail"]["unknown"] == ["nada", "nope"]
    assert "nada, nope" in unknown.json()["message"]
    sop = api.post("/sops", admin, json={"slug": "s"}).json()
    bad_update = api.put(f"/sops/{sop['id']}", admin, json={"skill_sequence": ["ghost"]})
    assert bad_update.status_code == 422
    assert bad_update.json()["code"] == "unknown_skills"
    # Slug and version identify a skill; they are not editable.
    skill = api.post("/skills", admin, json={"slug": "fixed"}).json()
    assert api.put(f"/skills/{skill['id']}", admin, json={"slug": "moved"}).status_code == 422


# Users.


def test_user_crud_never_returns_a_password(api: Api, world: World, mariadb_engine: Engine) -> None:
    admin = world.admin
    created = api.post(
        "/users",
        admin,
        json={
            "account": "  Grace ",
            "password": "grace-password",
            "role": "production_manager",
            "factory_ids": [world.factory_a, world.factory_b],
            "display_name": "Grace H.",
        },
    )
    assert created.status_code == 201, created.text
    user = created.json()
    assert user["account"] == "grace"
    assert user["factory_ids"] == sorted([str(world.factory_a), str(world.factory_b)], key=int)
    user_id = user["id"]

    responses = [
        created,
        api.get(f"/users/{user_id}", admin),
        api.get("/users", admin),
        api.put(f"/users/{user_id}", admin, json={"display_name": "G", "password": "new-pass-1"}),
    ]
    for response in responses:
        assert response.status_code in {200, 201}, response.text
        assert "password" not in response.text
        assert "hash" not in response.text
        assert "argon2" not in response.text

    listed = api.get(f"/users?role=production_manager&factory_id={world.factory_b}", admin)
    assert [u["account"] for u in listed.json()["items"]] == ["grace"]
    assert api.get("/users?account=GRACE", admin).json()["total"] == 1
    assert api.get("/users?is_active=false", admin).json()["total"] == 0

    token = api.login("grace", "new-pass-1")
    me = api.client.get(f"{V1}/auth/me", headers=token).json()
    assert me["display_name"] == "G"
    assert api.get("/users", token).status_code == 403, "users are admin-only"

    narrowed = api.put(f"/users/{user_id}", admin, json={"factory_ids": [world.factory_a]})
    assert narrowed.json()["factory_ids"] == [str(world.factory_a)]
    assert api.put(f"/users/{user_id}", admin, json={"factory_ids": []}).status_code == 422
    assert api.put(f"/users/{user_id}", admin, json={"password": "short"}).status_code == 422
    assert api.put(f"/users/{user_id}", admin, json={"account": "new"}).status_code == 422
    missing = api.put(f"/users/{user_id}", admin, json={"factory_ids": [999_999]})
    assert missing.status_code == 404

    # Audit rows of account changes never hold the password or its hash.
    with Session(mariadb_engine) as session:
        rows = session.exec(
            select(AuditLog).where(AuditLog.entity_type == "user", AuditLog.entity_id == user_id)
        ).all()
    assert {r.action for r in rows} == {"user.create", "user.update"}
    for row in rows:
        assert "argon2" not in str(row.before) + str(row.after)

    assert api.delete(f"/users/{user_id}", admin).status_code == 204
    assert api.get(f"/users/{user_id}", admin).status_code == 404
    assert api.get("/users?include_deleted=true&account=grace", admin).json()["total"] == 1
    signed_out = api.client.get(f"{V1}/auth/me", headers=token)
    assert signed_out.status_code == 401, "a deleted account's token stops working"
    relogin = api.client.post(
        f"{V1}/auth/login", json={"account": "grace", "password": "new-pass-1"}
    )
    assert relogin.status_code == 401


def test_user_person_links_are_checked(api: Api, world: World, mariadb_engine: Engine) -> None:
    def build(session: Session) -> tuple[int, int, int]:
        mine = make_data_collector(session, factory_id=world.factory_a)
        theirs = make_data_collector(session, factory_id=world.factory_b)
        inspector = make_inspector(session, factory_id=world.factory_a)
        return int(mine.id or 0), int(theirs.id or 0), int(inspector.id or 0)

    mine, theirs, inspector = seed(mariadb_engine, build)
    admin = world.admin
    base = {
        "password": "collector-pass",
        "role": "data_collector",
        "factory_ids": [world.factory_a],
    }

    def create(account: str, **extra: Any) -> httpx.Response:
        return api.post("/users", admin, json={**base, "account": account, **extra})

    wrong_role = create("c0", role="production_manager", data_collector_id=mine)
    assert wrong_role.status_code == 422
    assert wrong_role.json()["code"] == "link_role_mismatch"
    outside = create("c1", data_collector_id=theirs)
    assert outside.status_code == 422
    assert outside.json()["code"] == "link_outside_factories"
    assert create("c2", data_collector_id=999_999).status_code == 404
    linked = create("c3", data_collector_id=mine)
    assert linked.status_code == 201, linked.text
    assert linked.json()["data_collector_id"] == str(mine)
    taken = create("c4", data_collector_id=mine)
    assert taken.status_code == 409
    assert taken.json()["detail"]["field"] == "data_collector_id"
    qa = api.post(
        "/users",
        admin,
        json={**base, "account": "q1", "role": "data_inspector", "inspector_id": inspector},
    )
    assert qa.status_code == 201
    assert qa.json()["inspector_id"] == str(inspector)

    # A linked person cannot be deleted while an account uses it.
    held = api.delete(f"/inspectors/{inspector}", admin)
    assert held.status_code == 409
    assert held.json()["detail"]["referenced_by"] == "user accounts"
    # Changing the role needs the link cleared in the same request.
    uid = linked.json()["id"]
    assert api.put(f"/users/{uid}", admin, json={"role": "data_inspector"}).status_code == 422
    moved = api.put(
        f"/users/{uid}", admin, json={"role": "data_inspector", "data_collector_id": None}
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["data_collector_id"] is None


def test_role_change_or_deactivation_ends_existing_sessions(api: Api, world: World) -> None:
    old_token = world.manager
    assert api.get("/data_collectors", old_token).status_code == 200
    demoted = api.put(f"/users/{world.manager_id}", world.admin, json={"role": "data_inspector"})
    assert demoted.status_code == 200, demoted.text
    refused = api.get("/inspectors", old_token)
    assert refused.status_code == 401
    assert refused.json()["code"] == "invalid_token"

    new_token = api.login("pm-a", PM_PASSWORD)
    assert api.get("/inspectors", new_token).status_code == 200
    assert api.get("/data_collectors", new_token).status_code == 403

    off = api.put(f"/users/{world.manager_id}", world.admin, json={"is_active": False})
    assert off.json()["is_active"] is False
    assert api.get("/inspectors", new_token).status_code == 401


def test_an_admin_cannot_delete_demote_or_deactivate_itself(api: Api, world: World) -> None:
    me = api.client.get(f"{V1}/auth/me", headers=world.admin).json()
    for method, body in (
        ("DELETE", None),
        ("PUT", {"role": "production_manager", "factory_ids": [world.factory_a]}),
        ("PUT", {"is_active": False}),
    ):
        response = api.call(method, f"/users/{me['id']}", world.admin, json=body)
        assert response.status_code == 409, (method, body, response.text)
    assert api.get(f"/users/{me['id']}", world.admin).json()["role"] == "admin"
    renamed = api.put(f"/users/{me['id']}", world.admin, json={"display_name": "Root"})
    assert renamed.status_code == 200


def test_a_scoped_admin_manages_only_accounts_of_its_factories(
    api: Api, world: World, mariadb_engine: Engine
) -> None:
    def build(session: Session) -> None:
        create_user(
            session,
            account="admin-a",
            password="admin-a-password",
            role=Role.ADMIN,
            factory_ids=[world.factory_a],
            actor=Actor.system("test"),
        )

    seed(mariadb_engine, build)
    scoped = api.login("admin-a", "admin-a-password")
    accounts = {u["account"] for u in api.get("/users", scoped).json()["items"]}
    assert accounts == {"admin-a", "pm-a"}, "the global admin is not visible to it"
    in_b = {"account": "b1", "password": "b1-password", "role": "production_manager"}
    refused = api.post("/users", scoped, json={**in_b, "factory_ids": [world.factory_b]})
    assert refused.status_code == 404
    everything = api.post("/users", scoped, json={**in_b, "role": "admin"})
    assert everything.status_code == 403
    ok = api.post("/users", scoped, json={**in_b, "factory_ids": [world.factory_a]})
    assert ok.status_code == 201, ok.text


# Audit.


def test_audit_lists_newest_first_with_filters(api: Api, world: World) -> None:
    admin = world.admin
    before = clock.now()
    created = api.post(
        "/data_collectors",
        {**world.manager, "X-Request-ID": "req-create-1"},
        json={"factory_id": world.factory_a, "name": "A", "operator_id": "op-a"},
    )
    assert created.status_code == 201
    collector_id = created.json()["id"]
    api.put(f"/data_collectors/{collector_id}", admin, json={"name": "B"})
    api.post("/skills", admin, json={"slug": "audited"})

    page = api.get("/audit", admin).json()
    assert page["total"] >= 3
    assert page["limit"] == 50
    times = [row["occurred_at"] for row in page["items"]]
    assert times == sorted(times, reverse=True)
    assert page["items"][0]["action"] == "skill.create"

    rows = api.get(f"/audit?entity_type=data_collector&entity_id={collector_id}", admin).json()
    assert [r["action"] for r in rows["items"]] == [
        "data_collector.update",
        "data_collector.create",
    ]
    update, create = rows["items"]
    assert update["before"] == {"name": "A"}
    assert update["after"] == {"name": "B"}
    assert create["actor_account"] == "pm-a"
    assert create["actor_role"] == "production_manager"
    assert create["route"] == "POST /api/v1/data_collectors"
    assert create["factory_id"] == str(world.factory_a)
    assert create["request_id"] == "req-create-1"
    assert isinstance(create["id"], str)

    def ids(query: str) -> list[str]:
        response = api.get(f"/audit?{query}", admin)
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["items"]]

    assert ids("request_id=req-create-1") == [create["id"]]
    assert ids("actor_account=pm-a") == [create["id"]]
    assert ids("action=data_collector.update") == [update["id"]]
    assert set(ids(f"factory_id={world.factory_a}")) == {create["id"], update["id"]}
    since = (before - dt.timedelta(seconds=1)).isoformat()
    assert len(ids(f"since={since.replace('+', '%2B')}")) >= 3
    future = (clock.now() + dt.timedelta(hours=1)).isoformat().replace("+", "%2B")
    assert ids(f"since={future}") == []
    assert len(ids(f"until={future}")) >= 3
    assert ids("limit=1&offset=1") == [page["items"][1]["id"]]

    assert api.get("/audit?since=2026-01-01T00:00:00", admin).status_code == 422, "naive"
    assert api.get("/audit?limit=0", admin).status_code == 422
    assert api.get("/audit?offset=18446744073709551616", admin).status_code == 422
    # Valid ISO, but before year 1 once converted to UTC.
    assert api.get("/audit?since=0001-01-01T00:00:00%2B14:00", admin).status_code == 422
    assert api.get("/audit?limit=500", admin).json()["limit"] == 100
    assert api.get("/audit", world.manager).status_code == 403


def test_failed_writes_leave_no_audit_row(api: Api, world: World, mariadb_engine: Engine) -> None:
    body = {"factory_id": world.factory_a, "name": "A", "operator_id": "op-x"}
    assert api.post("/data_collectors", world.admin, json=body).status_code == 201
    assert api.post("/data_collectors", world.admin, json=body).status_code == 409
    with Session(mariadb_engine) as session:
        actions = session.exec(
            select(AuditLog.action).where(col(AuditLog.entity_type) == "data_collector")
        ).all()
    assert actions == ["data_collector.create"]
