"""End to end: the metrics move as the work moves, and stay right with two API workers.

The API runs with two workers and a shared ``PROMETHEUS_MULTIPROC_DIR``; five simulated
robots record two episodes each over real HTTP/WS/S3; then a QA run and a sync run execute
in another process on the same host (as the Dagster daemon's runs do). Every scrape —
whichever worker answers — shows the same counts: requests, ACKs, the upload → ACK latency,
QA verdicts, sync attempts and approved → synced latency, and the state gauges read from
the database agree with the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text
from sqlmodel import Session

from keystone_core.models import Factory, Organization, RobotType
from keystone_core.simulation.fleet import FleetPlan, run_fleet
from keystone_core.storage import (
    EmbeddedS3Server,
    create_s3_client_for_endpoint,
    free_tcp_ports,
)
from tests.contract.conftest import ADMIN_PASSWORD, LiveApi, api_env, start_api, stop_api

pytestmark = [pytest.mark.integration, pytest.mark.contract]

ROBOTS, TASKS = 5, 2
EPISODES = ROBOTS * TASKS
CLOUD_BUCKET = "metrics-cloud"

RUNS = """
from dagster import DagsterInstance
from keystone_pipelines.defs.qa import qa_batch
from keystone_pipelines.defs.sync import sync_batch
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

resources = {"database": KeystoneDatabase(), "object_store": KeystoneObjectStore()}
with DagsterInstance.ephemeral() as instance:
    assert qa_batch.execute_in_process(instance=instance, resources=resources).success
    assert sync_batch.execute_in_process(instance=instance, resources=resources).success
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(api: LiveApi) -> Samples:
    response = httpx.get(f"{api.base_url}/metrics", timeout=10)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every sample whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


def stable(api: LiveApi, name: str, **labels: str) -> float:
    """The value of a counter over four scrapes (both workers answer some): all equal."""
    values = {total(scrape(api), name, **labels) for _ in range(4)}
    assert len(values) == 1, (name, values)
    return values.pop()


def wait_for(api: LiveApi, name: str, expected: float, **labels: str) -> None:
    deadline = time.monotonic() + 30
    while total(scrape(api), name, **labels) != expected:
        assert time.monotonic() < deadline, (name, total(scrape(api), name, **labels))
        time.sleep(0.2)


def db_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, COUNT(*) FROM episodes GROUP BY status")).all()
    return {str(status): int(count) for status, count in rows}


