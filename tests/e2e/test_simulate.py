"""End to end: simulated robots (real HTTP/WS/S3) against the API on MariaDB + SeaweedFS.

5 robots x 2 tasks: every task completed, every episode pending_qa, each upload ACKed
exactly once, order and batch counters right — with ACKs after the metadata checks, and
with the default SHA-256 re-hash by the verify_uploads job.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from keystone_core.models import Factory, Organization, RobotType
from keystone_core.simulation.fleet import FleetPlan, run_fleet
from keystone_core.storage import EmbeddedS3Server, create_s3_client_for_endpoint
from tests.contract.conftest import ADMIN_PASSWORD, LiveApi, api_env, start_api, stop_api

pytestmark = [pytest.mark.integration, pytest.mark.contract]

ROBOTS, TASKS = 5, 2


@pytest.fixture
def site(mariadb_engine: Engine, s3_server: EmbeddedS3Server) -> tuple[int, str]:
    with Session(mariadb_engine) as session:
        org = Organization(name="Sim org", slug="sim-org")
        session.add(org)
        session.flush()
        factory = Factory(organization_id=org.id, name="Sim factory", slug="sim-factory")  # type: ignore[arg-type]
        robot_type = RobotType(name="sim arm", model="sim-arm")
        session.add_all([factory, robot_type])
        session.commit()
        factory_id = int(factory.id)  # type: ignore[arg-type]
    admin = create_s3_client_for_endpoint(
        s3_server.endpoint_url, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    with contextlib.suppress(Exception):
        admin.create_bucket(Bucket=f"edge-{factory_id}")
    return factory_id, "sim-arm"


def start(mariadb_migrated: str, s3: EmbeddedS3Server, tmp_path: Path, verify: str) -> LiveApi:
    env = api_env(
        mariadb_migrated,
        s3,
        tmp_path / "data",
        KEYSTONE_ACK_VERIFY=verify,
        KEYSTONE_RECORDER_REQUIRE_TRANSFER="true",  # the production default
    )
    return start_api(env, tmp_path / "api.log")


def check(db: Engine) -> None:
    with db.connect() as conn:
        tasks = conn.execute(text("SELECT status, COUNT(*) FROM tasks GROUP BY status")).all()
        episodes = conn.execute(text("SELECT status, COUNT(*) FROM episodes GROUP BY status")).all()
        acks = conn.execute(text("SELECT ack_count FROM device_uploads")).scalars().all()
        counters = conn.execute(text("SELECT episode_count FROM orders")).scalars().all()
        batches = conn.execute(text("SELECT episode_count FROM batches")).scalars().all()
    assert dict(tasks) == {"completed": ROBOTS * TASKS}
    assert dict(episodes) == {"pending_qa": ROBOTS * TASKS}
    assert sorted(acks) == [1] * (ROBOTS * TASKS)
    assert counters == [ROBOTS * TASKS]
    assert batches == [TASKS] * ROBOTS


def plan(api: LiveApi, factory_id: int, tmp_path: Path) -> FleetPlan:
    return FleetPlan(
        base_url=api.base_url,
        admin_account="admin",
        admin_password=ADMIN_PASSWORD,
        factory_id=factory_id,
        robots=ROBOTS,
        tasks_per_robot=TASKS,
        data_dir=tmp_path / "robots",
        duration_s=0.5,
        ack_timeout_s=60,
    )


def test_simulated_fleet_with_metadata_verification(
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    tmp_path: Path,
    mariadb_engine: Engine,
    site: tuple[int, str],
) -> None:
    api = start(mariadb_migrated, s3_server, tmp_path, "metadata")
    try:
        summary = asyncio.run(run_fleet(plan(api, site[0], tmp_path), robot_type=site[1]))
    finally:
        stop_api(api.process)
    assert summary["errors"] == 0, summary["first_errors"]
    assert summary["episodes_acked"] == ROBOTS * TASKS
    check(mariadb_engine)


def test_simulated_fleet_with_sha256_verification_by_the_dagster_job(
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    tmp_path: Path,
    mariadb_engine: Engine,
    site: tuple[int, str],
) -> None:
    from dagster import DagsterInstance

    from keystone_pipelines.definitions import defs
    from keystone_pipelines.resources import KeystoneDatabase

    api = start(mariadb_migrated, s3_server, tmp_path, "sha256")
    stop = threading.Event()
    resource = KeystoneDatabase(
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )

    def verifier() -> None:  # what the sensor + run queue do in production
        with DagsterInstance.ephemeral() as instance:
            job = defs.resolve_job_def("verify_uploads")
            while not stop.is_set():
                job.execute_in_process(instance=instance, resources={"database": resource})
                stop.wait(0.5)

    thread = threading.Thread(target=verifier, daemon=True)
    thread.start()
    try:
        summary = asyncio.run(run_fleet(plan(api, site[0], tmp_path), robot_type=site[1]))
    finally:
        stop.set()
        thread.join(60)
        stop_api(api.process)
    assert summary["errors"] == 0, summary["first_errors"]
    check(mariadb_engine)
