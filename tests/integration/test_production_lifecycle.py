"""Production lifecycle on MariaDB: quota, batch reuse, cascades, progress counters, episodes."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlmodel import Session, col

from keystone_api.app import create_app
from keystone_core.db import create_db_engine, session_scope
from keystone_core.errors import ConflictError
from keystone_core.models import (
    AuditLog,
    Batch,
    BatchStatus,
    EpisodeStatus,
    Order,
    OrderStatus,
    Role,
    Task,
    TaskStatus,
    User,
    UserFactory,
)
from keystone_core.security import issue_access_token
from keystone_core.services import production as svc
from keystone_core.services.audit import Actor
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings, load_settings
from keystone_core.states import transition_batch, transition_task
from tests.conftest import make_settings
from tests.factories import (
    make_batch,
    make_data_collector,
    make_episode,
    make_factory,
    make_order,
    make_scene,
    make_sop,
    make_subscene,
    make_task,
    make_workstation,
)

pytestmark = pytest.mark.integration

V1 = "/api/v1"
BATCH_ID = re.compile(r"^batch_\d{8}_\d{6}_\d{3}_\d{2}_[0-9a-f]{8}$")
TASK_ID = re.compile(r"^task_\d{8}_\d{6}_\d{3}_\d{2}_[0-9a-f]{8}$")
THREADS = 8
_names = itertools.count(1)

Headers = dict[str, str]


@dataclass
class World:
    """Factory A (what the callers work on) and factory B (someone else's rows)."""

    factory_a: int
    scene_a: int
    subscenes_a: list[int]
    other_scene_subscene_a: int
    sops: list[int]
    stations_a: list[int]  # stations_a[0] is where collector_a works
    collector_a: int
    factory_b: int
    station_b: int
    subscene_b: int
    order_b: int
    batch_b: int
    task_b: int
    episode_b: int


@dataclass
class Callers:
    admin: Headers
    manager: Headers  # production manager of factory A
    collector: Headers  # data collector at stations_a[0]
    unlinked_collector: Headers  # collector account with no operator row
    inspector: Headers


@pytest.fixture
def app_settings(tmp_path: Path, mariadb_migrated: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        s3_endpoint_url="http://127.0.0.1:1",
        s3_access_key="k",
        s3_secret_key="s",
    )


@pytest.fixture
def client(app_settings: Settings, mariadb_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as c:
        yield c


@pytest.fixture
def world(mariadb_engine: Engine) -> World:
    with Session(mariadb_engine) as s:
        factory_a = make_factory(s)
        assert factory_a.id is not None
        scene_a = make_scene(s, factory_id=factory_a.id)
        subscenes = [make_subscene(s, scene_id=scene_a.id) for _ in range(2)]
        other_scene = make_scene(s, factory_id=factory_a.id)
        other_sub = make_subscene(s, scene_id=other_scene.id)
        sops = [make_sop(s) for _ in range(2)]
        collector = make_data_collector(s, factory_id=factory_a.id)
        stations = [
            make_workstation(s, factory_id=factory_a.id, data_collector_id=collector.id),
            *(make_workstation(s, factory_id=factory_a.id) for _ in range(THREADS)),
        ]
        factory_b = make_factory(s)
        scene_b = make_scene(s, factory_id=factory_b.id)
        sub_b = make_subscene(s, scene_id=scene_b.id)
        station_b = make_workstation(s, factory_id=factory_b.id)
        order_b = make_order(s, factory_id=factory_b.id, scene_id=scene_b.id)
        batch_b = make_batch(s, order_id=order_b.id, workstation_id=station_b.id)
        task_b = make_task(s, batch_id=batch_b.id, workstation_id=station_b.id)
        episode_b = make_episode(s, task_id=task_b.id)
        s.commit()
        return World(
            factory_a=factory_a.id,
            scene_a=_id(scene_a),
            subscenes_a=[_id(x) for x in subscenes],
            other_scene_subscene_a=_id(other_sub),
            sops=[_id(x) for x in sops],
            stations_a=[_id(x) for x in stations],
            collector_a=_id(collector),
            factory_b=_id(factory_b),
            station_b=_id(station_b),
            subscene_b=_id(sub_b),
            order_b=_id(order_b),
            batch_b=_id(batch_b),
            task_b=_id(task_b),
            episode_b=_id(episode_b),
        )


def _id(row: Any) -> int:
    assert row.id is not None
    return int(row.id)


def _user(
    session: Session,
    settings: Settings,
    role: Role,
    factory_ids: list[int],
    **links: Any,
) -> Headers:
    user = User(
        account=f"user-{next(_names)}",
        password_hash="unused: tokens are issued",
        role=role,
        **links,
    )
    session.add(user)
    session.flush()
    for factory_id in factory_ids:
        session.add(UserFactory(user_id=_id(user), factory_id=factory_id))
    token, _ = issue_access_token(
        settings, subject=str(user.id), role=role, factory_ids=factory_ids
    )
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def callers(
    client: TestClient, app_settings: Settings, mariadb_engine: Engine, world: World
) -> Callers:
    login = client.post(
        f"{V1}/auth/login", json={"account": "admin", "password": "test-admin-password"}
    )
    assert login.status_code == 200, login.text
    admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
    a = [world.factory_a]
    with Session(mariadb_engine) as s:
        callers = Callers(
            admin=admin,
            manager=_user(s, app_settings, Role.PRODUCTION_MANAGER, a),
            collector=_user(
                s, app_settings, Role.DATA_COLLECTOR, a, data_collector_id=world.collector_a
            ),
            unlinked_collector=_user(s, app_settings, Role.DATA_COLLECTOR, a),
            inspector=_user(s, app_settings, Role.DATA_INSPECTOR, a),
        )
        s.commit()
    return callers


@pytest.fixture
def pool_engine(mariadb_engine: Engine) -> Iterator[Engine]:
    """An engine with a connection per racing thread."""
    url = mariadb_engine.url.render_as_string(hide_password=False)
    engine = create_db_engine(
        load_settings(env="test", database_url=url, database_pool_size=THREADS * 2)
    )
    yield engine
    engine.dispose()


# --- helpers ----------------------------------------------------------------------------


def create_order(client: TestClient, h: Headers, world: World, **fields: Any) -> dict[str, Any]:
    body = {
        "factory_id": world.factory_a,
        "name": f"order {next(_names)}",
        "scene_id": world.scene_a,
        "target_count": 10,
        **fields,
    }
    response = client.post(f"{V1}/orders", json=body, headers=h)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def groups(world: World, *quantities: int) -> list[dict[str, int]]:
    return [
        {"sop_id": world.sops[i % 2], "subscene_id": world.subscenes_a[i // 2], "quantity": q}
        for i, q in enumerate(quantities)
    ]


def plan(
    client: TestClient,
    h: Headers,
    order_id: Any,
    station: int,
    task_groups: list[dict[str, int]],
) -> Any:
    return client.post(
        f"{V1}/batches",
        json={"order_id": int(order_id), "workstation_id": station, "task_groups": task_groups},
        headers=h,
    )


def advance(engine: Engine, task_id: int, *states: TaskStatus) -> None:
    with session_scope(engine) as s:
        for state in states:
            transition_task(s, task_id, state)


def statuses(engine: Engine, batch_id: int) -> dict[int, TaskStatus]:
    with Session(engine) as s:
        rows = s.execute(select(col(Task.id), col(Task.status)).where(Task.batch_id == batch_id))
        return {int(i): TaskStatus(st) for i, st in rows}


def get(client: TestClient, h: Headers, path: str, **params: Any) -> Any:
    response = client.get(f"{V1}{path}", headers=h, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def ids(page: dict[str, Any]) -> set[int]:
    return {int(item["id"]) for item in page["items"]}


def race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` in ``n`` threads released together; results or raised exceptions."""
    barrier = threading.Barrier(n, timeout=30)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


# --- orders -----------------------------------------------------------------------------


def test_order_crud_filters_and_bad_input(
    client: TestClient, callers: Callers, world: World
) -> None:
    h = callers.manager
    order = create_order(client, h, world, priority="high", metadata={"customer": "x"})
    assert order["status"] == "created"
    assert order["metadata"] == {"customer": "x"}
    assert order["task_count"] == order["episode_count"] == order["approved_count"] == 0
    assert isinstance(order["id"], str)
    other = create_order(client, h, world, scene_id=None)

    assert ids(get(client, h, "/orders", priority="high")) == {int(order["id"])}
    assert ids(get(client, h, "/orders", scene_id=world.scene_a)) == {int(order["id"])}
    assert ids(get(client, h, "/orders", factory_id=world.factory_a, status="created")) == {
        int(order["id"]),
        int(other["id"]),
    }
    # The manager's own factory only: B's order is not listed even when asked for.
    assert get(client, h, "/orders", factory_id=world.factory_b)["total"] == 0

    updated = client.put(
        f"{V1}/orders/{order['id']}", json={"name": "renamed", "deadline": None}, headers=h
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["name"] == "renamed"

    url = f"{V1}/orders/{order['id']}"
    for bad in (
        {"priority": "asap"},
        {"status": "done"},
        {"name": None},
        {"target_count": 0},
        {"episode_count": 5},
        {"deadline": "2026-01-01T00:00:00"},  # naive datetime
    ):
        response = client.put(url, json=bad, headers=h)
        assert response.status_code == 422, (bad, response.text)
    assert client.get(f"{V1}/orders", params={"status": "nope"}, headers=h).status_code == 422
    dup = client.post(
        f"{V1}/orders",
        json={"factory_id": world.factory_a, "name": "renamed", "target_count": 1},
        headers=h,
    )
    assert dup.status_code == 409
    assert dup.json()["code"] == "duplicate"


def test_order_status_goes_through_the_state_machine(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    order = create_order(client, h, world)
    url = f"{V1}/orders/{order['id']}"

    refused = client.put(url, json={"status": "paused"}, headers=h)
    assert refused.status_code == 409
    body = refused.json()
    assert body["code"] == "invalid_transition"
    assert body["detail"]["current_status"] == "created"
    assert body["detail"]["target"] == "paused"

    for target in ("in_progress", "paused", "in_progress"):
        response = client.put(url, json={"status": target}, headers=h)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == target
    # The same status again is not a transition: a full-object PUT stays harmless.
    same = client.put(url, json={"status": "in_progress", "name": "same"}, headers=h)
    assert same.status_code == 200, same.text
    assert client.put(url, json={"status": "completed"}, headers=h).status_code == 200
    final = client.put(url, json={"status": "in_progress"}, headers=h)
    assert final.status_code == 409
    assert final.json()["detail"]["current_status"] == "completed"

    with Session(mariadb_engine) as s:
        actions = s.execute(
            select(col(AuditLog.action)).where(
                AuditLog.entity_type == "order", AuditLog.entity_id == order["id"]
            )
        ).scalars()
        assert list(actions).count("order.status") == 4


def test_cancelling_an_order_cancels_its_open_batches_and_tasks(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    order = create_order(client, h, world)
    batch = plan(client, h, order["id"], world.stations_a[1], groups(world, 2)).json()["batch"]
    response = client.put(f"{V1}/orders/{order['id']}", json={"status": "cancelled"}, headers=h)
    assert response.status_code == 200, response.text
    assert response.json()["cancelled_count"] == 2
    assert get(client, h, f"/batches/{batch['id']}")["status"] == "cancelled"
    assert set(statuses(mariadb_engine, int(batch["id"])).values()) == {TaskStatus.CANCELLED}
    closed = plan(client, h, order["id"], world.stations_a[1], groups(world, 1))
    assert closed.status_code == 409
    assert closed.json()["code"] == "order_closed"


def test_lowering_the_target_below_planned_tasks_is_409(
    client: TestClient, callers: Callers, world: World
) -> None:
    h = callers.manager
    order = create_order(client, h, world, target_count=5)
    assert plan(client, h, order["id"], world.stations_a[1], groups(world, 4)).status_code == 201
    response = client.put(f"{V1}/orders/{order['id']}", json={"target_count": 3}, headers=h)
    assert response.status_code == 409
    assert response.json()["code"] == "quota_exceeded"
    assert response.json()["detail"]["task_count"] == 4
    assert (
        client.put(f"{V1}/orders/{order['id']}", json={"target_count": 4}, headers=h).json()[
            "target_count"
        ]
        == 4
    )


# --- batches ----------------------------------------------------------------------------


def test_first_batch_starts_the_order_and_an_open_batch_is_reused(
    client: TestClient, callers: Callers, world: World
) -> None:
    h = callers.manager
    order = create_order(client, h, world, target_count=20)
    station = world.stations_a[1]

    first = plan(client, h, order["id"], station, groups(world, 2, 1))
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["reused"] is False
    batch = body["batch"]
    assert BATCH_ID.match(batch["batch_id"])
    assert batch["status"] == "pending"
    assert batch["order_id"] == order["id"]
    assert batch["workstation_id"] == str(station)
    assert batch["task_count"] == batch["target_count"] == 3
    assert len(body["tasks"]) == 3
    assert all(TASK_ID.match(t["task_id"]) and t["status"] == "pending" for t in body["tasks"])
    assert get(client, h, f"/orders/{order['id']}")["status"] == "in_progress"

    again = plan(client, h, order["id"], station, groups(world, 1, 4))
    assert again.status_code == 200, again.text
    assert again.json()["reused"] is True
    reused = again.json()["batch"]
    assert reused["id"] == batch["id"]
    assert reused["task_count"] == 8
    by_group = {(g["sop_id"], g["subscene_id"]): g["quantity"] for g in reused["task_groups"]}
    assert by_group == {
        (str(world.sops[0]), str(world.subscenes_a[0])): 3,
        (str(world.sops[1]), str(world.subscenes_a[0])): 5,
    }

    elsewhere = plan(client, h, order["id"], world.stations_a[2], groups(world, 1))
    assert elsewhere.status_code == 201
    assert elsewhere.json()["batch"]["id"] != batch["id"]

    cancelled = client.patch(f"{V1}/batches/{batch['id']}", json={"status": "cancelled"}, headers=h)
    assert cancelled.status_code == 200, cancelled.text
    fresh = plan(client, h, order["id"], station, groups(world, 1))
    assert fresh.status_code == 201
    assert fresh.json()["batch"]["id"] != batch["id"]

    listed = get(client, h, "/batches", order_id=order["id"], workstation_id=station)
    assert ids(listed) == {int(batch["id"]), int(fresh.json()["batch"]["id"])}
    assert ids(get(client, h, "/batches", order_id=order["id"], status="cancelled")) == {
        int(batch["id"])
    }


def test_quota_exceeded_is_409_with_the_numbers_and_writes_nothing(
    client: TestClient, callers: Callers, world: World
) -> None:
    h = callers.manager
    order = create_order(client, h, world, target_count=5)
    created = plan(client, h, order["id"], world.stations_a[1], groups(world, 3)).json()
    batch_id = created["batch"]["id"]

    over = plan(client, h, order["id"], world.stations_a[2], groups(world, 2, 1))
    assert over.status_code == 409
    body = over.json()
    assert body["code"] == "quota_exceeded"
    assert body["detail"] == {"target_count": 5, "task_count": 3, "requested": 3, "available": 2}
    assert "5" in body["message"]
    assert "3" in body["message"]
    add = client.post(
        f"{V1}/batches/{batch_id}/tasks", json={"task_groups": groups(world, 3)}, headers=h
    )
    assert add.status_code == 409
    assert add.json()["code"] == "quota_exceeded"
    assert get(client, h, "/tasks", order_id=order["id"])["total"] == 3
    assert get(client, h, "/batches", order_id=order["id"])["total"] == 1

    # A deleted (cancelled) task gives its place back.
    task_id = created["tasks"][0]["id"]
    assert client.delete(f"{V1}/tasks/{task_id}", headers=h).status_code == 204
    add = client.post(
        f"{V1}/batches/{batch_id}/tasks", json={"task_groups": groups(world, 3)}, headers=h
    )
    assert add.status_code == 201, add.text
    assert len(add.json()["created_tasks"]) == 3
    assert add.json()["batch"]["task_count"] == 5  # 2 live + 3 new (the deleted one is hidden)


def test_batch_references_are_checked(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    order = create_order(client, h, world)
    station = world.stations_a[1]

    def attempt(headers: Headers, **overrides: Any) -> Any:
        body: dict[str, Any] = {
            "order_id": int(order["id"]),
            "workstation_id": station,
            "task_groups": groups(world, 1),
            **overrides,
        }
        return client.post(f"{V1}/batches", json=body, headers=headers)

    # Another factory's station: invisible to A's manager, a mismatch for the admin.
    assert attempt(h, workstation_id=world.station_b).status_code == 404
    mismatch = attempt(callers.admin, workstation_id=world.station_b)
    assert mismatch.status_code == 422
    assert mismatch.json()["code"] == "factory_mismatch"
    wrong_scene = attempt(
        h,
        task_groups=[
            {"sop_id": world.sops[0], "subscene_id": world.other_scene_subscene_a, "quantity": 1}
        ],
    )
    assert wrong_scene.status_code == 422
    assert wrong_scene.json()["code"] == "scene_mismatch"
    other_factory_sub = attempt(
        callers.admin,
        task_groups=[{"sop_id": world.sops[0], "subscene_id": world.subscene_b, "quantity": 1}],
    )
    assert other_factory_sub.status_code == 422
    twice = attempt(h, task_groups=groups(world, 1) * 2)
    assert twice.status_code == 422
    assert twice.json()["code"] == "duplicate_task_group"
    missing_sop = attempt(
        h, task_groups=[{"sop_id": 999_999, "subscene_id": world.subscenes_a[0], "quantity": 1}]
    )
    assert missing_sop.status_code == 404
    assert attempt(h, task_groups=groups(world, 0)).status_code == 422
    assert attempt(h, task_groups=[]).status_code == 422
    assert attempt(h, order_id=world.order_b).status_code == 404
    assert attempt(h, extra="x").status_code == 422
    with Session(mariadb_engine) as s:
        assert (
            s.execute(
                select(func.count()).select_from(Batch).where(Batch.order_id == int(order["id"]))
            ).scalar_one()
            == 0
        )
    # Nothing was written, so the order never started.
    assert get(client, h, f"/orders/{order['id']}")["status"] == "created"


def test_concurrent_batch_creation_cannot_exceed_the_quota(
    pool_engine: Engine, world: World, mariadb_engine: Engine
) -> None:
    with session_scope(mariadb_engine) as s:
        order = make_order(s, factory_id=world.factory_a, scene_id=world.scene_a, target_count=10)
        order_id = _id(order)
    group = [svc.TaskGroup(sop_id=world.sops[0], subscene_id=world.subscenes_a[0], quantity=3)]

    def create(i: int) -> int:
        with session_scope(pool_engine) as s:
            result = svc.create_batch(
                s,
                Scope.everything(),
                Actor.system(),
                order_id=order_id,
                workstation_id=world.stations_a[1 + i],
                task_groups=group,
            )
            return len(result.tasks)

    results = race(THREADS, create)
    won = [r for r in results if isinstance(r, int)]
    refused = [r for r in results if isinstance(r, ConflictError)]
    assert len(won) == 3, results  # 3 batches of 3 = 9 ≤ 10; a fourth would make 12
    assert len(refused) == THREADS - 3, results
    assert {e.code for e in refused} == {"quota_exceeded"}
    with Session(mariadb_engine) as s:
        assert svc.live_task_count(s, order_id) == 9
        assert s.get(Order, order_id).status is OrderStatus.IN_PROGRESS  # type: ignore[union-attr]


def test_concurrent_plans_for_one_station_share_one_batch(
    pool_engine: Engine, world: World, mariadb_engine: Engine
) -> None:
    with session_scope(mariadb_engine) as s:
        order_id = _id(make_order(s, factory_id=world.factory_a, target_count=100))
    group = [svc.TaskGroup(sop_id=world.sops[0], subscene_id=world.subscenes_a[0], quantity=2)]

    def create(_i: int) -> bool:
        with session_scope(pool_engine) as s:
            return svc.create_batch(
                s,
                Scope.everything(),
                Actor.system(),
                order_id=order_id,
                workstation_id=world.stations_a[1],
                task_groups=group,
            ).reused

    results = race(THREADS, create)
    assert sorted(results) == [False] + [True] * (THREADS - 1), results
    with Session(mariadb_engine) as s:
        batches = s.execute(select(Batch).where(Batch.order_id == order_id)).scalars().all()
        assert len(batches) == 1
        assert batches[0].target_count == 2 * THREADS
        assert svc.live_task_count(s, order_id) == 2 * THREADS


# --- cascades ---------------------------------------------------------------------------


def _batch_in_every_task_state(
    client: TestClient, h: Headers, world: World, engine: Engine, *, activate: bool
) -> tuple[dict[str, Any], dict[str, int]]:
    """A batch with a task in each of pending … uploading, completed and failed."""
    order = create_order(client, h, world)
    body = plan(client, h, order["id"], world.stations_a[1], groups(world, 6)).json()
    task_ids = [int(t["id"]) for t in body["tasks"]]
    paths = {
        "pending": (),
        "ready": (TaskStatus.READY,),
        "in_progress": (TaskStatus.READY, TaskStatus.IN_PROGRESS),
        "uploading": (TaskStatus.READY, TaskStatus.UPLOADING),
        "completed": (TaskStatus.READY, TaskStatus.IN_PROGRESS, TaskStatus.COMPLETED),
        "failed": (TaskStatus.FAILED,),
    }
    named = dict(zip(paths, task_ids, strict=True))
    for name, path in paths.items():
        advance(engine, named[name], *path)
    if activate:
        with session_scope(engine) as s:
            transition_batch(s, int(body["batch"]["id"]), BatchStatus.ACTIVE)
    return body["batch"], named


def test_cancel_cascades_to_unfinished_tasks_only(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    batch, named = _batch_in_every_task_state(client, h, world, mariadb_engine, activate=True)
    url = f"{V1}/batches/{batch['id']}"

    assert client.patch(url, json={"status": "recalled"}, headers=h).status_code == 422
    assert client.patch(url, json={"status": "bogus"}, headers=h).status_code == 422
    response = client.patch(url, json={"status": "cancelled", "notes": "stop"}, headers=h)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["notes"] == "stop"
    assert body["ended_at"] is not None
    assert body["cancelled_count"] == 4

    after = statuses(mariadb_engine, int(batch["id"]))
    for name in ("pending", "ready", "in_progress", "uploading"):
        assert after[named[name]] is TaskStatus.CANCELLED, name
    assert after[named["completed"]] is TaskStatus.COMPLETED
    assert after[named["failed"]] is TaskStatus.FAILED

    again = client.patch(url, json={"status": "cancelled"}, headers=h)
    assert again.status_code == 409
    assert again.json()["detail"]["current_status"] == "cancelled"
    with Session(mariadb_engine) as s:
        audit = s.execute(select(AuditLog).where(AuditLog.action == "batch.cancel")).scalar_one()
        assert sorted(audit.after["cancelled_task_ids"]) == sorted(  # type: ignore[index]
            named[n] for n in ("pending", "ready", "in_progress", "uploading")
        )


def test_recall_cancels_unfinished_tasks_and_labels_episodes(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    batch, named = _batch_in_every_task_state(client, h, world, mariadb_engine, activate=False)
    url = f"{V1}/batches/{batch['id']}/recall"
    pending = client.post(url, json={"reason": "bad gripper"}, headers=h)
    assert pending.status_code == 409
    assert pending.json()["detail"]["current_status"] == "pending"

    with session_scope(mariadb_engine) as s:
        transition_batch(s, int(batch["id"]), BatchStatus.ACTIVE)
        episode = make_episode(s, task_id=named["completed"], labels=["night-shift"])
        episode_id = _id(episode)

    response = client.post(url, json={"reason": "bad gripper"}, headers=h)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["batch"]["status"] == "recalled"
    assert body["batch"]["recall_reason"] == "bad gripper"
    assert body["batch"]["recalled_at"] is not None
    assert body["cancelled_task_count"] == 4
    assert body["labelled_episode_count"] == 1
    after = statuses(mariadb_engine, int(batch["id"]))
    assert after[named["completed"]] is TaskStatus.COMPLETED
    assert after[named["failed"]] is TaskStatus.FAILED
    assert after[named["ready"]] is TaskStatus.CANCELLED
    episode_body = get(client, h, f"/episodes/{episode_id}")
    assert episode_body["labels"] == ["night-shift", "recalled_batch"]

    assert client.post(url, json={}, headers=h).status_code == 409


def test_recalling_a_completed_batch_is_an_audited_requeue(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    order = create_order(client, h, world)
    batch = plan(client, h, order["id"], world.stations_a[1], groups(world, 1)).json()["batch"]
    with session_scope(mariadb_engine) as s:
        transition_batch(s, int(batch["id"]), BatchStatus.ACTIVE)
        transition_batch(s, int(batch["id"]), BatchStatus.COMPLETED)
    response = client.post(
        f"{V1}/batches/{batch['id']}/recall", json={"reason": "customer complaint"}, headers=h
    )
    assert response.status_code == 200, response.text
    with Session(mariadb_engine) as s:
        requeue = s.execute(select(AuditLog).where(AuditLog.action == "batch.requeue")).scalar_one()
        assert requeue.before == {"status": "completed"}
        assert requeue.after == {"status": "recalled", "reason": "customer complaint"}
        assert requeue.actor_role == "production_manager"


# --- deletes ----------------------------------------------------------------------------


def test_delete_guards(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    h = callers.manager
    order = create_order(client, h, world)
    body = plan(client, h, order["id"], world.stations_a[1], groups(world, 3)).json()
    batch_id = body["batch"]["id"]
    first, second, third = (int(t["id"]) for t in body["tasks"])

    blocked = client.delete(f"{V1}/orders/{order['id']}", headers=h)
    assert blocked.status_code == 409
    assert blocked.json()["code"] == "still_referenced"
    assert "batches" in blocked.json()["message"]

    advance(mariadb_engine, third, TaskStatus.READY, TaskStatus.IN_PROGRESS, TaskStatus.COMPLETED)
    with session_scope(mariadb_engine) as s:
        make_episode(s, task_id=third)
    with_episode = client.delete(f"{V1}/tasks/{third}", headers=h)
    assert with_episode.status_code == 409
    assert with_episode.json()["code"] == "still_referenced"
    assert client.delete(f"{V1}/batches/{batch_id}", headers=h).status_code == 409

    assert client.delete(f"{V1}/tasks/{first}", headers=h).status_code == 204
    assert client.get(f"{V1}/tasks/{first}", headers=h).status_code == 404
    assert client.delete(f"{V1}/tasks/{first}", headers=h).status_code == 404
    hidden = get(client, h, "/tasks", batch_id=batch_id)
    assert ids(hidden) == {second, third}
    shown = get(client, h, "/tasks", batch_id=batch_id, include_deleted=True)
    deleted = next(t for t in shown["items"] if int(t["id"]) == first)
    assert deleted["status"] == "cancelled"
    assert deleted["deleted_at"] is not None

    # An active batch is in use; a fresh pending one without episodes goes, with its tasks.
    with session_scope(mariadb_engine) as s:
        transition_batch(s, int(batch_id), BatchStatus.ACTIVE)
    in_use = client.delete(f"{V1}/batches/{batch_id}", headers=h)
    assert in_use.status_code == 409
    assert in_use.json()["code"] == "batch_in_use"

    other = create_order(client, h, world)
    spare = plan(client, h, other["id"], world.stations_a[2], groups(world, 2)).json()
    assert client.delete(f"{V1}/batches/{spare['batch']['id']}", headers=h).status_code == 204
    assert client.get(f"{V1}/batches/{spare['batch']['id']}", headers=h).status_code == 404
    assert get(client, h, "/tasks", order_id=other["id"])["total"] == 0
    assert client.delete(f"{V1}/orders/{other['id']}", headers=h).status_code == 204
    assert client.get(f"{V1}/orders/{other['id']}", headers=h).status_code == 404


# --- progress ---------------------------------------------------------------------------


def test_concurrent_verified_uploads_count_exactly(
    pool_engine: Engine, world: World, mariadb_engine: Engine
) -> None:
    per_thread = 5
    with session_scope(mariadb_engine) as s:
        order = make_order(s, factory_id=world.factory_a, target_count=100)
        episodes = [
            _id(make_episode(s, order_id=order.id, factory_id=world.factory_a))
            for _ in range(THREADS)
        ]
        order_id = _id(order)

    def verify(i: int) -> None:
        for _ in range(per_thread):
            with session_scope(pool_engine) as s:
                svc.record_verified_upload(s, episodes[i])

    results = race(THREADS, verify)
    assert results == [None] * THREADS
    with Session(mariadb_engine) as s:
        order_row = s.get(Order, order_id)
        assert order_row is not None
        assert order_row.episode_count == THREADS * per_thread
        batch_total = s.execute(
            select(func.sum(Batch.episode_count)).where(Batch.order_id == order_id)
        ).scalar_one()
        assert batch_total == THREADS * per_thread


def _order_with_episodes(
    engine: Engine, world: World, target: int, episode_statuses: list[EpisodeStatus]
) -> tuple[int, list[int]]:
    with session_scope(engine) as s:
        order = make_order(
            s, factory_id=world.factory_a, target_count=target, status=OrderStatus.IN_PROGRESS
        )
        batch = make_batch(s, order_id=order.id)
        episode_ids = [
            _id(make_episode(s, task_id=make_task(s, batch_id=batch.id).id, status=status))
            for status in episode_statuses
        ]
        return _id(order), episode_ids


def test_approvals_complete_the_order_and_rejections_do_not_count(
    world: World, mariadb_engine: Engine
) -> None:
    order_id, (rejected, first, second, third) = _order_with_episodes(
        mariadb_engine,
        world,
        3,
        [
            EpisodeStatus.REJECTED,
            EpisodeStatus.AUTO_APPROVED,
            EpisodeStatus.INSPECTOR_APPROVED,
            EpisodeStatus.AUTO_APPROVED,
        ],
    )

    def approve(episode_id: int) -> tuple[bool, int, OrderStatus]:
        with session_scope(mariadb_engine) as s:
            counted = svc.record_approval(s, episode_id, sync_target=None)
        with Session(mariadb_engine) as s:
            order = s.get(Order, order_id)
            assert order is not None
            return counted, order.approved_count, order.status

    assert approve(rejected) == (False, 0, OrderStatus.IN_PROGRESS)
    assert approve(first) == (True, 1, OrderStatus.IN_PROGRESS)
    with session_scope(mariadb_engine) as s:
        svc.change_order_status(s, Scope.everything(), Actor.system(), order_id, OrderStatus.PAUSED)
    assert approve(second) == (True, 2, OrderStatus.PAUSED)
    # Approvals still arrive for a paused order; the target completes it.
    assert approve(third) == (True, 3, OrderStatus.COMPLETED)


def test_concurrent_approvals_complete_the_order_once(
    pool_engine: Engine, world: World, mariadb_engine: Engine
) -> None:
    order_id, episode_ids = _order_with_episodes(
        mariadb_engine, world, THREADS - 2, [EpisodeStatus.AUTO_APPROVED] * THREADS
    )

    def approve(i: int) -> bool:
        with session_scope(pool_engine) as s:
            return svc.record_approval(s, episode_ids[i], sync_target=None)

    assert race(THREADS, approve) == [True] * THREADS
    with Session(mariadb_engine) as s:
        order = s.get(Order, order_id)
        assert order is not None
        assert order.approved_count == THREADS
        assert order.status is OrderStatus.COMPLETED


# --- episodes ---------------------------------------------------------------------------


def _episodes_for_filters(engine: Engine, world: World) -> dict[str, int]:
    with session_scope(engine) as s:
        order = make_order(s, factory_id=world.factory_a, target_count=10)
        batch_one = make_batch(s, order_id=order.id, workstation_id=world.stations_a[0])
        batch_two = make_batch(s, order_id=order.id, workstation_id=world.stations_a[1])

        def episode(batch: Batch, day: int, status: EpisodeStatus, device: str) -> int:
            task = make_task(s, batch_id=batch.id, workstation_id=batch.workstation_id)
            return _id(
                make_episode(
                    s,
                    task_id=task.id,
                    status=status,
                    device_id=device,
                    recording_date=dt.date(2026, 3, day),
                )
            )

        return {
            "early": episode(batch_one, 1, EpisodeStatus.AUTO_APPROVED, "dev-1"),
            "middle": episode(batch_one, 10, EpisodeStatus.NEEDS_INSPECTION, "dev-1"),
            "late": episode(batch_two, 20, EpisodeStatus.AUTO_APPROVED, "dev-2"),
            "order": _id(order),
            "batch_one": _id(batch_one),
        }


def test_episode_list_filters(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    e = _episodes_for_filters(mariadb_engine, world)
    h = callers.inspector

    def listed(**params: Any) -> set[int]:
        return ids(get(client, h, "/episodes", **params))

    everything = {e["early"], e["middle"], e["late"]}
    assert listed() == everything  # B's episode is outside the inspector's factory
    assert listed(status="auto_approved") == {e["early"], e["late"]}
    assert listed(factory_id=world.factory_a) == everything
    assert listed(factory_id=world.factory_b) == set()
    assert listed(batch_id=e["batch_one"]) == {e["early"], e["middle"]}
    assert listed(order_id=e["order"]) == everything
    assert listed(device_id="dev-2") == {e["late"]}
    assert listed(date_from="2026-03-05") == {e["middle"], e["late"]}
    assert listed(date_to="2026-03-10") == {e["early"], e["middle"]}
    assert listed(date_from="2026-03-10", date_to="2026-03-10") == {e["middle"]}
    detail = get(client, h, f"/episodes/{e['late']}")
    assert listed(task_id=detail["task_id"]) == {e["late"]}
    assert detail["qa_status"] == detail["status"] == "auto_approved"
    assert detail["auto_approved"] is True
    assert detail["robot_device_id"] == "dev-2"
    assert detail["task_public_id"]

    backwards = client.get(
        f"{V1}/episodes", params={"date_from": "2026-03-10", "date_to": "2026-03-01"}, headers=h
    )
    assert backwards.status_code == 422
    assert backwards.json()["code"] == "invalid_date_range"
    assert client.get(f"{V1}/episodes", params={"status": "approved"}, headers=h).status_code == 422
    assert client.get(f"{V1}/episodes", params={"date_from": "March"}, headers=h).status_code == 422
    assert get(client, h, "/episodes", limit=1000)["limit"] == 100


def test_episode_patch_edits_metadata_only(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    e = _episodes_for_filters(mariadb_engine, world)
    url = f"{V1}/episodes/{e['middle']}"
    change = {"labels": ["blurry", "retake"], "quality_flag": "camera 2 dim", "metadata": {"k": 1}}
    response = client.patch(url, json=change, headers=callers.inspector)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["labels"] == ["blurry", "retake"]
    assert body["quality_flag"] == "camera 2 dim"
    assert body["metadata"] == {"k": 1}
    assert body["status"] == "needs_inspection"

    for bad in (
        {"status": "auto_approved"},
        {"mcap_path": "elsewhere.mcap"},
        {"qa_score": 1.0},
        {"labels": None},
        {"labels": ["x" * 65]},
        {"labels": "not-a-list"},
    ):
        refused = client.patch(url, json=bad, headers=callers.manager)
        assert refused.status_code == 422, (bad, refused.text)
    assert client.patch(url, json={"labels": []}, headers=callers.collector).status_code == 403
    assert (
        client.patch(
            f"{V1}/episodes/{world.episode_b}", json={"labels": []}, headers=callers.manager
        ).status_code
        == 404
    )
    with Session(mariadb_engine) as s:
        audit = s.execute(select(AuditLog).where(AuditLog.action == "episode.update")).scalar_one()
        assert audit.after == {
            "labels": ["blurry", "retake"],
            "quality_flag": "camera 2 dim",
            "metadata": {"k": 1},
        }


# --- who sees what ----------------------------------------------------------------------


def test_a_collector_sees_only_its_own_stations_rows(
    client: TestClient, callers: Callers, world: World, mariadb_engine: Engine
) -> None:
    e = _episodes_for_filters(mariadb_engine, world)
    h = callers.collector
    batches = get(client, h, "/batches")
    assert ids(batches) == {e["batch_one"]}
    with Session(mariadb_engine) as s:
        others = s.execute(
            select(col(Batch.id)).where(Batch.id != e["batch_one"], Batch.order_id == e["order"])
        ).scalar_one()
        own_tasks = set(
            s.execute(select(col(Task.id)).where(Task.batch_id == e["batch_one"])).scalars()
        )
        other_task = s.execute(select(col(Task.id)).where(Task.batch_id == others)).scalar_one()
    assert client.get(f"{V1}/batches/{others}", headers=h).status_code == 404
    assert client.get(f"{V1}/batches/{others}/tasks", headers=h).status_code == 404
    assert ids(get(client, h, f"/batches/{e['batch_one']}/tasks")) == own_tasks
    assert ids(get(client, h, "/tasks")) == own_tasks
    assert ids(get(client, h, "/tasks", workstation_id=world.stations_a[1])) == set()
    assert client.get(f"{V1}/tasks/{other_task}", headers=h).status_code == 404
    task = get(client, h, f"/tasks/{min(own_tasks)}")
    assert task["episode"] is not None
    assert ids(get(client, h, "/episodes")) == {e["early"], e["middle"]}
    assert client.get(f"{V1}/episodes/{e['late']}", headers=h).status_code == 404

    lost = callers.unlinked_collector
    for path in ("/batches", "/tasks", "/episodes"):
        assert get(client, lost, path)["total"] == 0, path


def test_another_factorys_rows_are_404(client: TestClient, callers: Callers, world: World) -> None:
    h = callers.manager
    for path in (
        f"/orders/{world.order_b}",
        f"/batches/{world.batch_b}",
        f"/batches/{world.batch_b}/tasks",
        f"/tasks/{world.task_b}",
        f"/episodes/{world.episode_b}",
    ):
        assert client.get(f"{V1}{path}", headers=h).status_code == 404, path
    writes = [
        ("PUT", f"/orders/{world.order_b}", {"name": "mine now"}),
        ("DELETE", f"/orders/{world.order_b}", None),
        ("PATCH", f"/batches/{world.batch_b}", {"status": "cancelled"}),
        ("POST", f"/batches/{world.batch_b}/tasks", {"task_groups": groups(world, 1)}),
        ("POST", f"/batches/{world.batch_b}/recall", {"reason": "x"}),
        ("DELETE", f"/batches/{world.batch_b}", None),
        ("DELETE", f"/tasks/{world.task_b}", None),
        ("PATCH", f"/episodes/{world.episode_b}", {"labels": ["x"]}),
    ]
    for method, path, body in writes:
        response = client.request(method, f"{V1}{path}", json=body, headers=h)
        assert response.status_code == 404, (method, path, response.text)
    foreign = client.post(
        f"{V1}/orders",
        json={"factory_id": world.factory_b, "name": "theirs", "target_count": 1},
        headers=h,
    )
    assert foreign.status_code == 404
    for path in ("/orders", "/batches", "/tasks", "/episodes"):
        assert get(client, h, path, factory_id=world.factory_b)["total"] == 0, path
    # The admin sees B's rows.
    assert client.get(f"{V1}/tasks/{world.task_b}", headers=callers.admin).status_code == 200


def test_task_detail_carries_names_and_its_episode(
    client: TestClient, callers: Callers, world: World
) -> None:
    h = callers.admin
    task = get(client, h, f"/tasks/{world.task_b}")
    assert task["task_id"].startswith("task-")
    assert task["episode"]["id"] == str(world.episode_b)
    assert task["batch_id"] == str(world.batch_b)
    assert task["batch_public_id"].startswith("batch-")
    order = create_order(client, h, world)
    planned = plan(client, h, order["id"], world.stations_a[1], groups(world, 1)).json()
    fresh = get(client, h, f"/tasks/{planned['tasks'][0]['id']}")
    assert fresh["scene_id"] == str(world.scene_a)
    assert fresh["scene_name"]
    assert fresh["subscene_name"]
    assert fresh["episode"] is None
    assert fresh["workstation_id"] == str(world.stations_a[1])
    assert "user_token_hash" not in fresh
    assert "config" not in fresh
