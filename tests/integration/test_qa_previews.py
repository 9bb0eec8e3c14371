"""QA previews on MariaDB and a real S3 server: a doubtful episode scored by the pipeline
gets a contact sheet and a rate timeline under the derived prefix of its bucket, linked
from the run's metadata and from the inspection queue with presigned URLs that work; the
presign route hands out each kind and refuses what it must (404, 422, 403)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context
from fastapi.testclient import TestClient
from PIL import Image
from sqlmodel import Session

from keystone_api.app import create_app
from keystone_core.models import Episode, EpisodeStatus, Role, User, UserFactory
from keystone_core.security import hash_password, issue_access_token
from keystone_core.settings import Settings
from keystone_pipelines.defs.qa import pending_qa_sensor, qa_batch
from tests.conftest import make_settings
from tests.factories import make_factory
from tests.integration.test_qa_pipeline import Site, instance, site  # noqa: F401

pytestmark = pytest.mark.integration

PREFIX = "_keystone/derived/"


@pytest.fixture
def api_settings(site: Site, tmp_path: Path) -> Settings:  # noqa: F811
    return make_settings(
        tmp_path,
        database_url=site.url,
        s3_endpoint_url=site.s3_server.endpoint_url,
        s3_access_key=site.s3_server.access_key,
        s3_secret_key=site.s3_server.secret_key,
        presign_expires_s=120,
    )


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as c:
        yield c


def headers_for(
    site: Site,  # noqa: F811
    settings: Settings,
    role: Role,
    factory_id: int | None,
) -> dict[str, str]:
    """A signed-in user of ``role`` scoped to ``factory_id`` (None: an admin of all)."""
    with Session(site.engine) as session:
        user = User(
            account=f"{role.value}-{factory_id}",
            password_hash=hash_password("previews-password"),
            role=role,
        )
        session.add(user)
        session.flush()
        if factory_id is not None:
            session.add(UserFactory(user_id=user.id, factory_id=factory_id))  # type: ignore[arg-type]
        session.commit()
        token, _ = issue_access_token(
            settings,
            subject=str(user.id),
            role=role,
            factory_ids=[] if factory_id is None else [factory_id],
        )
    return {"Authorization": f"Bearer {token}"}


def row(site: Site, episode_id: int) -> Episode:  # noqa: F811
    with Session(site.engine, expire_on_commit=False) as session:
        episode = session.get(Episode, episode_id)
        assert episode is not None
        return episode


def image(content: bytes, fmt: str) -> Image.Image:
    picture = Image.open(io.BytesIO(content))
    picture.load()  # every byte decoded
    assert picture.format == fmt
    return picture


def fetch(url: str, content_type: str | None = None) -> bytes:
    """GET a presigned URL as a browser would (no credentials). Device objects keep the
    content type their uploader gave them (None: not checked)."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    if content_type is not None:
        assert response.headers["content-type"] == content_type
    return response.content


def run_qa(site: Site, instance: DagsterInstance) -> Any:  # noqa: F811
    """One qa_batch run as the sensor asks for it; its result."""
    requested = pending_qa_sensor(build_sensor_context(instance=instance, resources=site.resources))
    assert isinstance(requested, SensorResult)
    assert requested.run_requests
    request = requested.run_requests[0]
    result = qa_batch.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        resources=site.resources,
        tags=request.tags,
    )
    assert result.success
    return result


def test_a_doubtful_episode_gets_previews_linked_from_the_run_and_the_queue(
    site: Site,  # noqa: F811
    instance: DagsterInstance,  # noqa: F811
    client: TestClient,
    api_settings: Settings,
) -> None:
    gap = site.episode("time_gap")
    clean = site.episode(seed=1)
    garbage = site.episode("garbage", seed=2)
    result = run_qa(site, instance)
    gap_row, clean_row, garbage_row = row(site, gap), row(site, clean), row(site, garbage)
    assert gap_row.status == EpisodeStatus.NEEDS_INSPECTION
    assert clean_row.status == EpisodeStatus.AUTO_APPROVED
    assert garbage_row.status == EpisodeStatus.QA_FAILED

    # Under the derived prefix of the episode's own bucket, nowhere near a device prefix.
    base = f"{PREFIX}{site.factory.id}/{gap_row.episode_id}/"
    preview = gap_row.meta["preview"]
    assert preview["contact_sheet"] == base + "contact_sheet.jpg"
    assert preview["rate_timeline"] == base + "rate_timeline.png"
    assert preview["generated_at"]
    assert {s["topic"] for s in preview["silences"]} == {"/imu/data", "/camera0/rgb/compressed"}
    for key, fmt, content_type in (
        (preview["contact_sheet"], "JPEG", "image/jpeg"),
        (preview["rate_timeline"], "PNG", "image/png"),
    ):
        stored = site.s3.get_object(Bucket=site.bucket, Key=key)
        assert stored["ContentType"] == content_type
        image(stored["Body"].read(), fmt)
    # Auto-approved: nothing drawn (QA_PREVIEW=doubtful). Unreadable: a note, no image.
    assert "preview" not in clean_row.meta
    listed = site.s3.list_objects_v2(
        Bucket=site.bucket, Prefix=f"{PREFIX}{site.factory.id}/{clean_row.episode_id}/"
    )
    assert listed["KeyCount"] == 0
    assert garbage_row.meta["preview"]["contact_sheet"] is None
    assert garbage_row.meta["preview"]["notes"] == ["no preview: the file could not be read"]

    # The run's metadata links the previews (and names the keys).
    output = next(
        e for e in result.events_for_node("score_pending_episodes") if e.is_successful_output
    )
    metadata = output.step_output_data.metadata
    assert metadata["previews"].value == 2
    links = metadata["preview_links"].value
    assert preview["contact_sheet"] in links
    assert f"{site.s3_server.endpoint_url}/{site.bucket}/" in links
    materialized = result.asset_materializations_for_node("score_pending_episodes")
    assert preview["rate_timeline"] in materialized[0].metadata["preview_links"].value

    # The inspection queue links them, presigned: the URLs work as they are.
    inspector = headers_for(site, api_settings, Role.DATA_INSPECTOR, site.factory.id)
    queue = client.get("/api/v1/inspections/queue", headers=inspector)
    assert queue.status_code == 200, queue.text
    (item,) = queue.json()["items"]
    assert item["episode_id"] == str(gap)
    assert item["preview"]["generated_at"] == preview["generated_at"]
    image(fetch(item["preview"]["contact_sheet_url"], "image/jpeg"), "JPEG")
    image(fetch(item["preview"]["rate_timeline_url"], "image/png"), "PNG")
    mcap = fetch(item["download"]["mcap_url"])
    assert len(mcap) == gap_row.file_size_bytes
    sidecar = json.loads(fetch(item["download"]["sidecar_url"]))
    assert sidecar["recording"]["checksum_sha256"] == gap_row.checksum
    assert item["links_expire_at"]


