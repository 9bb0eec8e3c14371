"""keystone backup / restore on SQLite: exact round trip and every refusal."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, select
from sqlmodel import Session

from keystone_core import migrate
from keystone_core.db import create_db_engine
from keystone_core.models import AuditLog, OutboxEvent
from keystone_core.services.backup import BackupError, backup, keystone_table_names, restore
from keystone_core.services.demo import seed_demo
from keystone_core.settings import Settings
from tests.conftest import make_settings


def migrated(tmp_path: Path, name: str) -> tuple[Settings, Engine]:
    settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / name}")
    engine = create_db_engine(settings)
    migrate.upgrade(engine, lock_dir=tmp_path)
    return settings, engine


def dump(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as conn:
        metadata = MetaData()
        metadata.reflect(bind=conn)
        return {
            t.name: [dict(r) for r in conn.execute(select(t).order_by(*t.primary_key)).mappings()]
            for t in metadata.sorted_tables
            if t.name in keystone_table_names()
        }


@pytest.fixture
def source(tmp_path: Path) -> tuple[Settings, Engine]:
    settings, engine = migrated(tmp_path, "source.db")
    with Session(engine) as session:
        seed_demo(session)
        session.add(
            AuditLog(
                occurred_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
                actor_type="user",
                action="x.y",
                entity_type="episode",
                entity_id="1",
                after={"nested": {"list": [1, 2.5, None, "ü"]}},
            )
        )
        session.add(OutboxEvent(event_type="episode.approved", payload={"a": [1, {"b": None}]}))
        session.commit()
    return settings, engine


def test_round_trip_is_exact(source: tuple[Settings, Engine], tmp_path: Path) -> None:
    settings, engine = source
    lines: list[str] = []
    report = backup(engine, None, settings, tmp_path / "bk", progress=lines.append)
    assert (tmp_path / "bk" / "manifest.json").is_file()
    assert not (tmp_path / "bk.partial").exists()
    assert report.tables["audit_log"] == 2  # the demo seed's and ours
    assert any("backup complete" in line for line in lines)

    target_settings, target = migrated(tmp_path, "target.db")
    restored = restore(target, None, target_settings, tmp_path / "bk")
    assert restored.tables == report.tables
    assert dump(target) == dump(engine)


def test_backup_refuses_a_non_empty_target(source: tuple[Settings, Engine], tmp_path: Path) -> None:
    settings, engine = source
    (tmp_path / "bk").mkdir()
    (tmp_path / "bk" / "keep.txt").write_text("mine")
    with pytest.raises(BackupError, match="not empty"):
        backup(engine, None, settings, tmp_path / "bk")
    assert sorted(p.name for p in (tmp_path / "bk").iterdir()) == ["keep.txt"]
    assert not (tmp_path / "bk.partial").exists()


def test_restore_into_a_database_with_data_needs_force(
    source: tuple[Settings, Engine], tmp_path: Path
) -> None:
    settings, engine = source
    backup(engine, None, settings, tmp_path / "bk")
    target_settings, target = migrated(tmp_path, "target.db")
    with Session(target) as session:
        session.add(AuditLog(actor_type="user", action="mine", entity_type="e", entity_id="9"))
        session.commit()
    before = dump(target)
    with pytest.raises(BackupError, match="--force"):
        restore(target, None, target_settings, tmp_path / "bk")
    assert dump(target) == before
    restore(target, None, target_settings, tmp_path / "bk", force=True)
    assert dump(target) == dump(engine)


def corrupt(backup_dir: Path, change: str) -> None:
    manifest_path = backup_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if change == "no manifest":
        manifest_path.unlink()
    elif change == "not json":
        manifest_path.write_text("{not json")
    elif change == "no revision":
        del manifest["revision"]
        manifest_path.write_text(json.dumps(manifest))
    elif change == "newer revision":
        manifest["revision"] = "9999_from_the_future"
        manifest_path.write_text(json.dumps(manifest))
    elif change == "other format":
        manifest["format_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
    elif change == "missing table file":
        (backup_dir / "tables" / "audit_log.jsonl.gz").unlink()
    elif change == "truncated table":
        path = backup_dir / "tables" / "audit_log.jsonl.gz"
        rows = gzip.decompress(path.read_bytes()).splitlines()[:-1]
        path.write_bytes(gzip.compress(b"\n".join(rows) + b"\n"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no manifest", "manifest.json is missing"),
        ("not json", "corrupt"),
        ("no revision", "corrupt"),
        ("newer revision", "does not know"),
        ("other format", "not supported"),
        ("missing table file", "audit_log.jsonl.gz is missing"),
        ("truncated table", "holds 1 rows, the manifest says 2"),
    ],
)
def test_restore_refuses_a_damaged_backup(
    source: tuple[Settings, Engine], tmp_path: Path, change: str, message: str
) -> None:
    settings, engine = source
    backup(engine, None, settings, tmp_path / "bk")
    corrupt(tmp_path / "bk", change)
    target_settings, target = migrated(tmp_path, "target.db")
    with pytest.raises(BackupError, match=message):
        restore(target, None, target_settings, tmp_path / "bk")
    # Nothing half-written: the target holds no Keystone rows.
    assert all(rows == [] for rows in dump(target).values())
