"""Contract-test fixtures: a live ``keystone api`` (uvicorn, real frames) on MariaDB + S3.

The in-process test client has no real WebSocket frames, close codes or TCP closes, so
these tests start the API the way production does (``keystone api``) on a free port and
talk to it over sockets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session, SQLModel, select

from keystone_core import clock
from keystone_core.db import create_db_engine
from keystone_core.models import (
    SOP,
    Batch,
    DataCollector,
    EnrollmentWindow,
    Factory,
    Order,
    Organization,
    RobotType,
    Role,
    Scene,
    Skill,
    Subscene,
    Task,
    User,
)
from keystone_core.security import hash_password
from keystone_core.settings import load_settings
from keystone_core.storage import EmbeddedS3Server, free_tcp_ports

pytestmark = pytest.mark.contract

ADMIN_PASSWORD = "contract-admin-password"


@dataclass
class LiveApi:
    base_url: str
    ws_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_api(
    env: dict[str, str], log_path: Path, *, timeout: float = 60.0, workers: int = 1
) -> LiveApi:
    (port,) = free_tcp_ports(1)
    log_file = log_path.open("wb")
    argv = ["api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(
        [sys.executable, "-m", "keystone_cli", *argv],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"keystone api exited:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/api/v1/health/live", timeout=1).status_code == 200:
                return LiveApi(base, f"ws://127.0.0.1:{port}", env, process, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_api(process)
    raise RuntimeError(f"keystone api did not start:\n{log_path.read_text()[-4000:]}")


def stop_api(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def api_env(
    database_url: str, s3: EmbeddedS3Server, data_dir: Path, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    env.update(
        {
            "KEYSTONE_ENV": "test",
            "KEYSTONE_DATABASE_URL": database_url,
            "KEYSTONE_DATA_DIR": str(data_dir),
            "KEYSTONE_SECRET_KEY": "contract-test-secret-key-0123456789abcdef",
            "KEYSTONE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "KEYSTONE_S3_ENDPOINT_URL": s3.endpoint_url,
            "KEYSTONE_S3_ACCESS_KEY": s3.access_key,
            "KEYSTONE_S3_SECRET_KEY": s3.secret_key,
            "KEYSTONE_DEVICE_HEARTBEAT_S": "1",
            "KEYSTONE_RECORDER_RPC_TIMEOUT_S": "3",
            "KEYSTONE_RECORDER_FINISH_TIMEOUT_S": "5",
            "KEYSTONE_UPLOAD_REQUEST_COOLDOWN_S": "1",
            # The recorder cases run without a transfer socket; its gate has its own case.
            "KEYSTONE_RECORDER_REQUIRE_TRANSFER": "false",
            # Low enough that a test can flood past it.
            "KEYSTONE_RECORDER_FRAME_RATE_PER_SECOND": "50",
            "KEYSTONE_LOG_LEVEL": "INFO",
            # Every test signs in and registers from 127.0.0.1.
            "KEYSTONE_LOGIN_RATE_PER_MINUTE": "10000",
            "KEYSTONE_REGISTRATION_RATE_PER_MINUTE": "10000",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def live_api(
    mariadb_migrated: str, s3_server: EmbeddedS3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveApi]:
    data = tmp_path_factory.mktemp("api")
    api = start_api(api_env(mariadb_migrated, s3_server, data), data / "api.log")
    yield api
    stop_api(api.process)


@pytest.fixture
def db(mariadb_migrated: str) -> Iterator[Engine]:
    engine = create_db_engine(load_settings(env="test", database_url=mariadb_migrated))
    yield engine
    with engine.begin() as conn:
        conn.execute(text("SET FOREIGN_KEY_CHECKS=0"))
        for table in reversed(SQLModel.metadata.sorted_tables):
            if table.name not in {"users"}:
                conn.execute(table.delete())
        conn.execute(text("SET FOREIGN_KEY_CHECKS=1"))
    engine.dispose()


@dataclass
class World:
    factory_id: int
    factory_name: str
    robot_type_id: int
    robot_type_model: str
    collector_id: int
    order_id: int
    batch_id: int
    task_ids: list[str]
    admin_headers: dict[str, str]


def seed_world(engine: Engine, live: LiveApi, *, tasks: int = 3, tag: str = "c") -> World:
    """A factory with a robot type, an operator, an order with one batch of tasks, an open
    enrollment window; the batch's station gets its robot when a device registers."""
    stamp = f"{tag}{time.monotonic_ns() % 10**9}"
    with Session(engine) as session:
        org = Organization(name=f"Org {stamp}", slug=f"org-{stamp}")
        session.add(org)
        session.flush()
        factory = Factory(organization_id=org.id, name=f"Factory {stamp}", slug=f"fac-{stamp}")  # type: ignore[arg-type]
        robot_type = RobotType(
            name="arm", model=f"arm-{stamp}", ros_topics=["/imu/data", "/udp/gps"]
        )
        skill = Skill(slug="pick")
        session.add_all([factory, robot_type, skill])
        session.flush()
        scene = Scene(factory_id=factory.id, name="kitchen")
        sop = SOP(slug="sop-pick", skill_sequence=[str(skill.id)])
        collector = DataCollector(factory_id=factory.id, name="Alice 操作员", operator_id="op-117")  # type: ignore[arg-type]
        order = Order(factory_id=factory.id, name="order", target_count=50)  # type: ignore[arg-type]
        session.add_all([scene, sop, collector, order])
        session.flush()
        subscene = Subscene(scene_id=scene.id, name="sink_left")  # type: ignore[arg-type]
        window = EnrollmentWindow(
            factory_id=factory.id,  # type: ignore[arg-type]
            expires_at=clock.now() + timedelta(minutes=30),
        )
        session.add_all([subscene, window])
        session.flush()
        batch = Batch(batch_id=f"batch-{stamp}", order_id=order.id, factory_id=factory.id)  # type: ignore[arg-type]
        session.add(batch)
        session.flush()
        task_rows = [
            Task(
                task_id=f"task-{stamp}-{i}",
                batch_id=batch.id,  # type: ignore[arg-type]
                order_id=order.id,  # type: ignore[arg-type]
                factory_id=factory.id,  # type: ignore[arg-type]
                scene_id=scene.id,
                subscene_id=subscene.id,
                sop_id=sop.id,
            )
            for i in range(tasks)
        ]
        session.add_all(task_rows)
        if session.exec(select(User).where(User.account == "contract-admin")).first() is None:
            session.add(
                User(
                    account="contract-admin",
                    password_hash=hash_password(ADMIN_PASSWORD),
                    role=Role.ADMIN,
                )
            )
        session.commit()
        world = World(
            factory_id=int(factory.id),  # type: ignore[arg-type]
            factory_name=factory.name,
            robot_type_id=int(robot_type.id),  # type: ignore[arg-type]
            robot_type_model=robot_type.model,
            collector_id=int(collector.id),  # type: ignore[arg-type]
            order_id=int(order.id),  # type: ignore[arg-type]
            batch_id=int(batch.id),  # type: ignore[arg-type]
            task_ids=[t.task_id for t in task_rows],
            admin_headers={},
        )
    token = httpx.post(
        f"{live.base_url}/api/v1/auth/login",
        json={"account": "contract-admin", "password": ADMIN_PASSWORD},
    ).json()["access_token"]
    world.admin_headers = {"Authorization": f"Bearer {token}"}
    return world


