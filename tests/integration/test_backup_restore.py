"""keystone backup / restore on MariaDB + SeaweedFS: rows and objects come back exactly."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from keystone_core.db import create_db_engine
from keystone_core.models import AuditLog, Factory
from keystone_core.services.backup import BackupError, backup, restore
from keystone_core.services.demo import seed_demo
from keystone_core.settings import Settings
from keystone_core.storage import EmbeddedS3Server, create_s3_client, ensure_bucket
from tests.conftest import TEST_DB, make_settings, mariadb_url, recreate_mariadb_database
from tests.unit.test_backup_sqlite import dump

pytestmark = pytest.mark.integration


def settings_for(tmp_path: Path, url: str, s3: EmbeddedS3Server, prefix: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url=url,
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_bucket_prefix=prefix,
        audit_archive_bucket=f"{prefix}archive",
    )


@pytest.fixture
def target_url() -> str:
    name = f"{TEST_DB}_restore"
    recreate_mariadb_database(name)
    return mariadb_url(name)


def test_database_and_buckets_round_trip(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    target_url: str,
    tmp_path: Path,
) -> None:
    prefix = f"bk{secrets.token_hex(3)}-"
    settings = settings_for(tmp_path, mariadb_migrated, s3_server, prefix)
    with Session(mariadb_engine) as session:
        demo = seed_demo(session)
        session.add(
            AuditLog(
                occurred_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
                actor_type="user",
                action="x.y",
                entity_type="episode",
                entity_id="1",
                after={"nested": [1, 2.5, None, "ü"]},
            )
        )
        session.commit()
    client = create_s3_client(settings)
    bucket = settings.bucket_for_factory(str(demo.factory_ids[0]))
    ensure_bucket(client, bucket)
    ensure_bucket(client, settings.audit_archive_bucket)
    objects = {
        (bucket, "1/AB-1/task-1.mcap"): secrets.token_bytes(6 * 1024 * 1024 + 3),
        (bucket, "1/AB-1/task-1.json"): b'{"task_id": "task-1"}',
        (bucket, "_keystone/derived/e/contact_sheet.jpg"): secrets.token_bytes(2048),
        (settings.audit_archive_bucket, "audit/2025/01/01/a.jsonl.gz"): b"archive",
    }
    for (name, key), body in objects.items():
        client.put_object(Bucket=name, Key=key, Body=body)

    report = backup(mariadb_engine, client, settings, tmp_path / "bk")
    assert report.objects == 4
    source_rows = dump(mariadb_engine)

    # The edge server is lost: objects gone, a new empty database.
    for name, key in objects:
        client.delete_object(Bucket=name, Key=key)
    target_settings = settings_for(tmp_path, target_url, s3_server, prefix)
    target = create_db_engine(target_settings)
    try:
        restored = restore(target, client, target_settings, tmp_path / "bk")
        assert restored.tables == report.tables
        assert dump(target) == source_rows
        for (name, key), body in objects.items():
            assert client.get_object(Bucket=name, Key=key)["Body"].read() == body

        # New rows continue after the restored ids.
        with Session(target) as session:
            top = session.exec(select(AuditLog.id).order_by(col(AuditLog.id).desc())).first()
            row = AuditLog(actor_type="user", action="after", entity_type="e", entity_id="1")
            session.add(row)
            session.commit()
            assert top is not None
            assert row.id is not None
            assert row.id > top
            assert session.exec(select(Factory)).one().slug == "demo-factory"
    finally:
        target.dispose()


def test_a_damaged_object_stops_the_restore_before_the_database_is_touched(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    target_url: str,
    tmp_path: Path,
) -> None:
    prefix = f"bk{secrets.token_hex(3)}-"
    settings = settings_for(tmp_path, mariadb_migrated, s3_server, prefix)
    with Session(mariadb_engine) as session:
        demo = seed_demo(session)
    client = create_s3_client(settings)
    bucket = settings.bucket_for_factory(str(demo.factory_ids[0]))
    ensure_bucket(client, bucket)
    client.put_object(Bucket=bucket, Key="1/AB-1/t.mcap", Body=b"x" * 100)
    backup(mariadb_engine, client, settings, tmp_path / "bk")
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    (tmp_path / "bk" / manifest["objects"][0]["file"]).write_bytes(b"y" * 100)

    target = create_db_engine(settings_for(tmp_path, target_url, s3_server, prefix))
    try:
        with pytest.raises(BackupError, match="does not match its checksum"):
            restore(target, client, settings, tmp_path / "bk")
        with target.connect() as conn:
            assert conn.exec_driver_sql("SHOW TABLES").all() == []
    finally:
        target.dispose()


def test_the_cli_exit_codes(
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    tmp_path: Path,
) -> None:
    env = {
        "KEYSTONE_ENV": "test",
        "KEYSTONE_DATABASE_URL": mariadb_migrated,
        "KEYSTONE_DATA_DIR": str(tmp_path / "data"),
        "KEYSTONE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "KEYSTONE_S3_ACCESS_KEY": s3_server.access_key,
        "KEYSTONE_S3_SECRET_KEY": s3_server.secret_key,
        "KEYSTONE_S3_BUCKET_PREFIX": f"bk{secrets.token_hex(3)}-",
        "PATH": "/usr/bin:/bin",
    }

    def keystone(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keystone_cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    made = keystone("backup", "--out", str(tmp_path / "bk"))
    assert made.returncode == 0, made.stderr
    again = keystone("backup", "--out", str(tmp_path / "bk"))
    assert again.returncode == 2
    assert "not empty" in again.stderr
    # The source database holds data: restoring over it needs --force.
    with Session(mariadb_engine) as session:
        seed_demo(session)
        session.commit()
    refused = keystone("restore", "--from", str(tmp_path / "bk"))
    assert refused.returncode == 2
    assert "--force" in refused.stderr
    missing = keystone("restore", "--from", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2
    assert "manifest.json is missing" in missing.stderr
