"""The compose deployment's process layout, run as local processes (no Docker engine here).

Each process is started with the command its service has in ``docker/compose.yaml`` (host
and port swapped for free local ones) and the environment of ``docker/.env.example`` with
its placeholders filled in: ``KEYSTONE_ENV=production``, Keystone and Dagster each on their
own MariaDB database, the repository's ``dagster.yaml`` verbatim (MySQL storage, the
QueuedRunCoordinator with its pools). Then five simulated robots record ten episodes and
the daemon's sensors take them through QA and sync in queued runs; the read-only UI cannot
launch anything; the Dagster-side exporter shows what the runs counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from sqlalchemy import text
from sqlmodel import Session

from keystone_core.db import create_db_engine
from keystone_core.models import Factory, Organization, RobotType
from keystone_core.settings import load_settings
from keystone_core.simulation.fleet import FleetPlan, run_fleet
from keystone_core.storage import EmbeddedS3Server, create_s3_client_for_endpoint
from keystone_core.storage.embedded import free_tcp_ports
from tests.conftest import (
    MARIADB_HOST,
    MARIADB_PASSWORD,
    MARIADB_PORT,
    MARIADB_USER,
    TEST_DB,
    mariadb_url,
    recreate_mariadb_database,
)
from tests.unit.test_docker_files import COMPOSE, ENV_EXAMPLE, parse_env_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROBOTS, TASKS = 5, 2
ADMIN_PASSWORD = "production-layout-admin"
T = TypeVar("T")

PERMISSIONS = "{ permissions { permission value } }"
RUNS = (
    "{ runsOrError(filter: {statuses: [SUCCESS]}) { __typename ... on Runs "
    "{ results { jobName tags { key value } } } } }"
)


@dataclass
class Layout:
    """The processes of the deployment, each in its own process group."""

    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                argv,
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_until(layout: Layout, what: str, probe: Callable[[], T | None], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        layout.check_alive()
        with contextlib.suppress(httpx.HTTPError):
            value = probe()
            if value:
                return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def compose_command(service: dict[str, Any], ports: dict[str, int]) -> list[str]:
    """The service's command with container host/ports replaced by local ones."""
    argv = [str(part) for part in service["command"]]
    local = []
    for index, part in enumerate(argv):
        previous = argv[index - 1] if index else ""
        if previous in {"--host", "-h"}:
            part = "127.0.0.1"
        elif previous in {"--port", "-p"}:
            part = str(ports[part])
        local.append(part)
    executable = BIN / local[0]
    assert executable.is_file(), f"{local[0]} is not installed in {BIN}"
    local[0] = str(executable)
    workspace = str(ROOT / "workspace.yaml")
    return [workspace if part == "/app/workspace.yaml" else part for part in local]


def graphql(port: int, query: str) -> dict[str, Any]:
    response = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=30)
    response.raise_for_status()
    data: dict[str, Any] = response.json()["data"]
    return data


@pytest.fixture
def databases() -> tuple[str, str]:
    keystone, dagster = f"{TEST_DB}_prod", f"{TEST_DB}_prod_dagster"
    recreate_mariadb_database(keystone)
    recreate_mariadb_database(dagster)
    return keystone, dagster


