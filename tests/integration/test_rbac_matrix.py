"""The RBAC matrix: every route of the access table by every kind of caller → expected status.

Generated from ``keystone_api.access.ROUTE_ACCESS``, so a route added without an entry
(or an entry without a route) fails here. Callers: anonymous, an expired token, each
role (scoped to factory A), and a production manager of A reading factory B's rows.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from keystone_api.access import ROUTE_ACCESS, Device, Public
from keystone_api.app import api_routes, create_app
from keystone_core import clock
from keystone_core.models import (
    SOP,
    Alert,
    AlertSeverity,
    Batch,
    DataCollector,
    EnrollmentWindow,
    Episode,
    Factory,
    Inspector,
    Order,
    Organization,
    OutboxEvent,
    OutboxStatus,
    Robot,
    RobotConfigTemplate,
    RobotType,
    Role,
    Scene,
    Skill,
    Subscene,
    Task,
    User,
    UserFactory,
    Webhook,
    WebhookDelivery,
    WebhookDeliveryStatus,
    Workstation,
)
from keystone_core.security import hash_password, issue_access_token
from keystone_core.settings import Settings
from keystone_core.storage import EmbeddedS3Server
from tests.conftest import make_settings

pytestmark = pytest.mark.integration

# Collections whose rows belong to one factory: another factory's caller gets 404.
GLOBAL_COLLECTIONS = {"robot_types", "skills", "sops"}


@dataclass
class World:
    """One factory with a row of every family; ids by collection name."""

    factory_id: int
    ids: dict[str, int]
    data_collector_id: int
    inspector_id: int


def build_world(session: Session, tag: str) -> World:
    org = Organization(name=f"Org {tag}", slug=f"org-{tag}")
    session.add(org)
    session.flush()
    factory = Factory(organization_id=org.id, name=f"F {tag}", slug=f"f-{tag}")  # type: ignore[arg-type]
    robot_type = RobotType(name=f"type {tag}", model=f"model-{tag}")
    skill = Skill(slug=f"skill-{tag}")
    session.add_all([factory, robot_type, skill])
    session.flush()
    assert factory.id is not None
    session.add(
        RobotConfigTemplate(
            robot_type_id=robot_type.id,  # type: ignore[arg-type]
            filename="config.yaml",
            content="device: {{ device_id }}\n",
        )
    )
    sop = SOP(slug=f"sop-{tag}", skill_sequence=[skill.slug])
    scene = Scene(factory_id=factory.id, name=f"scene {tag}")
    robot = Robot(factory_id=factory.id, robot_type_id=robot_type.id, device_id=f"dev-{tag}")  # type: ignore[arg-type]
    collector = DataCollector(factory_id=factory.id, name=f"op {tag}", operator_id=f"op-{tag}")
    inspector = Inspector(factory_id=factory.id, name=f"qa {tag}", inspector_id=f"qa-{tag}")
    session.add_all([sop, scene, robot, collector, inspector])
    session.flush()
    subscene = Subscene(scene_id=scene.id, name=f"sub {tag}")  # type: ignore[arg-type]
    station = Workstation(
        factory_id=factory.id, name=f"st {tag}", robot_id=robot.id, data_collector_id=collector.id
    )
    order = Order(factory_id=factory.id, name=f"order {tag}", target_count=10, scene_id=scene.id)
    session.add_all([subscene, station, order])
    session.flush()
    batch = Batch(
        batch_id=f"batch-{tag}",
        order_id=order.id,  # type: ignore[arg-type]
        factory_id=factory.id,
        workstation_id=station.id,
    )
    session.add(batch)
    session.flush()
    task = Task(
        task_id=f"task-{tag}",
        batch_id=batch.id,  # type: ignore[arg-type]
        order_id=order.id,  # type: ignore[arg-type]
        factory_id=factory.id,
        workstation_id=station.id,
        scene_id=scene.id,
        subscene_id=subscene.id,
        sop_id=sop.id,
    )
    session.add(task)
    session.flush()
    episode = Episode(
        episode_id=f"ep-{tag}",
        task_id=task.id,  # type: ignore[arg-type]
        factory_id=factory.id,
        order_id=order.id,  # type: ignore[arg-type]
        batch_id=batch.id,  # type: ignore[arg-type]
        device_id=robot.device_id,
        recording_date=dt.date(2026, 11, 1),
        bucket=f"edge-{factory.id}",
        mcap_path=f"{factory.id}/{robot.device_id}/2026-11-01/{task.task_id}.mcap",
    )
    user = User(account=f"someone-{tag}", password_hash=hash_password("x" * 12), role=Role.ADMIN)
    window = EnrollmentWindow(
        factory_id=factory.id, expires_at=clock.now() + dt.timedelta(minutes=5)
    )
    session.add_all([episode, user, window])
    session.flush()
    session.add(UserFactory(user_id=user.id, factory_id=factory.id))  # type: ignore[arg-type]
    # A webhook of the factory with one delivered delivery (for the delivery-log routes).
    webhook = Webhook(
        url=f"http://127.0.0.1:9/{tag}",
        secret=f"whsec_{tag}",
        event_types=["*"],
        factory_id=factory.id,
    )
    event = OutboxEvent(
        event_type="webhook.test", factory_id=factory.id, status=OutboxStatus.DELIVERED
    )
    session.add_all([webhook, event])
    session.flush()
    delivery = WebhookDelivery(
        webhook_id=webhook.id,  # type: ignore[arg-type]
        event_id=event.id,  # type: ignore[arg-type]
        event_type=event.event_type,
        status=WebhookDeliveryStatus.DELIVERED,
    )
    session.add(delivery)
    alert = Alert(
        rule="upload_queue_high",
        severity=AlertSeverity.WARNING,
        factory_id=factory.id,
        open_key=f"upload_queue_high:{factory.id}",
        summary="6 tasks are waiting for their upload (more than 5)",
        started_at=clock.now(),
        last_evaluated_at=clock.now(),
    )
    session.add(alert)
    session.flush()
    ids = {
        "organizations": org.id,
        "factories": factory.id,
        "stations": station.id,
        "robot_types": robot_type.id,
        "robots": robot.id,
        "data_collectors": collector.id,
        "inspectors": inspector.id,
        "users": user.id,
        "scenes": scene.id,
        "subscenes": subscene.id,
        "skills": skill.id,
        "sops": sop.id,
        "orders": order.id,
        "batches": batch.id,
        "tasks": task.id,
        "episodes": episode.id,
        "inspections": episode.id,  # /inspections/{id}/… take the episode's id
        "enrollment_windows": window.id,
        "webhooks": webhook.id,
        "webhook_deliveries": delivery.id,
        "alerts": alert.id,
    }
    return World(
        factory_id=factory.id,
        ids={k: int(v) for k, v in ids.items() if v is not None},
        data_collector_id=int(collector.id),  # type: ignore[arg-type]
        inspector_id=int(inspector.id),  # type: ignore[arg-type]
    )


@dataclass
class Callers:
    tokens: dict[str, str]
    expired: str
    world_a: World
    world_b: World
    device_id_a: str


def make_user(session: Session, account: str, role: Role, world: World | None) -> User:
    user = User(account=account, password_hash=hash_password("matrix-password"), role=role)
    if role is Role.DATA_COLLECTOR and world is not None:
        user.data_collector_id = world.data_collector_id
    if role is Role.DATA_INSPECTOR and world is not None:
        user.inspector_id = world.inspector_id
    session.add(user)
    session.flush()
    if world is not None:
        session.add(UserFactory(user_id=user.id, factory_id=world.factory_id))  # type: ignore[arg-type]
    return user


@pytest.fixture
def app_settings(tmp_path: Path, mariadb_migrated: str, s3_server: EmbeddedS3Server) -> Settings:
    return make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        login_rate_per_minute=10_000,
    )


@pytest.fixture
def client(app_settings: Settings, mariadb_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings)) as c:
        yield c


@pytest.fixture
def callers(app_settings: Settings, mariadb_engine: Engine, client: TestClient) -> Callers:
    with Session(mariadb_engine) as session:
        world_a = build_world(session, "a")
        world_b = build_world(session, "b")
        users = {
            "admin": make_user(session, "matrix-admin", Role.ADMIN, None),
            "production_manager": make_user(session, "matrix-pm", Role.PRODUCTION_MANAGER, world_a),
            "data_collector": make_user(session, "matrix-dc", Role.DATA_COLLECTOR, world_a),
            "data_inspector": make_user(session, "matrix-qa", Role.DATA_INSPECTOR, world_a),
        }
        session.commit()
        scopes = {"admin": []}
        tokens = {}
        for name, user in users.items():
            token, _ = issue_access_token(
                app_settings,
                subject=str(user.id),
                role=user.role,
                factory_ids=scopes.get(name, [world_a.factory_id]),
            )
            tokens[name] = token
        with clock.frozen(clock.now() - dt.timedelta(days=30)):
            expired, _ = issue_access_token(
                app_settings,
                subject=str(users["admin"].id),
                role=Role.ADMIN,
                factory_ids=[],
            )
    return Callers(tokens, expired, world_a, world_b, "dev-a")


def collection_of(path: str) -> str:
    """The family whose row ``{id}`` names: the segment before it (``/qa/episodes/{id}/…``
    → episodes), else the first one."""
    segments = path.removeprefix("/api/v1/").split("/")
    return segments[segments.index("{id}") - 1] if "{id}" in segments[1:] else segments[0]


def fill(path: str, world: World, device_id: str) -> str:
    collection = collection_of(path)

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "id":
            return str(world.ids[collection])
        if name == "filename":
            return "config.yaml"
        if name == "device_id":
            return device_id
        if name == "delivery_id":
            return str(world.ids["webhook_deliveries"])
        raise AssertionError(f"no value for path parameter {name} in {path}")

    url = re.sub(r"\{(\w+)\}", value, path)
    if path.endswith("/configs/{filename}"):
        url += f"?device_id={device_id}"
    return url


@dataclass
class Answer:
    status_code: int
    body: Any

    def json(self) -> Any:
        return self.body


def call(client: TestClient, method: str, url: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {} if method in {"POST", "PUT", "PATCH"} else None
    if url.startswith("/api/v1/device-state/stream"):
        # An event stream never ends: read its status and first line only.
        with client.stream(method, url, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                return Answer(response.status_code, response.json())
            next(response.iter_lines())
            return Answer(response.status_code, None)
    return client.request(method, url, json=body, headers=headers)


def test_the_table_and_the_app_name_the_same_routes(app_settings: Settings) -> None:
    routes = set(api_routes(create_app(app_settings)))
    assert routes == set(ROUTE_ACCESS), {
        "without a rule": sorted(routes - set(ROUTE_ACCESS)),
        "without a route": sorted(set(ROUTE_ACCESS) - routes),
    }


def test_rbac_matrix(client: TestClient, callers: Callers) -> None:
    failures: list[str] = []
    # Sign-out last: it revokes the token it is called with.
    order = sorted(ROUTE_ACCESS, key=lambda k: k == ("POST", "/api/v1/auth/logout"))
    for method, path in order:
        rule = ROUTE_ACCESS[(method, path)]
        url = fill(path, callers.world_a, callers.device_id_a)

        anonymous = call(client, method, url, None)
        if isinstance(rule, Device):
            # Device routes take device or task tokens only (contract tests cover them).
            for token in (None, *callers.tokens.values()):
                status = call(client, method, url, token).status_code
                if status < 400 or status >= 500:
                    failures.append(f"{method} {path} user/anonymous → {status}")
            continue
        if isinstance(rule, Public):
            if anonymous.status_code in {401, 403} or anonymous.status_code >= 500:
                failures.append(f"{method} {path} anonymous → {anonymous.status_code}")
            continue
        if anonymous.status_code != 401:
            failures.append(f"{method} {path} anonymous → {anonymous.status_code}, want 401")
        expired = call(client, method, url, callers.expired)
        if expired.status_code != 401 or expired.json().get("code") != "token_expired":
            failures.append(f"{method} {path} expired → {expired.status_code}, want 401")

        for role_name, token in callers.tokens.items():
            response = call(client, method, url, token)
            allowed = Role(role_name) in rule
            status = response.status_code
            if allowed and (status in {401, 403} or status >= 500):
                failures.append(f"{method} {path} {role_name} → {status} (allowed)")
            if not allowed and status != 403:
                failures.append(f"{method} {path} {role_name} → {status}, want 403")
    assert not failures, "\n".join(failures)


def test_another_factorys_rows_are_404_not_403(client: TestClient, callers: Callers) -> None:
    failures: list[str] = []
    token = callers.tokens["production_manager"]
    checked = []
    for method, path in ROUTE_ACCESS:
        rule = ROUTE_ACCESS[(method, path)]
        if method != "GET" or "{id}" not in path or isinstance(rule, Public):
            continue
        if Role.PRODUCTION_MANAGER not in rule:
            continue
        collection = collection_of(path)
        response = call(client, method, fill(path, callers.world_b, "dev-b"), token)
        want = 200 if collection in GLOBAL_COLLECTIONS else 404
        if response.status_code != want:
            failures.append(f"GET {path} of factory B → {response.status_code}, want {want}")
        checked.append(path)
    assert not failures, "\n".join(failures)
    assert "/api/v1/episodes/{id}/presign" in checked
