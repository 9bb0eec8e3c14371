"""Sync to the reference cloud receiver under faults: 100 approved episodes (two of them
multipart) end up synced exactly once — the receiver completes each once, Keystone marks
each synced with the receiver's ``synced_at`` — when the cloud is down for the first
attempts, answers 500 or times out mid-multipart, says 409 for an episode we think
unsynced, when the Dagster run process is killed mid-upload, when two runs race for the
same batch, and when the database connection drops between an upload and its status
write. MariaDB + SeaweedFS + a live receiver; faults come from HTTP fault proxies in front
of the receiver's API and of the S3 server its presigned URLs point at."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import Episode, SyncJob, SyncStatus
from keystone_core.services import sync as sync_service
from keystone_core.storage.embedded import EmbeddedS3Server
from keystone_core.sync.targets import HttpTarget, build_target
from keystone_pipelines.defs import sync as sync_defs
from tests.conftest import mariadb_url, recreate_mariadb_database, unavailable
from tests.support.faultproxy import FaultProxy
from tests.support.receiver import (
    LiveReceiver,
    receiver_settings,
    running_receiver,
)
from tests.support.sync import MIB, SyncSite

pytestmark = pytest.mark.integration

# Its own database: the receiver's own tests use keystone_receiver_test.
RECEIVER_DATABASE = os.environ.get("KEYSTONE_TEST_DATABASE", "keystone_test") + "_cloud"
EPISODES = 100
LARGE = 2  # 12 MiB each: three 5 MiB parts at the receiver


@dataclass
class Cloud:
    receiver: LiveReceiver
    api: FaultProxy  # in front of the receiver's API
    store: FaultProxy  # in front of the S3 server the presigned URLs point at


@pytest.fixture
def cloud(s3_server: EmbeddedS3Server, tmp_path: Path) -> Iterator[Cloud]:
    try:
        recreate_mariadb_database(RECEIVER_DATABASE)
        database = mariadb_url(RECEIVER_DATABASE)
    except Exception as exc:  # MariaDB down is "unavailable" (fails in CI)
        unavailable(f"MariaDB for the receiver: {exc}")
        raise
    with FaultProxy(s3_server.endpoint_url) as store:
        settings = receiver_settings(
            s3_server,
            database,
            bucket="cloud-faults",  # one for the session: buckets cost the store volumes
            public_s3_endpoint_url=store.url,
            multipart_threshold=5 * MIB,
            part_size=5 * MIB,
        )
        with running_receiver(settings) as receiver, FaultProxy(receiver.base_url) as api:
            yield Cloud(receiver, api, store)


@pytest.fixture
def site(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    monkeypatch: pytest.MonkeyPatch,
    cloud: Cloud,
) -> SyncSite:
    return SyncSite(
        mariadb_engine,
        mariadb_migrated,
        s3_server,
        monkeypatch,
        {
            "KEYSTONE_SYNC_TARGET": "http",
            "KEYSTONE_SYNC_HTTP_URL": cloud.api.url,
            "KEYSTONE_SYNC_HTTP_TOKEN": cloud.receiver.token or "",
            "KEYSTONE_SYNC_HTTP_TIMEOUT_S": "3",
            "KEYSTONE_SYNC_MAX_ATTEMPTS": "10",
            "KEYSTONE_SYNC_BATCH_MAX": "200",
            "KEYSTONE_SYNC_WORKERS": "6",
        },
    )


def assert_exactly_once(site: SyncSite, cloud: Cloud, count: int = EPISODES) -> None:
    """Every job synced, every episode completed once at the receiver, same synced_at."""
    jobs = site.jobs()
    assert len(jobs) == count
    assert {j.status for j in jobs} == {SyncStatus.SYNCED}, site.statuses()
    with Session(site.engine) as session:
        public = dict(session.exec(select(Episode.id, Episode.episode_id)).all())
    for job in jobs:
        state = cloud.receiver.state(public[job.episode_id])
        assert state is not None, public[job.episode_id]
        assert state.status == "complete"
        assert state.complete_count == 1
        assert job.synced_at is not None
        assert state.synced_at is not None
        assert clock.as_utc(job.synced_at) == clock.as_utc(state.synced_at)
        assert {o.name for o in state.objects} == {"episode.mcap", "episode.json"}


def large_part_puts(cloud: Cloud, site: SyncSite, part: int) -> dict[str, int]:
    """PUTs of part ``part`` of each large MCAP that reached the store proxy."""
    with Session(site.engine) as session:
        large = session.exec(
            select(Episode.episode_id).where(col(Episode.file_size_bytes) > 10 * MIB)
        ).all()
    return {
        e: cloud.store.requests("PUT", rf"/{e}/episode\.mcap\?.*partNumber={part}(&|$)")
        for e in large
    }


def test_cloud_down_for_the_first_attempts(site: SyncSite, cloud: Cloud) -> None:
    site.approved(EPISODES, large=LARGE)
    cloud.api.down()
    for n in range(3):
        outcome = site.push_once(owner=f"down-{n}")
        assert outcome.retry == EPISODES
        time.sleep(0.05)  # the backoff (base 10 ms) passes
        _let_backoff_pass(site)
    assert {j.attempt_count for j in site.jobs()} == {3}
    assert all("unreachable" in j.last_error for j in site.jobs())
    cloud.api.up()
    site.push_until_done()
    assert_exactly_once(site, cloud)
    assert {j.attempt_count for j in site.jobs()} == {4}


def _let_backoff_pass(site: SyncSite) -> None:
    soonest = site.soonest_retry()
    while soonest is not None and sync_service.due_count(Session(site.engine)) < len(site.jobs()):
        time.sleep(0.05)
        if clock.now() - soonest > dt.timedelta(seconds=60):
            break


def test_500_timeout_and_reset_mid_multipart_resume_without_resending_parts(
    site: SyncSite, cloud: Cloud
) -> None:
    site.approved(EPISODES, large=LARGE)
    cloud.store.fail("PUT", r"partNumber=2(&|$)", status=500, times=1)
    cloud.store.hang("PUT", r"partNumber=3(&|$)", seconds=6, times=1)
    cloud.store.reset("PUT", r"partNumber=2(&|$)", times=1)
    passes = site.push_until_done()
    assert passes >= 2
    assert_exactly_once(site, cloud)
    # Part 1 of each large MCAP went up once: retries resumed the receiver's session.
    assert set(large_part_puts(cloud, site, 1).values()) == {1}
    retried = [a for a in site.attempts() if a.outcome == "retry"]
    assert retried
    assert any("500" in a.error for a in retried)


def test_409_for_episodes_we_think_unsynced(site: SyncSite, cloud: Cloud) -> None:
    ids = site.approved(EPISODES, large=LARGE)
    # The cloud already holds ten of them (an earlier Keystone, a lost answer, …).
    with Session(site.engine) as session:
        works = sync_service.claim(
            session, site.settings, owner="elsewhere", limit=10, job_ids=_jobs_of(site, ids[:10])
        )
        session.rollback()  # only the shipments are wanted; the jobs stay queued
    target = build_target(site.settings)
    assert isinstance(target, HttpTarget)
    for work in works:
        target.push(sync_service.shipment(work, site.s3), site.s3, {}, lambda _p: None)
    target.close()
    before = {w.episode_id: cloud.receiver.state(w.episode_id) for w in works}
    site.push_until_done()
    assert_exactly_once(site, cloud)
    by_episode = {j.episode_id: j for j in site.jobs()}
    for episode_pk in ids[:10]:
        job = by_episode[episode_pk]
        assert job.bytes_transferred == 0
    for public, state in before.items():
        assert state is not None
        after = cloud.receiver.state(public)
        assert after is not None
        assert after.synced_at == state.synced_at
    duplicates = [a for a in site.attempts() if a.outcome == "duplicate"]
    assert len(duplicates) == 10


def _jobs_of(site: SyncSite, episode_ids: list[int]) -> list[int]:
    return [j.id for j in site.jobs() if j.episode_id in episode_ids and j.id is not None]


KILLED_RUN = """
import sys
from dagster import DagsterInstance
from keystone_pipelines.defs.sync import sync_batch
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore
sync_batch.execute_in_process(
    instance=DagsterInstance.ephemeral(),
    resources={"database": KeystoneDatabase(), "object_store": KeystoneObjectStore()},
)
"""


def test_run_process_killed_mid_upload(site: SyncSite, cloud: Cloud) -> None:
    site.approved(EPISODES, large=LARGE)
    # Part 2 of the first large MCAP never answers: the run sits mid-multipart.
    cloud.store.hang("PUT", r"partNumber=2(&|$)", seconds=120, times=1)
    env = site.subprocess_env() | {"KEYSTONE_SYNC_HTTP_TIMEOUT_S": "300"}
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while cloud.store.requests("PUT", r"partNumber=2(&|$)") < 1:
            assert run.poll() is None, "the run ended before reaching the hung part"
            assert time.monotonic() < deadline, "the run never reached part 2"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    cloud.store.clear()
    statuses = site.statuses()
    assert statuses["in_progress"] >= 1  # held by the dead run
    # Nothing happens until the lease expires; then the next run finishes the job.
    assert site.push_once(owner="too-early").claimed == 0
    later = clock.now() + dt.timedelta(minutes=site.settings.sync_lease_minutes + 1)
    with clock.frozen(later):
        with Session(site.engine) as session:
            assert sync_service.recover_expired(session, site.settings) >= 1
            session.commit()
        for n in range(5):
            site.push_once(owner=f"after-kill-{n}")
    assert_exactly_once(site, cloud)
    assert set(large_part_puts(cloud, site, 1).values()) == {1}
    assert "lease_expired" in {a.outcome for a in site.attempts()}


def test_two_runs_race_for_the_same_batch(site: SyncSite, cloud: Cloud) -> None:
    site.approved(EPISODES, large=LARGE)
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def run() -> None:
        instance = site.instance()  # one each: two runs, like two run workers
        barrier.wait()
        results.append(
            sync_defs.sync_batch.execute_in_process(instance=instance, resources=site.resources)
        )

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.success for r in results)
    assert_exactly_once(site, cloud)
    # Each job was pushed by one run, once.
    attempts = site.attempts()
    assert len(attempts) == EPISODES
    assert len({a.run_id for a in attempts}) in (1, 2)  # the second may find nothing left


def test_db_connection_dropped_between_upload_and_status_write(
    site: SyncSite, cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.approved(EPISODES, large=LARGE)
    dropped: list[str] = []
    real_build = sync_defs.build_target

    class DropAfterUpload:
        """The real target; the first completed push loses its database connection."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.kind = inner.kind

        def describe(self) -> dict[str, Any]:
            return dict(self.inner.describe())

        def close(self) -> None:
            self.inner.close()

        def push(self, shipment: Any, *args: Any) -> Any:
            receipt = self.inner.push(shipment, *args)
            if not dropped:
                dropped.append(shipment.episode_id)
                raise OperationalError("UPDATE sync_jobs …", {}, ConnectionError("server gone"))
            return receipt

    monkeypatch.setattr(sync_defs, "build_target", lambda s: DropAfterUpload(real_build(s)))
    result = sync_defs.sync_batch.execute_in_process(
        instance=site.instance(), resources=site.resources
    )
    assert result.success  # the op's RetryPolicy ran it again in the same run
    assert dropped
    assert_exactly_once(site, cloud)
    with Session(site.engine) as session:
        episode_pk = session.exec(select(Episode.id).where(Episode.episode_id == dropped[0])).one()
        job = session.exec(select(SyncJob).where(col(SyncJob.episode_id) == episode_pk)).one()
    outcomes = [a.outcome for a in site.attempts() if a.sync_job_id == job.id]
    assert outcomes == ["interrupted", "duplicate"]
    assert job.attempt_count == 2


def test_a_retry_due_within_30_s_is_retried_inside_the_same_run(
    site: SyncSite, cloud: Cloud
) -> None:
    site.approved(10)
    cloud.api.fail("POST", r"/api/v1/sync/episode$", status=503, times=10)
    result = sync_defs.sync_batch.execute_in_process(
        instance=site.instance(), resources=site.resources
    )
    assert result.success
    retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retried) == 1  # RetryRequested: the backoff (10 ms base) was due at once
    assert_exactly_once(site, cloud, count=10)
    runs = {a.run_id for a in site.attempts()}
    assert runs == {result.run_id}
    assert sorted(a.outcome for a in site.attempts()) == ["retry"] * 10 + ["synced"] * 10