@pytest.fixture
def factory(mariadb_engine: Engine, s3_server: EmbeddedS3Server) -> tuple[int, str]:
    with Session(mariadb_engine) as session:
        org = Organization(name="Metrics org", slug="metrics-org")
        session.add(org)
        session.flush()
        row = Factory(organization_id=org.id, name="Metrics factory", slug="metrics-factory")  # type: ignore[arg-type]
        session.add_all([row, RobotType(name="sim arm", model="sim-arm")])
        session.commit()
        factory_id = int(row.id)  # type: ignore[arg-type]
    admin = create_s3_client_for_endpoint(
        s3_server.endpoint_url, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    for bucket in (f"edge-{factory_id}", CLOUD_BUCKET):
        with contextlib.suppress(Exception):
            admin.create_bucket(Bucket=bucket)
    return factory_id, "metrics-factory"


def test_metrics_follow_a_simulated_run_across_two_workers_and_a_dagster_process(
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    mariadb_engine: Engine,
    factory: tuple[int, str],
    tmp_path: Path,
) -> None:
    factory_id, slug = factory
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = api_env(
        mariadb_migrated,
        s3_server,
        tmp_path / "data",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        KEYSTONE_ACK_VERIFY="metadata",
        KEYSTONE_RECORDER_REQUIRE_TRANSFER="true",
        KEYSTONE_SYNC_S3_BUCKET=CLOUD_BUCKET,
        KEYSTONE_METRICS_STATE_CACHE_S="0",
    )
    api = start_api(env, tmp_path / "api.log", workers=2)
    try:
        # Requests: 13 refused calls are 13 in every scrape, whichever worker answers.
        for _ in range(13):
            assert httpx.get(f"{api.base_url}/api/v1/alerts/rules").status_code == 401
        refused = {"route": "/api/v1/alerts/rules", "status": "401"}
        assert stable(api, "keystone_http_requests_total", **refused) == 13
        latency = {"route": "/api/v1/alerts/rules", "method": "GET"}
        assert stable(api, "keystone_http_request_duration_seconds_count", **latency) == 13
        before = scrape(api)
        assert total(before, "keystone_state_up") == 1
        assert total(before, "keystone_qa_backlog", factory=slug) == 0
        assert total(before, "keystone_upload_acks_total") == 0

        plan = FleetPlan(
            base_url=api.base_url,
            admin_account="admin",
            admin_password=ADMIN_PASSWORD,
            factory_id=factory_id,
            robots=ROBOTS,
            tasks_per_robot=TASKS,
            data_dir=tmp_path / "robots",
            duration_s=2.0,  # above KEYSTONE_QA_MIN_DURATION_S
            ack_timeout_s=60,
        )
        summary = asyncio.run(run_fleet(plan, robot_type="sim-arm"))
        assert summary["errors"] == 0, summary["first_errors"]

        # Upload side, counted by the API workers.
        assert stable(api, "keystone_upload_acks_total") == EPISODES
        assert stable(api, "keystone_upload_ack_latency_seconds_count") == EPISODES
        assert stable(api, "keystone_upload_ack_latency_seconds_sum") > 0
        wait_for(api, "keystone_device_connections", 0)  # the robots hung up
        after_upload = scrape(api)
        assert db_counts(mariadb_engine) == {"pending_qa": EPISODES}
        assert total(after_upload, "keystone_qa_backlog", factory=slug) == EPISODES
        assert total(after_upload, "keystone_upload_queue_depth", factory=slug) == 0
        assert total(after_upload, "keystone_last_upload_timestamp_seconds", factory=slug) > 0

        # QA and sync in another process of the host, as the daemon's runs are.
        run = subprocess.run(
            [sys.executable, "-c", RUNS],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-4000:]

        counts = db_counts(mariadb_engine)
        approved = counts.get("auto_approved", 0)
        assert approved > 0, counts
        assert sum(counts.values()) == EPISODES
        verdicts: dict[str, float] = defaultdict(float)
        for verdict in ("auto_approved", "needs_inspection", "qa_failed"):
            verdicts[verdict] = stable(api, "keystone_qa_results_total", verdict=verdict)
            assert verdicts[verdict] == counts.get(verdict, 0), verdict
        assert stable(api, "keystone_qa_duration_seconds_count") == EPISODES
        assert stable(api, "keystone_sync_attempts_total", outcome="synced") == approved
        assert stable(api, "keystone_approved_to_synced_seconds_count") == approved

        state = scrape(api)
        assert total(state, "keystone_qa_backlog", factory=slug) == 0
        assert total(state, "keystone_inspection_queue_depth", factory=slug) == counts.get(
            "needs_inspection", 0
        )
        assert total(state, "keystone_qa_results_last_hour", factory=slug) == EPISODES
        assert total(state, "keystone_sync_queue_depth", factory=slug) == 0
        assert total(state, "keystone_sync_failed_jobs", factory=slug) == 0
    finally:
        stop_api(api.process)


def test_the_metrics_exporter_serves_a_hosts_shared_directory(tmp_path: Path) -> None:
    (free_port,) = free_tcp_ports(1)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PATH": "/usr/bin:/bin"}
    count = (
        "from keystone_core import metrics\n"
        "for _ in range(3): metrics.observe_sync_attempt('s3', 'synced')\n"
    )
    for _ in range(2):  # two processes, both gone before the scrape
        subprocess.run([sys.executable, "-c", count], env=env, check=True, timeout=120)
    exporter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keystone_cli",
            "metrics-exporter",
            "--port",
            str(free_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = httpx.get(f"http://127.0.0.1:{free_port}/metrics", timeout=2).text
                break
            except httpx.HTTPError:
                assert exporter.poll() is None, exporter.stderr.read() if exporter.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.2)
        value = next(
            s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
            if s.name == "keystone_sync_attempts_total" and s.labels.get("outcome") == "synced"
        )
        assert value == 6
    finally:
        exporter.kill()
        exporter.wait(10)


def test_the_metrics_exporter_needs_a_directory(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "keystone_cli", "metrics-exporter"],
        env={"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2
    assert "PROMETHEUS_MULTIPROC_DIR" in run.stderr
