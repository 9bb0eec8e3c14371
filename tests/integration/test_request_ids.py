"""A request that queues work names the Dagster run that does it: ``X-Request-ID`` →
``sync_jobs.request_id`` / ``episodes.qa_request_id`` → the sensor's run tag
``keystone/request_id`` (MariaDB + SeaweedFS, sensors evaluated with build_sensor_context)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, RunRequest, SensorResult, build_sensor_context
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core.models import Episode, EpisodeStatus, Role, SyncJob, SyncStatus, User
from keystone_core.request_context import bound_request_id
from keystone_core.security import hash_password, issue_access_token
from keystone_core.services import qa as qa_service
from keystone_core.services import sync as sync_service
from keystone_core.services.audit import Actor
from keystone_core.services.production import record_approval
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings
from keystone_core.states import transition_episode
from keystone_core.storage.embedded import EmbeddedS3Server
from keystone_pipelines.defs.qa import pending_qa_sensor
from keystone_pipelines.defs.runs import REQUEST_ID_TAG, REQUEST_ID_TAG_MAX, request_id_tag
from keystone_pipelines.defs.sync import due_sync_sensor, sync_batch
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore
from tests.conftest import make_settings
from tests.factories import make_episode, make_factory
from tests.support.sync import SyncSite

pytestmark = pytest.mark.integration


def sync_site(
    engine: Engine,
    url: str,
    s3: EmbeddedS3Server,
    monkeypatch: pytest.MonkeyPatch,
    **env: str,
) -> SyncSite:
    return SyncSite(
        engine,
        url,
        s3,
        monkeypatch,
        {
            "KEYSTONE_SYNC_TARGET": "s3",
            "KEYSTONE_SYNC_S3_BUCKET": "cloud-copy",
            "KEYSTONE_SYNC_S3_PREFIX": f"t{uuid.uuid4().hex[:12]}/",
            **env,
        },
    )


def api_settings(tmp_path: Path, site: SyncSite) -> Settings:
    return make_settings(
        tmp_path,
        database_url=site.url,
        s3_endpoint_url=site.s3_server.endpoint_url,
        s3_access_key=site.s3_server.access_key,
        s3_secret_key=site.s3_server.secret_key,
        sync_target="s3",
        sync_s3_bucket=site.settings.sync_s3_bucket,
    )


def admin(engine: Engine, settings: Settings) -> dict[str, str]:
    with Session(engine) as session:
        user = User(
            account=f"admin-{uuid.uuid4().hex[:8]}",
            password_hash=hash_password("pw-12345678"),
            role=Role.ADMIN,
        )
        session.add(user)
        session.commit()
        token, _ = issue_access_token(
            settings, subject=str(user.id), role=Role.ADMIN, factory_ids=[]
        )
    return {"Authorization": f"Bearer {token}"}


def sensor_requests(sensor: Any, resources: dict[str, Any]) -> list[RunRequest]:
    with build_sensor_context(instance=DagsterInstance.ephemeral(), resources=resources) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult), result
    return list(result.run_requests or [])


def request_ids(engine: Engine) -> dict[int, str | None]:
    with Session(engine) as session:
        return {j.episode_id: j.request_id for j in session.exec(select(SyncJob)).all()}


# --- the tag ---------------------------------------------------------------------------


def test_the_tag_holds_distinct_whole_ids_within_dagsters_limit() -> None:
    assert request_id_tag([None, None]) == {}
    assert request_id_tag(["req-a", None, "req-b", "req-a"]) == {REQUEST_ID_TAG: "req-a,req-b"}
    long = [f"{n:02d}-" + "x" * 27 for n in range(4)]  # 30 characters each
    assert request_id_tag(long) == {REQUEST_ID_TAG: f"{long[0]},{long[1]}"}  # 61 ≤ 63
    assert request_id_tag(["y" * 64]) == {REQUEST_ID_TAG: "y" * REQUEST_ID_TAG_MAX}


# --- sync --------------------------------------------------------------------------------


@pytest.fixture
def site(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> SyncSite:
    return sync_site(mariadb_engine, mariadb_migrated, s3_server, monkeypatch)


@pytest.fixture
def client(tmp_path: Path, site: SyncSite) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings(tmp_path, site))) as c:
        yield c


def test_resync_and_enqueue_requests_tag_the_sync_run_and_the_claim_clears_them(
    site: SyncSite, client: TestClient, tmp_path: Path
) -> None:
    ids = site.approved(3)
    assert set(request_ids(site.engine).values()) == {None}  # approvals outside a request
    (untagged,) = sensor_requests(due_sync_sensor, site.resources)
    assert REQUEST_ID_TAG not in untagged.tags
    with Session(site.engine) as session:  # one job failed, one lost
        session.execute(
            update(SyncJob)
            .where(col(SyncJob.episode_id) == ids[0])
            .values(status=SyncStatus.FAILED.value)
        )
        session.delete(session.exec(select(SyncJob).where(col(SyncJob.episode_id) == ids[1])).one())
        session.commit()
    headers = admin(site.engine, api_settings(tmp_path, site))

    resync = client.post(
        f"/api/v1/sync/episodes/{ids[0]}/resync",
        headers={**headers, "X-Request-ID": "req-abc"},
    )
    assert resync.status_code == 202, resync.text
    assert resync.headers["x-request-id"] == "req-abc"
    enqueue = client.post(
        "/api/v1/sync/episodes",
        json={"episode_ids": [ids[1]]},
        headers={**headers, "X-Request-ID": "req-def"},
    )
    assert enqueue.status_code == 202, enqueue.text
    assert request_ids(site.engine) == {ids[0]: "req-abc", ids[1]: "req-def", ids[2]: None}

    (request,) = sensor_requests(due_sync_sensor, site.resources)
    assert request.tags[REQUEST_ID_TAG] == "req-abc,req-def"
    run = sync_batch.execute_in_process(
        run_config=request.run_config,
        instance=DagsterInstance.ephemeral(),
        resources=site.resources,
        tags=request.tags,
    )
    assert run.success
    assert run.dagster_run.tags[REQUEST_ID_TAG] == "req-abc,req-def"
    assert site.statuses() == {"synced": 3}
    assert set(request_ids(site.engine).values()) == {None}  # served

    # A requeue outside any request (Dagster's resync job) carries none.
    with Session(site.engine) as session:
        sync_service.resync(
            session, Scope.everything(), site.settings, ids[0], actor=Actor.system("dagster")
        )
        session.commit()
    assert request_ids(site.engine)[ids[0]] is None


def test_each_sync_run_is_tagged_with_the_requests_of_the_jobs_it_will_claim(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    site = sync_site(
        mariadb_engine, mariadb_migrated, s3_server, monkeypatch, KEYSTONE_SYNC_BATCH_MAX="2"
    )
    ids = site.approved(4)
    with Session(site.engine) as session:
        for n, episode_pk in enumerate(ids):
            session.execute(
                update(SyncJob)
                .where(col(SyncJob.episode_id) == episode_pk)
                .values(request_id=None if n == 1 else f"req-{n}")
            )
        session.commit()
    first, second = sensor_requests(due_sync_sensor, site.resources)
    assert first.tags[REQUEST_ID_TAG] == "req-0"
    assert second.tags[REQUEST_ID_TAG] == "req-2,req-3"


def test_an_approval_in_a_request_queues_its_sync_job_under_that_request(
    site: SyncSite,
) -> None:
    target = sync_service.target_of(site.settings)
    with Session(site.engine) as session:
        inspected = make_episode(
            session, factory_id=site.factory.id, status=EpisodeStatus.NEEDS_INSPECTION
        )
        rerun = make_episode(
            session, factory_id=site.factory.id, status=EpisodeStatus.NEEDS_INSPECTION
        )
        session.commit()
        inspected_id, rerun_id = inspected.id, rerun.id
        assert inspected_id is not None
        assert rerun_id is not None
        with bound_request_id("req-inspector"):  # an inspector's approve call
            transition_episode(session, inspected_id, EpisodeStatus.INSPECTOR_APPROVED)
            record_approval(session, inspected_id, sync_target=target)
        # A QA run outside any request, approving what a rerun request asked for.
        transition_episode(session, rerun_id, EpisodeStatus.INSPECTOR_APPROVED)
        record_approval(session, rerun_id, sync_target=target, request_id="req-rerun")
        session.commit()
    assert request_ids(site.engine) == {inspected_id: "req-inspector", rerun_id: "req-rerun"}


# --- QA ----------------------------------------------------------------------------------


def test_a_qa_rerun_request_tags_the_qa_run(
    tmp_path: Path,
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    with Session(mariadb_engine) as session:
        factory = make_factory(session)
        failed = make_episode(session, factory_id=factory.id, status=EpisodeStatus.QA_FAILED)
        waiting = make_episode(session, factory_id=factory.id, status=EpisodeStatus.PENDING_QA)
        session.commit()
        failed_id, waiting_id = failed.id, waiting.id
    assert failed_id is not None
    assert waiting_id is not None
    resources = {
        "database": KeystoneDatabase(database_url=mariadb_migrated),
        "object_store": KeystoneObjectStore(
            endpoint_url=s3_server.endpoint_url,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        ),
    }
    (before,) = sensor_requests(pending_qa_sensor, resources)  # the waiting one: no request
    assert REQUEST_ID_TAG not in before.tags

    def qa_request_ids() -> dict[int | None, str | None]:
        with Session(mariadb_engine) as session:
            rows = session.exec(select(Episode).order_by(col(Episode.id))).all()
            return {e.id: e.qa_request_id for e in rows}

    headers = admin(mariadb_engine, settings)
    with TestClient(create_app(settings)) as client:
        rerun = client.post(
            f"/api/v1/qa/episodes/{failed_id}/run",
            json={"tier": "fast"},
            headers={**headers, "X-Request-ID": "req-qa"},
        )
        assert rerun.status_code == 202, rerun.text
        # Asking for a tier on one that waits already makes it that request's work too.
        tier = client.post(
            f"/api/v1/qa/episodes/{waiting_id}/run",
            json={"tier": "thorough"},
            headers={**headers, "X-Request-ID": "req-tier"},
        )
        assert tier.status_code == 202, tier.text
    assert qa_request_ids() == {failed_id: "req-qa", waiting_id: "req-tier"}
    (request,) = sensor_requests(pending_qa_sensor, resources)
    # Claim order is by row id: the waiting episode was made after the failed one.
    assert request.tags[REQUEST_ID_TAG] == "req-qa,req-tier"

    # Requeued without a request (Dagster's qa_rerun, a backfill): the id is cleared.
    with Session(mariadb_engine) as session:
        session.execute(
            update(Episode)
            .where(col(Episode.id) == failed_id)
            .values(status=EpisodeStatus.QA_FAILED.value)
        )
        assert qa_service.requeue(session, [failed_id], Actor.system("dagster")) == [failed_id]
        session.commit()
    assert qa_request_ids()[failed_id] is None