def test_compose_layout_runs_qa_and_sync_through_queued_runs_on_mysql(
    databases: tuple[str, str], s3_server: EmbeddedS3Server, tmp_path: Path
) -> None:
    keystone_db, dagster_db = databases
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    cloud_bucket = f"cloud-{tmp_path.name.lower().replace('_', '-')}"[:60]

    # docker/.env.example as an operator fills it in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYSTONE_", "DAGSTER_"))}
    example = parse_env_file(ENV_EXAMPLE.read_text(encoding="utf-8"))
    env.update({k: v for k, v in example.items() if k.startswith("KEYSTONE_")})
    env.update(
        {
            "KEYSTONE_SECRET_KEY": "0123456789abcdef" * 4,
            "KEYSTONE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "KEYSTONE_METRICS_TOKEN": "production-layout-metrics-token",
            "KEYSTONE_S3_ACCESS_KEY": s3_server.access_key,
            "KEYSTONE_S3_SECRET_KEY": s3_server.secret_key,
            "KEYSTONE_S3_BUCKET_PREFIX": "prodlayout-",
            "KEYSTONE_SYNC_S3_BUCKET": cloud_bucket,
            # What compose.yaml sets from the compose network, here local addresses.
            "KEYSTONE_DATABASE_URL": mariadb_url(keystone_db),
            "KEYSTONE_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "KEYSTONE_DATA_DIR": str(tmp_path / "data"),
            # Every robot registers from 127.0.0.1 here.
            "KEYSTONE_REGISTRATION_RATE_PER_MINUTE": "10000",
            "DAGSTER_HOME": str(tmp_path / "dagster_home"),
            "DAGSTER_MYSQL_HOST": MARIADB_HOST,
            "DAGSTER_MYSQL_PORT": str(MARIADB_PORT),
            "DAGSTER_MYSQL_USER": MARIADB_USER,
            "DAGSTER_MYSQL_PASSWORD": MARIADB_PASSWORD,
            "DAGSTER_MYSQL_DB": dagster_db,
        }
    )
    assert env["KEYSTONE_ENV"] == "production"
    (tmp_path / "dagster_home").mkdir()
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    metrics_dir = tmp_path / "dagster-metrics"
    metrics_dir.mkdir()
    dagster_side = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}

    api_port, web_port, ro_port, exporter_port = free_tcp_ports(4)
    ports = {"8000": api_port, "9464": exporter_port}
    layout = Layout(tmp_path)
    try:
        # dagster-migrate (one-shot), then what waits for it.
        migrate = subprocess.run(
            compose_command(services["dagster-migrate"], ports),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr

        layout.start("keystone-api", compose_command(services["keystone-api"], ports), env)
        api = f"http://127.0.0.1:{api_port}"
        wait_until(
            layout,
            "the API (migrations on start)",
            lambda: httpx.get(f"{api}/api/v1/health/live", timeout=2).status_code == 200,
            180,
        )
        layout.start(
            "dagster-webserver",
            compose_command(services["dagster-webserver"], {**ports, "3000": web_port}),
            env,
        )
        layout.start(
            "dagster-webserver-readonly",
            compose_command(services["dagster-webserver-readonly"], {**ports, "3000": ro_port}),
            env,
        )
        layout.start(
            "dagster-daemon",
            compose_command(services["dagster-daemon"], ports),
            {**env, **dagster_side},
        )
        layout.start(
            "dagster-metrics",
            compose_command(services["dagster-metrics"], ports),
            {**env, **dagster_side},
        )
        for port in (web_port, ro_port):
            wait_until(
                layout,
                f"the Dagster webserver on {port}",
                lambda port=port: (
                    httpx.get(  # type: ignore[misc]
                        f"http://127.0.0.1:{port}/server_info", timeout=2
                    ).status_code
                    == 200
                ),
                180,
            )

        # The full UI may launch runs; the read-only one may not.
        def may_launch(port: int) -> bool:
            granted = {
                p["permission"]: p["value"] for p in graphql(port, PERMISSIONS)["permissions"]
            }
            return bool(granted["launch_pipeline_execution"])

        assert may_launch(web_port)
        assert not may_launch(ro_port)

        # A site to record into (an operator creates it through the API or Synapse).
        settings = load_settings(env="test", database_url=env["KEYSTONE_DATABASE_URL"])
        engine = create_db_engine(settings)
        with Session(engine) as session:
            org = Organization(name="Layout org", slug="layout-org")
            session.add(org)
            session.flush()
            factory = Factory(organization_id=org.id, name="Layout", slug="layout")  # type: ignore[arg-type]
            session.add_all([factory, RobotType(name="layout arm", model="layout-arm")])
            session.commit()
            factory_id = int(factory.id)  # type: ignore[arg-type]
        s3 = create_s3_client_for_endpoint(
            s3_server.endpoint_url,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        )
        for bucket in (f"prodlayout-{factory_id}", cloud_bucket):
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=bucket)

        summary = asyncio.run(
            run_fleet(
                FleetPlan(
                    base_url=api,
                    admin_account="admin",
                    admin_password=ADMIN_PASSWORD,
                    factory_id=factory_id,
                    robots=ROBOTS,
                    tasks_per_robot=TASKS,
                    data_dir=tmp_path / "robots",
                    duration_s=2.0,
                    ack_timeout_s=120,
                ),
                robot_type="layout-arm",
            )
        )
        assert summary["errors"] == 0, summary["first_errors"]

        def settled() -> dict[str, int] | None:
            with engine.connect() as conn:
                episodes: dict[str, int] = dict(
                    conn.execute(
                        text("SELECT status, COUNT(*) FROM episodes GROUP BY status")
                    ).all()
                )
                jobs: dict[str, int] = dict(
                    conn.execute(
                        text("SELECT status, COUNT(*) FROM sync_jobs GROUP BY status")
                    ).all()
                )
            verdicts = sum(episodes.get(s, 0) for s in ("auto_approved", "needs_inspection"))
            approved = episodes.get("auto_approved", 0)
            if verdicts == ROBOTS * TASKS and jobs.get("synced", 0) == approved:
                return {**episodes, "synced": jobs.get("synced", 0)}
            return None

        outcome = wait_until(layout, "QA verdicts and syncs by the daemon", settled, 420)
        assert outcome["auto_approved"] > 0, outcome
        engine.dispose()

        # Both went through the run queue of the MySQL-backed instance, in their pools.
        runs = graphql(web_port, RUNS)["runsOrError"]["results"]
        pools = {
            run["jobName"]: {t["value"] for t in run["tags"] if t["key"] == "keystone/pool"}
            for run in runs
        }
        assert pools.get("qa_batch") == {"qa"}, pools
        assert pools.get("sync_batch") == {"sync"}, pools

        # The API's readiness includes the daemon's heartbeat; compose's daemon healthcheck
        # passes; the Dagster-side exporter shows the verdicts the runs counted.
        health = wait_until(
            layout,
            "all health components up",
            lambda: (
                r.json()
                if (r := httpx.get(f"{api}/api/v1/health", timeout=5)).status_code == 200
                else None
            ),
            120,
        )
        assert {c["status"] for c in health["components"].values()} == {"up"}, health
        liveness = subprocess.run(
            [str(BIN / "dagster-daemon"), "liveness-check"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert liveness.returncode == 0, liveness.stdout + liveness.stderr
        exported = httpx.get(f"http://127.0.0.1:{exporter_port}/metrics", timeout=10).text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in exported.splitlines()
            if line.startswith("keystone_qa_results_total{")
        )
        assert counted == ROBOTS * TASKS, exported[:2000]
    finally:
        layout.stop()
