"""The QA pipeline on MariaDB and a real S3 server: the sensor batches a backlog into runs,
runs claim with leases and score the episodes from the store, a dead run's episodes come
back and are scored once, a partition backfill re-scores, a missing object is retried then
failed, and the API reads checks and asks for reruns."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    MultiPartitionKey,
    SensorResult,
    build_sensor_context,
    materialize,
)
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, func, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import AuditLog, Episode, EpisodeStatus, Order, QAResult, SyncJob
from keystone_core.qa.run import assess
from keystone_core.qa.source import S3Source
from keystone_core.services import qa as qa_service
from keystone_core.settings import load_settings
from keystone_core.simulation.episodes import DEFAULT_TOPICS, EpisodeSpec, generate
from keystone_core.storage import create_s3_client
from keystone_core.storage.client import ensure_bucket
from keystone_core.storage.embedded import EmbeddedS3Server
from keystone_pipelines.defs.qa import episode_qa, pending_qa_sensor, qa_batch, qa_rerun
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore
from tests.conftest import make_settings
from tests.factories import make_factory, make_robot, make_robot_type, make_task

REQUIRED = [t.name for t in DEFAULT_TOPICS]
DAY = dt.date(2026, 11, 20)


class Site:
    def __init__(self, engine: Engine, url: str, s3: EmbeddedS3Server, root: Path) -> None:
        self.engine = engine
        self.url = url
        self.s3_server = s3
        self.root = root
        with Session(engine, expire_on_commit=False) as session:
            self.factory = make_factory(session)
            robot_type = make_robot_type(session, ros_topics=REQUIRED)
            self.robot = make_robot(
                session, factory_id=self.factory.id, robot_type_id=robot_type.id
            )
            session.commit()
        overrides = {
            "s3_endpoint_url": s3.endpoint_url,
            "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key,
        }
        self.settings = load_settings(env="test", database_url=url, **overrides)
        self.s3 = create_s3_client(self.settings)
        self.bucket = self.settings.bucket_for_factory(str(self.factory.id))
        ensure_bucket(self.s3, self.bucket)
        self.resources: dict[str, Any] = {
            "database": KeystoneDatabase(
                database_url=url,
                s3_endpoint_url=s3.endpoint_url,
                s3_access_key=s3.access_key,
                s3_secret_key=s3.secret_key,
            ),
            "object_store": KeystoneObjectStore(
                endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key
            ),
        }

    def episode(self, fault: str | None = None, *, seed: int = 0) -> int:
        """A generated episode uploaded where a device puts it, registered ``pending_qa``."""
        with Session(self.engine, expire_on_commit=False) as session:
            task = make_task(session, factory_id=self.factory.id, robot_id=self.robot.id)
            session.commit()
        device = self.robot.device_id
        made = generate(
            EpisodeSpec(
                task_id=task.task_id,
                device_id=device,
                duration_s=3.0,
                faults=frozenset({fault}) if fault else frozenset(),
                seed=seed,
                started_at=dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC),
            ),
            self.root / task.task_id,
        )
        key = f"{self.factory.id}/{device}/{DAY.isoformat()}/{task.task_id}.mcap"
        self.s3.upload_file(str(made.mcap_path), self.bucket, key)
        self.s3.upload_file(str(made.sidecar_path), self.bucket, key[: -len(".mcap")] + ".json")
        with Session(self.engine) as session:
            row = Episode(
                episode_id=f"episode_{task.task_id}",
                task_id=task.id,
                factory_id=task.factory_id,
                order_id=task.order_id,
                batch_id=task.batch_id,
                robot_id=self.robot.id,
                device_id=device,
                recording_date=DAY,
                bucket=self.bucket,
                mcap_path=key,
                sidecar_path=key[: -len(".mcap")] + ".json",
                file_size_bytes=made.size,
                # A wrong-checksum upload: the device's checksum is the bytes' real one.
                checksum=made.sha256,
                verified_at=clock.now(),
            )
            session.add(row)
            session.commit()
            assert row.id is not None
            return row.id

    def statuses(self) -> Counter[str]:
        with Session(self.engine) as session:
            return Counter(str(s) for s in session.exec(select(Episode.status)).all())

    def approved_count(self) -> int:
        with Session(self.engine) as session:
            return int(session.exec(select(func.sum(Order.approved_count))).one() or 0)

    def drain(self, instance: DagsterInstance, *, max_ticks: int = 10) -> int:
        """Tick the sensor and execute its runs until nothing waits; runs executed."""
        runs = 0
        for _ in range(max_ticks):
            context = build_sensor_context(instance=instance, resources=self.resources)
            result = pending_qa_sensor(context)
            if not isinstance(result, SensorResult):
                return runs
            for request in result.run_requests or []:
                outcome = qa_batch.execute_in_process(
                    run_config=request.run_config,
                    instance=instance,
                    resources=self.resources,
                    tags=request.tags,
                )
                assert outcome.success
                runs += 1
        return runs


@pytest.fixture
def site(
    mariadb_engine: Engine, mariadb_migrated: str, s3_server: EmbeddedS3Server, tmp_path: Path
) -> Site:
    return Site(mariadb_engine, mariadb_migrated, s3_server, tmp_path)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as dagster_instance:
        yield dagster_instance


MIX = {
    None: 150,
    "time_gap": 10,
    "drop_topic": 10,
    "corrupt_jpeg": 10,
    "too_short": 10,
    "garbage": 10,
}


def test_a_backlog_of_200_is_batched_into_few_runs_with_the_right_verdicts(
    site: Site, instance: DagsterInstance
) -> None:
    for fault, count in MIX.items():
        for i in range(count):
            site.episode(fault, seed=i)
    assert site.statuses() == Counter({"pending_qa": 200})
    runs = site.drain(instance)
    assert runs <= 4  # batches of 100 (2 runs), never one run per episode
    assert site.statuses() == Counter(
        {"auto_approved": 150, "needs_inspection": 40, "qa_failed": 10}
    )
    assert site.approved_count() == 150
    with Session(site.engine) as session:
        # Every auto-approval queued its cloud sync in the same transaction; nothing else.
        synced_ids = set(session.exec(select(SyncJob.episode_id)).all())
        approved_ids = set(
            session.exec(
                select(Episode.id).where(Episode.status == EpisodeStatus.AUTO_APPROVED)
            ).all()
        )
        assert synced_ids == approved_ids
        failing = Counter(
            check["name"]
            for result in session.exec(select(QAResult)).all()
            for check in result.checks
            if check["passed"] is False
        )
        assert session.exec(select(func.count()).select_from(QAResult)).one() == 200
    assert failing["message_gaps"] == 10
    assert failing["required_topics"] == 10
    assert failing["image_decode"] == 10
    assert failing["duration"] == 10
    assert failing["structure"] == 10
    # The runs' materializations of the factory's day partition are in Dagster.
    key = MultiPartitionKey({"date": DAY.isoformat(), "factory": site.factory.slug})
    events = instance.fetch_materializations(episode_qa.key, limit=10).records
    assert events
    assert {e.partition_key for e in events} == {key}


def test_a_dead_runs_episodes_are_released_scored_once_and_its_late_result_dropped(
    site: Site, instance: DagsterInstance
) -> None:
    ids = [site.episode(seed=i) for i in range(3)]
    with Session(site.engine) as session:
        jobs = qa_service.claim(
            session, site.settings, owner="dead-run", limit=10, lease=dt.timedelta(seconds=-1)
        )
        session.commit()
    assert sorted(j.id for j in jobs) == sorted(ids)
    assert site.statuses() == Counter({"qa_running": 3})
    # A late result of the dead run, computed before anything else happened:
    late = assess(S3Source(site.s3, jobs[0].bucket, jobs[0].key), jobs[0].expectations)
    assert site.drain(instance) == 1  # the sensor released the leases and launched a run
    assert site.statuses() == Counter({"auto_approved": 3})
    with Session(site.engine) as session:
        assert not qa_service.record(session, jobs[0].id, late, owner="dead-run", sync_target=None)
        session.commit()
        assert session.exec(select(func.count()).select_from(QAResult)).one() == 3
    assert site.approved_count() == 3


def test_backfilling_a_partition_rescores_its_episodes(
    site: Site, instance: DagsterInstance
) -> None:
    clean = [site.episode(seed=i) for i in range(3)]
    gap = site.episode("time_gap")
    site.drain(instance)
    assert site.approved_count() == 3
    instance.add_dynamic_partitions("factories", [site.factory.slug])
    result = materialize(
        [episode_qa],
        partition_key=MultiPartitionKey({"date": DAY.isoformat(), "factory": site.factory.slug}),
        instance=instance,
        resources=site.resources,
    )
    assert result.success
    with Session(site.engine) as session:
        per_episode = Counter(session.exec(select(QAResult.episode_id)).all())
        assert per_episode == Counter(dict.fromkeys([*clean, gap], 2))
        requeues = session.exec(
            select(func.count()).where(col(AuditLog.action) == "episode.requeue")
        ).one()
        assert requeues == 4
    assert site.statuses() == Counter({"auto_approved": 3, "needs_inspection": 1})
    assert site.approved_count() == 3  # uncounted at the requeue, counted again once
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["message_gaps"].passed is False
    assert checks["structure"].passed is True


def test_a_missing_object_is_retried_then_fails_with_the_reason(
    site: Site, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYSTONE_QA_MAX_ATTEMPTS", "2")
    episode_id = site.episode()
    with Session(site.engine) as session:
        key = session.get(Episode, episode_id).mcap_path  # type: ignore[union-attr]
    site.s3.delete_object(Bucket=site.bucket, Key=key)
    site.drain(instance)
    with Session(site.engine) as session:
        row = session.get(Episode, episode_id)
        assert row is not None
        assert row.status == EpisodeStatus.PENDING_QA
        assert row.qa_attempts == 1
        assert row.qa_not_before is not None
        # Backing off: the sensor does not launch a run for it yet.
        assert qa_service.backlog(session) == 0
        row.qa_not_before = clock.now() - dt.timedelta(seconds=1)
        session.add(row)
        session.commit()
    site.drain(instance)
    with Session(site.engine) as session:
        row = session.get(Episode, episode_id)
        assert row is not None
        assert row.status == EpisodeStatus.QA_FAILED
        result = session.exec(select(QAResult).where(QAResult.episode_id == episode_id)).one()
        assert result.checks[0]["name"] == "object"
        assert "not readable" in result.checks[0]["reason"]


def test_qa_rerun_job_scores_chosen_episodes_with_the_thorough_tier(
    site: Site, instance: DagsterInstance
) -> None:
    first, second = site.episode(seed=1), site.episode(seed=2)
    site.drain(instance)
    outcome = qa_rerun.execute_in_process(
        run_config={"ops": {"rerun_episodes": {"config": {"episode_ids": [first]}}}},
        instance=instance,
        resources=site.resources,
    )
    assert outcome.success
    with Session(site.engine) as session:
        tiers = [
            (r.episode_id, str(r.tier))
            for r in session.exec(select(QAResult).order_by(col(QAResult.id))).all()
        ]
    assert sorted(tiers[:2]) == sorted([(first, "fast"), (second, "fast")])
    assert tiers[2:] == [(first, "thorough")]


@pytest.fixture
def api(site: Site, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = make_settings(
        tmp_path,
        database_url=site.url,
        s3_endpoint_url=site.s3_server.endpoint_url,
        s3_access_key=site.s3_server.access_key,
        s3_secret_key=site.s3_server.secret_key,
    )
    with TestClient(create_app(settings)) as client:
        token = client.post(
            "/api/v1/auth/login", json={"account": "admin", "password": "test-admin-password"}
        ).json()["access_token"]
        yield client, {"Authorization": f"Bearer {token}"}


def test_api_reads_checks_and_requeues_for_a_rerun(
    site: Site, instance: DagsterInstance, api: tuple[TestClient, dict[str, str]]
) -> None:
    client, admin = api
    episode_id = site.episode("time_gap")
    site.drain(instance)
    body = client.get(f"/api/v1/qa/episodes/{episode_id}/checks", headers=admin).json()
    assert body["status"] == "needs_inspection"
    latest = body["results"][0]
    gaps = next(c for c in latest["checks"] if c["name"] == "message_gaps")
    assert gaps["passed"] is False
    assert "silent" in gaps["reason"]
    assert gaps["threshold"]

    bad = client.post(f"/api/v1/qa/episodes/{episode_id}/run", json={"tier": "x"}, headers=admin)
    assert bad.status_code == 422
    missing = client.post("/api/v1/qa/episodes/999999/run", json={}, headers=admin)
    assert missing.status_code == 404
    accepted = client.post(f"/api/v1/qa/episodes/{episode_id}/run", json={}, headers=admin)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {
        "episode_id": str(episode_id),
        "status": "pending_qa",
        "tier": "thorough",
    }
    with Session(site.engine) as session:
        jobs = qa_service.claim(
            session, site.settings, owner="someone", limit=1, lease=dt.timedelta(minutes=5)
        )
        session.commit()
    assert jobs[0].tier == "thorough"
    busy = client.post(f"/api/v1/qa/episodes/{episode_id}/run", json={}, headers=admin)
    assert busy.status_code == 409
    assert busy.json()["code"] == "qa_running"