def register(live: LiveApi, world: World) -> dict[str, Any]:
    """``axon-config register`` exactly: its headers and body, no credentials."""
    response = httpx.post(
        f"{live.base_url}/api/v1/devices/register",
        timeout=30,
        content=f'{{"factory":"{world.factory_name}","robot_type":"{world.robot_type_model}"}}',
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "axon-config/1.0",
        },
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def place_at_station(live: LiveApi, world: World, robot_id: str) -> str:
    """A station with the registered robot and the operator; the batch's tasks go there."""
    station = httpx.post(
        f"{live.base_url}/api/v1/stations",
        json={
            "factory_id": world.factory_id,
            "name": f"station-{robot_id}",
            "robot_id": int(robot_id),
            "data_collector_id": world.collector_id,
        },
        headers=world.admin_headers,
    )
    assert station.status_code == 201, station.text
    station_id = station.json()["id"]
    return str(station_id)


def bind_tasks(engine: Engine, world: World, station_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE batches SET workstation_id=:s WHERE id=:b"),
            {"s": int(station_id), "b": world.batch_id},
        )
        conn.execute(
            text("UPDATE tasks SET workstation_id=:s WHERE batch_id=:b"),
            {"s": int(station_id), "b": world.batch_id},
        )


def task_row(engine: Engine, task_id: str) -> Any:
    with engine.connect() as conn:
        return (
            conn.execute(text("SELECT * FROM tasks WHERE task_id=:t"), {"t": task_id})
            .mappings()
            .first()
        )


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Device:
    world: World
    registration: dict[str, Any]
    station_id: str

    @property
    def device_id(self) -> str:
        return str(self.registration["device_id"])

    @property
    def token(self) -> str:
        return str(self.registration["ws_client_auth_token"])

    @property
    def rpc_url(self) -> str:
        return str(self.registration["endpoints"]["recorder_rpc_url"])


@pytest.fixture
def device(live_api: LiveApi, db: Engine) -> Device:
    world = seed_world(db, live_api)
    registration = register(live_api, world)
    station = place_at_station(live_api, world, registration["robot_id"])
    bind_tasks(db, world, station)
    return Device(world, registration, station)


@pytest.fixture
async def api(live_api: LiveApi, device: Device) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=live_api.base_url, headers=device.world.admin_headers, timeout=30
    ) as client:
        yield client