def test_the_presign_route_links_each_kind_and_refuses_what_it_must(
    site: Site,  # noqa: F811
    instance: DagsterInstance,  # noqa: F811
    client: TestClient,
    api_settings: Settings,
) -> None:
    gap = site.episode("time_gap")
    clean = site.episode(seed=3)
    site.drain(instance)
    inspector = headers_for(site, api_settings, Role.DATA_INSPECTOR, site.factory.id)
    url = "/api/v1/episodes/{}/presign"
    types = {
        "mcap": None,
        "sidecar": None,
        "contact_sheet": "image/jpeg",
        "rate_timeline": "image/png",
    }
    for kind, content_type in types.items():
        answer = client.get(url.format(gap), params={"kind": kind}, headers=inspector)
        assert answer.status_code == 200, (kind, answer.text)
        body = answer.json()
        assert body["kind"] == kind
        assert body["expires_in"] == 120  # KEYSTONE_PRESIGN_EXPIRES_S
        assert body["bucket"] == site.bucket
        fetch(body["url"], content_type)
    # Without a kind: the MCAP (the Go API's default).
    assert client.get(url.format(gap), headers=inspector).json()["kind"] == "mcap"
    for role in (Role.PRODUCTION_MANAGER, Role.ADMIN):
        allowed = headers_for(site, api_settings, role, site.factory.id)
        assert client.get(url.format(gap), headers=allowed).status_code == 200

    unknown = client.get(url.format(gap), params={"kind": "thumbnail"}, headers=inspector)
    assert unknown.status_code == 422
    no_preview = client.get(url.format(clean), params={"kind": "contact_sheet"}, headers=inspector)
    assert no_preview.status_code == 404
    assert no_preview.json()["code"] == "not_available"
    with Session(site.engine) as session:
        episode = session.get(Episode, clean)
        assert episode is not None
        site.s3.delete_object(Bucket=site.bucket, Key=episode.mcap_path)
        episode.sidecar_path = None
        session.add(episode)
        session.commit()
    for kind in ("mcap", "sidecar"):  # expired from the store; never had a sidecar
        gone = client.get(url.format(clean), params={"kind": kind}, headers=inspector)
        assert gone.status_code == 404, kind
        assert gone.json()["code"] == "not_available"

    # Editable metadata cannot make Keystone sign another object.
    admin = headers_for(site, api_settings, Role.ADMIN, None)
    forged = {"preview": {"contact_sheet": row(site, gap).mcap_path}}
    patched = client.patch(f"/api/v1/episodes/{clean}", json={"metadata": forged}, headers=admin)
    assert patched.status_code == 200, patched.text
    refused = client.get(url.format(clean), params={"kind": "contact_sheet"}, headers=admin)
    assert refused.status_code == 404

    collector = headers_for(site, api_settings, Role.DATA_COLLECTOR, site.factory.id)
    assert client.get(url.format(gap), headers=collector).status_code == 403
    with Session(site.engine) as session:
        other = make_factory(session)
        session.commit()
        assert other.id is not None
    elsewhere = headers_for(site, api_settings, Role.DATA_INSPECTOR, other.id)
    hidden = client.get(url.format(gap), params={"kind": "contact_sheet"}, headers=elsewhere)
    assert hidden.status_code == 404
    assert hidden.json()["code"] == "not_found"
    missing = client.get(url.format(99_999_999), headers=inspector)
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"


@pytest.mark.parametrize("policy", ["off", "all"])
def test_the_preview_setting_chooses_which_episodes_get_previews(
    site: Site,  # noqa: F811
    instance: DagsterInstance,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
) -> None:
    monkeypatch.setenv("KEYSTONE_QA_PREVIEW", policy)
    gap, clean = site.episode("time_gap"), site.episode(seed=4)
    site.drain(instance)
    assert ("preview" in row(site, clean).meta) is (policy == "all")
    assert ("preview" in row(site, gap).meta) is (policy == "all")
    listed = site.s3.list_objects_v2(Bucket=site.bucket, Prefix=f"{PREFIX}{site.factory.id}/")
    assert listed["KeyCount"] == (4 if policy == "all" else 0)
