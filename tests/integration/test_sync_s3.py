"""Cloud sync to an S3 target on MariaDB + SeaweedFS (edge bucket → target bucket): the
approval outbox, Dagster's sensor/runs/asset/resync, checksums at the target, resumable
multipart, backoff and the attempt budget, lease recovery, concurrent claimers, the
source-changed and source-gone failures, and the ops API with its bad-input paths."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import MultiPartitionKey, SensorResult, build_sensor_context, materialize
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import (
    AuditLog,
    Episode,
    EpisodeStatus,
    OutboxEvent,
    Role,
    SyncJob,
    SyncStatus,
    User,
    UserFactory,
)
from keystone_core.security import hash_password, issue_access_token
from keystone_core.services import sync as sync_service
from keystone_core.services.production import record_approval
from keystone_core.states import transition_episode
from keystone_core.storage.embedded import EmbeddedS3Server, free_tcp_ports
from keystone_pipelines.defs.qa import factories_partitions
from keystone_pipelines.defs.sync import (
    cloud_sync,
    due_sync_sensor,
    resync,
    sync_batch,
    sync_safety_schedule,
)
from tests.conftest import make_settings
from tests.factories import make_episode, make_factory
from tests.support.sync import DAY, SyncSite

pytestmark = pytest.mark.integration


@pytest.fixture
def site(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> SyncSite:
    # One target bucket for the session (every bucket costs the store volumes); each test
    # writes under its own prefix.
    prefix = f"t{uuid.uuid4().hex[:12]}/"
    return SyncSite(
        mariadb_engine,
        mariadb_migrated,
        s3_server,
        monkeypatch,
        {
            "KEYSTONE_SYNC_TARGET": "s3",
            "KEYSTONE_SYNC_S3_BUCKET": "cloud-copy",
            "KEYSTONE_SYNC_S3_PREFIX": prefix,
        },
    )


def _target_objects(site: SyncSite) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if site.settings.sync_s3_bucket not in {
        b["Name"] for b in site.s3.list_buckets().get("Buckets", [])
    }:
        return found
    for page in site.s3.get_paginator("list_objects_v2").paginate(
        Bucket=site.settings.sync_s3_bucket, Prefix=site.settings.sync_s3_prefix
    ):
        for item in page.get("Contents", []):
            head = site.s3.head_object(Bucket=site.settings.sync_s3_bucket, Key=item["Key"])
            found[item["Key"]] = {"size": item["Size"], "meta": head.get("Metadata", {})}
    return found


def test_approval_queues_a_job_in_the_same_transaction_and_not_when_sync_is_off(
    site: SyncSite,
) -> None:
    ids = site.approved(3)
    jobs = site.jobs()
    assert sorted(j.episode_id for j in jobs) == sorted(ids)
    assert {j.status for j in jobs} == {SyncStatus.QUEUED}
    # A rolled-back approval leaves neither the approval nor a job behind.
    with Session(site.engine) as session:
        episode = make_episode(
            session, factory_id=site.factory.id, status=EpisodeStatus.NEEDS_INSPECTION
        )
        session.commit()
        episode_pk = episode.id
        assert episode_pk is not None
        transition_episode(session, episode_pk, EpisodeStatus.INSPECTOR_APPROVED)
        record_approval(session, episode_pk, sync_target=sync_service.target_of(site.settings))
        session.rollback()
    assert len(site.jobs()) == 3
    # Sync off: approvals queue nothing.
    with Session(site.engine) as session:
        transition_episode(session, episode_pk, EpisodeStatus.INSPECTOR_APPROVED)
        record_approval(session, episode_pk, sync_target=None)
        session.commit()
    assert len(site.jobs()) == 3


def test_sensor_runs_push_every_approved_episode_once_with_checksums_at_the_target(
    site: SyncSite,
) -> None:
    ids = site.approved(12, large=2)
    instance = site.instance()
    context = build_sensor_context(instance=instance, resources=site.resources)
    result = due_sync_sensor(context)
    assert isinstance(result, SensorResult)
    requests = result.run_requests or []
    assert len(requests) == 1  # 12 due jobs fit one batch of KEYSTONE_SYNC_BATCH_MAX=50
    run = sync_batch.execute_in_process(
        run_config=requests[0].run_config,
        instance=instance,
        resources=site.resources,
        tags=requests[0].tags,
    )
    assert run.success
    assert site.statuses() == {"synced": 12}
    objects = _target_objects(site)
    assert len(objects) == 12 * 2  # MCAP + sidecar (these episodes have no QA report)
    with Session(site.engine) as session:
        episodes = {e.episode_id: e for e in session.exec(select(Episode)).all()}
    for public, data in site.content.items():
        episode = episodes[public]
        folder = f"{site.factory.slug}/{episode.device_id}/{DAY}/{public}/"
        key = site.settings.sync_s3_prefix + folder + "episode.mcap"
        assert objects[key]["size"] == len(data)
        assert objects[key]["meta"]["checksum-sha256"] == hashlib.sha256(data).hexdigest()
        body = site.s3.get_object(Bucket=site.settings.sync_s3_bucket, Key=key)["Body"].read()
        assert body == data
    jobs = site.jobs()
    assert all(j.synced_at is not None and j.attempt_count == 1 for j in jobs)
    assert sum(j.bytes_transferred for j in jobs) >= sum(len(d) for d in site.content.values())
    assert Counter(e.event_type for e in _outbox(site)) == {
        "episode.approved": 12,
        "episode.synced": 12,
    }
    outputs = [e for e in run.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = outputs[0].step_output_data.metadata
    assert metadata["synced"].value == 12
    assert "episode.mcap" not in str(metadata["episodes"].value)  # one row per episode
    # Nothing due any more: the sensor skips; a resync of one pushes nothing new.
    assert not isinstance(due_sync_sensor(context), SensorResult)
    again = resync.execute_in_process(
        run_config={"ops": {"resync_episodes": {"config": {"episode_ids": ids[:1]}}}},
        instance=instance,
        resources=site.resources,
    )
    assert again.success
    job = site.jobs()[0]
    assert job.status == SyncStatus.SYNCED
    assert site.attempts()[-1].outcome == "duplicate"
    assert site.attempts()[-1].bytes_transferred == 0


def _outbox(site: SyncSite) -> list[OutboxEvent]:
    with Session(site.engine) as session:
        return list(session.exec(select(OutboxEvent)).all())


def test_cloud_sync_partition_backfill_queues_missing_and_failed_and_pushes_them(
    site: SyncSite,
) -> None:
    ids = site.approved(4)
    with Session(site.engine) as session:  # one job lost, one failed earlier
        job = session.exec(select(SyncJob).where(col(SyncJob.episode_id) == ids[0])).one()
        session.delete(job)
        failed = session.exec(select(SyncJob).where(col(SyncJob.episode_id) == ids[1])).one()
        failed.status = SyncStatus.FAILED
        session.add(failed)
        session.commit()
    instance = site.instance()
    instance.add_dynamic_partitions(factories_partitions.name, [site.factory.slug])
    result = materialize(
        [cloud_sync],
        instance=instance,
        resources=site.resources,
        partition_key=MultiPartitionKey({"date": DAY.isoformat(), "factory": site.factory.slug}),
        selection=[cloud_sync],
    )
    assert result.success
    assert site.statuses() == {"synced": 4}
    materialization = result.asset_materializations_for_node("cloud_sync")[-1]
    assert materialization.metadata["queued"].value == 1
    assert materialization.metadata["requeued"].value == 1
    assert materialization.metadata["synced"].value == 4


def test_failed_pushes_back_off_then_fail_after_the_attempt_budget_with_an_alert(
    site: SyncSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    (dead_port,) = free_tcp_ports(1)
    monkeypatch.setenv("KEYSTONE_SYNC_S3_ENDPOINT_URL", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setenv("KEYSTONE_SYNC_MAX_ATTEMPTS", "3")
    from keystone_core.settings import load_settings

    site.settings = load_settings(env="test")
    site.approved(1)
    waits = []
    for n in range(3):
        outcome = site.push_once(owner=f"run-{n}")
        assert outcome.claimed == 1
        job = site.jobs()[0]
        if n < 2:
            assert job.status == SyncStatus.RETRY_WAIT
            assert job.next_attempt_at is not None
            waits.append((clock.as_utc(job.next_attempt_at) - clock.now()).total_seconds())
            with clock.frozen(clock.as_utc(job.next_attempt_at) + dt.timedelta(seconds=1)):
                assert sync_service.due_count(Session(site.engine)) == 1
            _wait_until(job.next_attempt_at)
    assert all(w <= 30 for w in waits)
    job = site.jobs()[0]
    assert job.status == SyncStatus.FAILED
    assert job.attempt_count == 3
    assert "unreachable" in job.last_error
    attempts = site.attempts()
    assert [a.outcome for a in attempts] == ["retry", "retry", "failed"]
    alerts = [e for e in _outbox(site) if e.event_type == "alert.raised"]
    assert len(alerts) == 1
    assert alerts[0].payload["alert"] == "sync_failed"
    with Session(site.engine) as session:
        audit = session.exec(select(AuditLog).where(AuditLog.action == "sync.failed")).all()
    assert len(audit) == 1


def _wait_until(moment: dt.datetime | None) -> None:
    import time

    if moment is not None:
        time.sleep(max(0.0, (clock.as_utc(moment) - clock.now()).total_seconds()) + 0.01)


def test_backoff_doubles_with_jitter_and_is_capped_at_30_seconds() -> None:
    import random

    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(30.0, 2.0 * 2 ** (attempt - 1))
        values = [sync_service.backoff_seconds(attempt, 2.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= v <= ceiling for v in values)
        assert len({round(v, 6) for v in values}) > 1  # jittered
    assert sync_service.backoff_seconds(40, 2.0) <= 30.0


def test_source_changed_or_gone_fails_at_once_without_a_copy(site: SyncSite) -> None:
    changed, gone = site.approved(2)
    with Session(site.engine) as session:
        a = session.get(Episode, changed)
        b = session.get(Episode, gone)
        assert a is not None
        assert b is not None
        site.s3.put_object(
            Bucket=site.bucket, Key=a.mcap_path, Body=b"x" * (a.file_size_bytes or 0)
        )
        site.s3.delete_object(Bucket=site.bucket, Key=b.mcap_path)
    outcome = site.push_once()
    assert outcome.failed == 2
    errors = {j.episode_id: j.last_error for j in site.jobs()}
    assert "changed after it was verified" in errors[changed]
    assert "gone" in errors[gone]
    assert all(j.attempt_count == 1 for j in site.jobs())
    assert _target_objects(site) == {}


def test_an_expired_lease_is_recovered_and_the_job_pushed_by_the_next_run(site: SyncSite) -> None:
    site.approved(2)
    with Session(site.engine) as session:
        works = sync_service.claim(session, site.settings, owner="dead-run", limit=10)
        session.commit()
    assert len(works) == 2
    assert sync_service.due_count(Session(site.engine)) == 0
    later = clock.now() + dt.timedelta(minutes=site.settings.sync_lease_minutes + 1)
    with clock.frozen(later), Session(site.engine) as session:
        assert sync_service.recover_expired(session, site.settings) == 2
        session.commit()
    assert site.statuses() == {"retry_wait": 2}
    assert [a.outcome for a in site.attempts()] == ["lease_expired", "lease_expired"]
    # The dead run's late result is refused: it no longer holds the lease.
    with Session(site.engine) as session:
        from keystone_core.sync.targets import Receipt

        receipt = Receipt(clock.now(), "s3://x/", 1, duplicate=False)
        assert not sync_service.record_synced(session, works[0], receipt, owner="dead-run")
    with clock.frozen(later):
        site.push_once(owner="next-run")
    assert site.statuses() == {"synced": 2}
    assert all(j.attempt_count == 2 for j in site.jobs())


def test_two_claimers_on_mariadb_never_share_a_job(site: SyncSite) -> None:
    site.approved(30)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(2)

    def claim(owner: str) -> None:
        with Session(site.engine) as session:
            barrier.wait()
            works = sync_service.claim(session, site.settings, owner=owner, limit=20)
            session.commit()
        claimed[owner] = [w.job_id for w in works]

    threads = [threading.Thread(target=claim, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not set(claimed["a"]) & set(claimed["b"])
    # InnoDB locks every row the claim query examines (it sorts them), so a claimer racing
    # another may find all rows locked and take nothing; nothing is lost: what neither took
    # is still there for the next claim.
    with Session(site.engine) as session:
        rest = sync_service.claim(session, site.settings, owner="c", limit=30)
        session.commit()
    taken = claimed["a"] + claimed["b"] + [w.job_id for w in rest]
    assert sorted(taken) == sorted(set(taken))
    assert len(taken) == 30


def test_safety_schedule_launches_a_run_only_when_jobs_are_due(site: SyncSite) -> None:
    from dagster import RunRequest, build_schedule_context, instance_for_test

    with (
        instance_for_test() as instance,
        build_schedule_context(instance=instance, resources=site.resources) as context,
    ):
        assert not isinstance(sync_safety_schedule(context), RunRequest)
        site.approved(1)
        assert isinstance(sync_safety_schedule(context), RunRequest)


# --- ops API --------------------------------------------------------------------------------


class Ops:
    def __init__(self, site: SyncSite, tmp_path: Path) -> None:
        self.settings = make_settings(
            tmp_path,
            database_url=site.url,
            s3_endpoint_url=site.s3_server.endpoint_url,
            s3_access_key=site.s3_server.access_key,
            s3_secret_key=site.s3_server.secret_key,
            sync_target="s3",
            sync_s3_bucket=site.settings.sync_s3_bucket,
        )
        self.headers: dict[str, dict[str, str]] = {}
        with Session(site.engine, expire_on_commit=False) as session:
            self.other = make_factory(session)
            for role in (Role.PRODUCTION_MANAGER, Role.DATA_INSPECTOR, Role.DATA_COLLECTOR):
                user = User(
                    account=f"sync-{role.value}",
                    password_hash=hash_password("pw-12345678"),
                    role=role,
                )
                session.add(user)
                session.flush()
                assert user.id is not None
                session.add(UserFactory(user_id=user.id, factory_id=site.factory.id))  # type: ignore[arg-type]
                token, _ = issue_access_token(
                    self.settings,
                    subject=str(user.id),
                    role=role,
                    factory_ids=[site.factory.id],  # type: ignore[list-item]
                )
                self.headers[role.value] = {"Authorization": f"Bearer {token}"}
            session.commit()


@pytest.fixture
def ops(site: SyncSite, tmp_path: Path) -> Ops:
    return Ops(site, tmp_path)


@pytest.fixture
def client(ops: Ops) -> Iterator[TestClient]:
    with TestClient(create_app(ops.settings)) as c:
        yield c


def test_ops_api_status_logs_summary_config_resync_and_enqueue(
    site: SyncSite, ops: Ops, client: TestClient
) -> None:
    pm = ops.headers["production_manager"]
    inspector = ops.headers["data_inspector"]
    ids = site.approved(3)
    # Before any push: queued, no log, counts.
    status = client.get(f"/api/v1/sync/episodes/{ids[0]}/status", headers=inspector)
    assert status.status_code == 200, status.text
    body = status.json()
    assert body["cloud_synced"] is False
    assert body["jobs"][0]["status"] == "queued"
    assert body["jobs"][0]["episode_id"] == str(ids[0])
    summary = client.get("/api/v1/sync/episodes/summary", headers=inspector).json()
    assert summary["total"] == 3
    assert summary["counts"]["queued"] == 3
    # Resync while queued → 409 sync_pending.
    pending = client.post(f"/api/v1/sync/episodes/{ids[0]}/resync", headers=pm)
    assert pending.status_code == 409
    assert pending.json()["code"] == "sync_pending"
    site.push_once()
    status = client.get(f"/api/v1/sync/episodes/{ids[0]}/status", headers=inspector).json()
    assert status["cloud_synced"] is True
    assert status["jobs"][0]["destination_path"].startswith(f"s3://{site.settings.sync_s3_bucket}/")
    logs = client.get(f"/api/v1/sync/episodes/{ids[0]}/logs", headers=inspector).json()
    assert logs["total"] == 1
    assert logs["items"][0]["status"] == "synced"
    assert logs["items"][0]["bytes_transferred"] > 0
    summary = client.get(
        "/api/v1/sync/episodes/summary", params={"status": "synced"}, headers=inspector
    ).json()
    assert summary["total"] == 3
    # Resync of a synced episode: queued again, audited.
    again = client.post(
        f"/api/v1/sync/episodes/{ids[0]}/resync", json={"reason": "cloud lost it"}, headers=pm
    )
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "queued"
    assert again.json()["attempt_count"] == 0
    with Session(site.engine) as session:
        audit = session.exec(select(AuditLog).where(AuditLog.action == "sync.requeue")).all()
    assert len(audit) == 1
    assert audit[0].after is not None
    assert audit[0].after["reason"] == "cloud lost it"
    # Enqueue by filter: synced ones only with include_synced.
    plain = client.post(
        "/api/v1/sync/episodes", json={"factory_id": site.factory.id}, headers=pm
    ).json()
    assert plain["matched"] == 3
    assert plain["queued"] + plain["requeued"] == 0
    assert plain["skipped"] == 3
    both = client.post(
        "/api/v1/sync/episodes",
        json={"episode_ids": ids[1:], "include_synced": True, "reason": "re-export"},
        headers=pm,
    ).json()
    assert both["requeued"] == 2
    config = client.get("/api/v1/sync/config", headers=inspector).json()
    assert config["target"] == "s3"
    assert config["destination"]["bucket"] == site.settings.sync_s3_bucket
    assert config["backoff_cap_s"] == 30.0
    assert "secret" not in str(config).lower()


def test_ops_api_bad_input_and_scope(site: SyncSite, ops: Ops, client: TestClient) -> None:
    pm = ops.headers["production_manager"]
    (approved,) = site.approved(1)
    with Session(site.engine, expire_on_commit=False) as session:
        waiting = make_episode(
            session, factory_id=site.factory.id, status=EpisodeStatus.NEEDS_INSPECTION
        )
        foreign = make_episode(session, factory_id=ops.other.id, status=EpisodeStatus.AUTO_APPROVED)
        session.commit()
    not_approved = client.post(f"/api/v1/sync/episodes/{waiting.id}/resync", headers=pm)
    assert not_approved.status_code == 409
    assert not_approved.json()["code"] == "not_approved"
    assert not_approved.json()["detail"]["current_status"] == "needs_inspection"
    for path in (f"{foreign.id}/resync", f"{foreign.id}/status", f"{foreign.id}/logs"):
        method = client.post if path.endswith("resync") else client.get
        assert method(f"/api/v1/sync/episodes/{path}", headers=pm).status_code == 404
    assert (
        client.post(
            "/api/v1/sync/episodes", json={"factory_id": ops.other.id}, headers=pm
        ).status_code
        == 404
    )
    for bad in (
        {},  # unbounded
        {"factory_id": site.factory.id, "date_from": "2026-11-21", "date_to": "2026-11-20"},
        {"factory_id": site.factory.id, "surprise": 1},
        {"episode_ids": [0]},
        {"episode_ids": ["x"]},
        {"factory_id": site.factory.id, "limit": 0},
    ):
        answer = client.post("/api/v1/sync/episodes", json=bad, headers=pm)
        assert answer.status_code == 422, (bad, answer.text)
    assert client.get("/api/v1/sync/episodes/summary?status=nope", headers=pm).status_code == 422
    assert client.get("/api/v1/sync/episodes/summary?offset=-1", headers=pm).status_code == 422
    # Roles: inspectors read, only admins/managers queue; collectors see nothing.
    inspector = ops.headers["data_inspector"]
    collector = ops.headers["data_collector"]
    assert (
        client.post(f"/api/v1/sync/episodes/{approved}/resync", headers=inspector).status_code
        == 403
    )
    assert client.get("/api/v1/sync/config", headers=collector).status_code == 403
    assert client.get("/api/v1/sync/config").status_code == 401


# --- edge retention -------------------------------------------------------------------------


def _edge_keys(site: SyncSite) -> set[str]:
    keys: set[str] = set()
    for page in site.s3.get_paginator("list_objects_v2").paginate(Bucket=site.bucket):
        keys |= {item["Key"] for item in page.get("Contents", [])}
    return keys


def test_edge_retention_is_off_by_default_dry_runs_and_never_expires_before_a_verified_sync(
    site: SyncSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keystone_core.errors import ConflictError
    from keystone_core.services import retention
    from keystone_core.services.audit import Actor
    from keystone_core.settings import load_settings
    from keystone_pipelines.defs.sync import edge_retention

    synced, waiting, failed = site.approved(3)
    site.push_once()
    with Session(site.engine) as session:  # one still waiting, one failed
        for episode_pk, status in ((waiting, SyncStatus.QUEUED), (failed, SyncStatus.FAILED)):
            job = session.exec(select(SyncJob).where(col(SyncJob.episode_id) == episode_pk)).one()
            job.status = status
            job.synced_at = None
            session.add(job)
        session.commit()
    before = _edge_keys(site)
    actor = Actor.system("test")
    # Off (default): a dry run reports nothing; applying is refused.
    assert site.settings.edge_retention_days is None
    report = retention.expire(site.session_scope, site.s3, site.settings, dry_run=True, actor=actor)
    assert report.candidates == []
    with pytest.raises(ConflictError):
        retention.expire(site.session_scope, site.s3, site.settings, dry_run=False, actor=actor)
    # On, 7 days: nothing is old enough yet.
    monkeypatch.setenv("KEYSTONE_EDGE_RETENTION_DAYS", "7")
    settings = load_settings(env="test")
    report = retention.expire(site.session_scope, site.s3, settings, dry_run=True, actor=actor)
    assert report.candidates == []
    # Eight days later: only the verified sync qualifies. Dry run first: nothing deleted.
    with clock.frozen(clock.now() + dt.timedelta(days=8)):
        report = retention.expire(site.session_scope, site.s3, settings, dry_run=True, actor=actor)
        assert [c.episode_pk for c in report.candidates] == [synced]
        assert report.candidate_bytes > 0
        assert _edge_keys(site) == before
        run = edge_retention.execute_in_process(
            run_config={"ops": {"expire_edge_objects": {"config": {"dry_run": False}}}},
            instance=site.instance(),
            resources=site.resources,
        )
        assert run.success
    with Session(site.engine) as session:
        expired = session.get(Episode, synced)
        assert expired is not None
        assert expired.edge_expired_at is not None
        gone = {expired.mcap_path, expired.sidecar_path}
        audit = session.exec(
            select(AuditLog).where(AuditLog.action == "episode.edge_expired")
        ).all()
    assert _edge_keys(site) == before - gone
    assert len(audit) == 1
    # Nothing is expired twice.
    with clock.frozen(clock.now() + dt.timedelta(days=8)):
        assert (
            retention.expire(
                site.session_scope, site.s3, settings, dry_run=True, actor=actor
            ).candidates
            == []
        )


def test_an_inspectors_approval_through_the_api_queues_the_sync_a_rejection_does_not(
    site: SyncSite, ops: Ops, client: TestClient
) -> None:
    inspector = ops.headers["data_inspector"]
    with Session(site.engine, expire_on_commit=False) as session:
        good, bad = (
            make_episode(session, factory_id=site.factory.id, status=EpisodeStatus.NEEDS_INSPECTION)
            for _ in range(2)
        )
        session.commit()
    approved = client.post(f"/api/v1/inspections/{good.id}/approve", json={}, headers=inspector)
    assert approved.status_code == 200, approved.text
    rejected = client.post(
        f"/api/v1/inspections/{bad.id}/reject", json={"reason": "blurry"}, headers=inspector
    )
    assert rejected.status_code == 200, rejected.text
    jobs = site.jobs()
    assert [(j.episode_id, j.status, j.target) for j in jobs] == [
        (good.id, SyncStatus.QUEUED, "s3")
    ]
