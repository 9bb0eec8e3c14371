"""The cloud receiver's settings, schema, part arithmetic and anonymous mode (no real services).

The protocol itself runs against SeaweedFS, SQLite and MariaDB in
tests/integration/test_cloud_receiver.py; moto stands in for S3 here only where no
object is ever stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateTable
from sqlmodel import SQLModel

from keystone_receiver.app import create_app
from keystone_receiver.db import (
    ReceivedEpisode,
    ReceiverBase,
    create_receiver_engine,
    create_tables,
    transaction,
)
from keystone_receiver.protocol import MAX_METADATA_BYTES, EpisodeManifest
from keystone_receiver.sessions import MAX_PARTS, part_size_for, part_sizes
from keystone_receiver.settings import (
    MIB,
    ReceiverSettings,
    ReceiverSettingsError,
    load_receiver_settings,
)

TOKEN = "unit-test-token-0123456789"


@pytest.fixture(autouse=True)
def _no_receiver_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's KEYSTONE_RECEIVER_* must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("KEYSTONE_RECEIVER_"):
            monkeypatch.delenv(name)


def settings(tmp_path: Path, **overrides: object) -> ReceiverSettings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path / 'receiver.db'}",
        "token": TOKEN,
    }
    values.update(overrides)
    return ReceiverSettings(**values)  # type: ignore[arg-type]


# --- settings ---------------------------------------------------------------------------


def test_without_a_token_the_receiver_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="KEYSTONE_RECEIVER_TOKEN is not set"):
        settings(tmp_path, token=None)
    anonymous = settings(tmp_path, token=None, allow_anonymous=True)
    assert not anonymous.requires_token
    with pytest.raises(ReceiverSettingsError) as caught:
        load_receiver_settings()
    assert "\n" not in str(caught.value)
    assert "KEYSTONE_RECEIVER_ALLOW_ANONYMOUS=true" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("token", "short"),
        ("part_size", 5 * MIB - 1),
        ("part_size", 6 * 1024**3),
        ("multipart_threshold", -1),
        ("presign_expires_s", 59),
        ("presign_expires_s", 8 * 24 * 3600),
        ("max_objects", 0),
        ("max_objects", 1001),
        ("bucket", "Upper_Case"),
        ("bucket", "a"),
        ("s3_endpoint_url", "ftp://store:8333"),
        ("s3_endpoint_url", "http://store:8333/prefix"),
        ("public_s3_endpoint_url", "store.example.com"),
        ("database_pool_size", 0),
        ("log_level", "LOUD"),
    ],
)
def test_bad_values_are_pydantic_errors(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        settings(tmp_path, **{field: value})


def test_settings_come_from_prefixed_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYSTONE_RECEIVER_TOKEN", TOKEN)
    monkeypatch.setenv("KEYSTONE_RECEIVER_S3_ENDPOINT_URL", "http://10.0.0.5:8333/")
    monkeypatch.setenv("KEYSTONE_RECEIVER_PART_SIZE", str(8 * MIB))
    monkeypatch.setenv("KEYSTONE_RECEIVER_BUCKET", "cloud-episodes")
    loaded = load_receiver_settings()
    assert loaded.token is not None
    assert loaded.token.get_secret_value() == TOKEN
    assert "unit-test-token" not in repr(loaded)
    assert loaded.s3_endpoint_url == "http://10.0.0.5:8333"
    assert loaded.presign_endpoint_url == "http://10.0.0.5:8333"  # public defaults to it
    assert (loaded.part_size, loaded.bucket) == (8 * MIB, "cloud-episodes")
    assert (loaded.multipart_threshold, loaded.max_objects) == (16 * MIB, 16)
    assert loaded.database_url == "sqlite:///.keystone/receiver.db"
    monkeypatch.setenv("KEYSTONE_RECEIVER_PUBLIC_S3_ENDPOINT_URL", "https://s3.cloud.example")
    assert load_receiver_settings().presign_endpoint_url == "https://s3.cloud.example"
    monkeypatch.setenv("KEYSTONE_RECEIVER_PART_SIZE", "1")
    with pytest.raises(ReceiverSettingsError, match="KEYSTONE_RECEIVER_PART_SIZE"):
        load_receiver_settings()


# --- schema -----------------------------------------------------------------------------


def test_the_schema_is_its_own_and_keeps_microseconds_and_case_on_mysql() -> None:
    assert not set(ReceiverBase.metadata.tables) & set(SQLModel.metadata.tables)
    ddl = "\n".join(
        str(CreateTable(table).compile(dialect=mysql.dialect()))
        for table in ReceiverBase.metadata.sorted_tables
    )
    assert "DATETIME(6)" in ddl
    assert "COLLATE ascii_bin" in ddl
    assert "DATETIME " not in ddl.replace("DATETIME(6)", "")


def test_datetimes_are_aware_utc_in_and_out(tmp_path: Path) -> None:
    engine = create_receiver_engine(settings(tmp_path / "nested" / "dir"))
    create_tables(engine)
    create_tables(engine)  # every start runs it
    assert (tmp_path / "nested" / "dir").is_dir()
    moment = datetime(2026, 5, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=8)))
    with transaction(engine) as session:
        session.add(
            ReceivedEpisode(
                episode_id="ep-1",
                factory_id="f",
                device_id="d",
                task_id="t",
                status="incomplete",
                session="s",
                episode_metadata={},
                created_at=moment,
                updated_at=moment,
            )
        )
    with transaction(engine) as session:
        stored = session.scalars(select(ReceivedEpisode)).one()
        assert stored.created_at == moment
        assert stored.created_at.tzinfo is UTC
        assert stored.created_at.hour == 6
    with pytest.raises(Exception, match="naive"), transaction(engine) as session:
        session.scalars(select(ReceivedEpisode)).one().updated_at = datetime(2026, 5, 1)
    engine.dispose()


# --- parts ------------------------------------------------------------------------------


def test_part_sizes_for_the_documented_example() -> None:
    assert part_sizes(40 * MIB, 16 * MIB) == {1: 16 * MIB, 2: 16 * MIB, 3: 8 * MIB}
    assert part_sizes(16 * MIB, 16 * MIB) == {1: 16 * MIB}
    assert part_size_for(40 * MIB, 16 * MIB) == 16 * MIB
    biggest = part_size_for(5 * 1024**4, 16 * MIB)
    assert biggest % MIB == 0
    assert len(part_sizes(5 * 1024**4, biggest)) <= MAX_PARTS


@given(size=st.integers(min_value=1, max_value=5 * 1024**4), configured_mib=st.integers(5, 64))
def test_parts_cover_the_object_within_s3_limits(size: int, configured_mib: int) -> None:
    part_size = part_size_for(size, configured_mib * MIB)
    parts = part_sizes(size, part_size)
    assert sum(parts.values()) == size
    assert list(parts) == list(range(1, len(parts) + 1))
    assert len(parts) <= MAX_PARTS
    assert all(s == part_size for n, s in parts.items() if n < len(parts))
    assert 0 < parts[len(parts)] <= part_size


# --- protocol ---------------------------------------------------------------------------


def manifest(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "episode_id": "ep-1",
        "factory_id": "f1",
        "device_id": "robot:01",
        "task_id": "t.1",
        "objects": [{"name": "a.mcap", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}],
        "metadata": {},
    }
    body.update(changes)
    return body


def test_metadata_may_be_exactly_64_kib() -> None:
    overhead = len('{"k":""}')
    fits = {"k": "x" * (MAX_METADATA_BYTES - overhead)}
    assert EpisodeManifest.model_validate(manifest(metadata=fits)).metadata == fits
    with pytest.raises(ValidationError, match="65537 bytes"):
        EpisodeManifest.model_validate(manifest(metadata={"k": "x" * (MAX_METADATA_BYTES - 7)}))


def test_unknown_fields_are_ignored_for_newer_senders() -> None:
    parsed = EpisodeManifest.model_validate(manifest(priority="high"))
    assert not hasattr(parsed, "priority")


# --- anonymous mode (dev only) ----------------------------------------------------------


@pytest.fixture
def anonymous_client(tmp_path: Path) -> Iterator[TestClient]:
    with mock_aws():
        app = create_app(
            settings(
                tmp_path,
                token=None,
                allow_anonymous=True,
                s3_access_key="moto",
                s3_secret_key="moto",
            )
        )
        with TestClient(app) as client:
            yield client


def test_anonymous_mode_needs_no_token(anonymous_client: TestClient) -> None:
    opened = anonymous_client.post("/api/v1/sync/episode", json=manifest())
    assert opened.status_code == 202, opened.text
    (upload,) = opened.json()["uploads"]
    assert upload["key"] == "f1/robot:01/ep-1/a.mcap"
    assert "X-Amz-Signature=" in upload["url"]
    assert anonymous_client.get("/api/v1/sync/episode/ep-1").json()["session_count"] == 1
    assert anonymous_client.get("/health").json() == {"status": "ok"}


def test_the_openapi_document_lists_the_protocol(anonymous_client: TestClient) -> None:
    paths = anonymous_client.get("/api/v1/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/v1/sync/episode",
        "/api/v1/sync/episode/{episode_id}/complete",
        "/api/v1/sync/episode/{episode_id}",
        "/health",
    }
    assert set(paths["/api/v1/sync/episode"]["post"]["responses"]) >= {"202", "401", "409", "422"}
