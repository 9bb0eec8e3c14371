"""Backup and restore of Keystone's database and buckets (``keystone backup`` / ``restore``).

A backup is a directory: ``manifest.json`` (format, schema revision, row counts, every
object with its size and SHA-256), one gzip JSON-lines file per table, read inside one
consistent snapshot (InnoDB ``START TRANSACTION WITH CONSISTENT SNAPSHOT``; one SQLite
read transaction), and the objects of the factory buckets and the audit archive. It is
written to ``<dir>.partial`` and renamed at the end, so an interrupted backup never looks
complete; an existing non-empty target is refused.

Restore checks the whole backup first (manifest, files, every object's SHA-256), refuses
a database that holds Keystone rows unless forced, recreates Keystone's tables at the
backup's schema revision, inserts every row in one transaction, migrates to head, and
then uploads the objects (idempotent: run it again with ``--objects-only``).

Tables are read and written through reflection, so a backup taken at an older revision
restores with that revision's columns before the migrations bring it up to date.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import gzip
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, MetaData, Table, func, select, text
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

import keystone_core.models  # noqa: F401  (registers every table on SQLModel.metadata)
from keystone_core import clock, migrate
from keystone_core.errors import KeystoneError
from keystone_core.storage import ensure_bucket

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from keystone_core.settings import Settings

FORMAT = "keystone-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INSERT_BATCH = 1000
CHUNK = 1024 * 1024
Progress = Callable[[str], None]


class BackupError(KeystoneError):
    """Bad input to backup or restore: nothing was written or changed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="backup_invalid")


@dataclass
class BackupReport:
    path: Path
    revision: str
    tables: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    object_bytes: int = 0


def _quiet(_: str) -> None:
    pass


def keystone_table_names() -> set[str]:
    return set(SQLModel.metadata.tables)


def _reflect(conn: Connection) -> MetaData:
    """Keystone's tables as they are in this database (any schema revision)."""
    metadata = MetaData()
    present = set(conn.dialect.get_table_names(conn)) & keystone_table_names()
    metadata.reflect(bind=conn, only=sorted(present))
    return metadata


def _encode(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return {"$t": value.isoformat()}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, decimal.Decimal):
        return {"$d": str(value)}
    return value


def _decoder(column_type: sqltypes.TypeEngine[Any]) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1:
            ((tag, raw),) = value.items()
            if tag == "$t":
                if isinstance(column_type, sqltypes.Date) and not isinstance(
                    column_type, sqltypes.DateTime
                ):
                    return dt.date.fromisoformat(raw)
                if isinstance(column_type, sqltypes.Time):
                    return dt.time.fromisoformat(raw)
                return dt.datetime.fromisoformat(raw)
            if tag == "$b":
                return base64.b64decode(raw)
            if tag == "$d":
                return decimal.Decimal(raw)
        return value

    return decode


def _revision(conn: Connection) -> str:
    try:
        value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:  # no table: not a Keystone database
        raise BackupError("the database has no Keystone schema (no alembic_version)") from None
    if not value:
        raise BackupError("the database has no Keystone schema revision")
    return str(value)


def _begin_snapshot(conn: Connection) -> None:
    if conn.dialect.name in {"mysql", "mariadb"}:
        conn.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")
    else:
        conn.exec_driver_sql("BEGIN")


def _backup_buckets(client: S3Client, settings: Settings) -> list[str]:
    prefix = settings.s3_bucket_prefix
    names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    factory = sorted(n for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit())
    archive = [settings.audit_archive_bucket] if settings.audit_archive_bucket in names else []
    return factory + archive


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def backup(
    engine: Engine,
    client: S3Client | None,
    settings: Settings,
    out: Path,
    *,
    progress: Progress = _quiet,
) -> BackupReport:
    """Write a backup of the database (and, with ``client``, the buckets) to ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out} exists and is not empty: choose a new directory")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an earlier interrupted backup of ours
    (partial / "tables").mkdir(parents=True)
    try:
        report = _write_backup(engine, client, settings, partial, progress)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report.path = out
    return report


def _write_backup(
    engine: Engine, client: S3Client | None, settings: Settings, target: Path, progress: Progress
) -> BackupReport:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": clock.now().isoformat(),
        "dialect": engine.dialect.name,
    }
    with engine.connect() as conn:
        _begin_snapshot(conn)
        revision = _revision(conn)
        report = BackupReport(path=target, revision=revision)
        metadata = _reflect(conn)
        for table in metadata.sorted_tables:
            count = _dump_table(conn, table, target / "tables" / f"{table.name}.jsonl.gz")
            report.tables[table.name] = count
            progress(f"table {table.name}: {count} rows")
        conn.rollback()
    manifest["revision"] = revision
    manifest["tables"] = report.tables
    objects: list[dict[str, Any]] = []
    if client is not None:
        for bucket in _backup_buckets(client, settings):
            objects += _dump_bucket(client, bucket, target / "objects", len(objects), progress)
    manifest["objects"] = objects
    report.objects = len(objects)
    report.object_bytes = sum(o["size"] for o in objects)
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    progress(
        f"backup complete: {sum(report.tables.values())} rows in {len(report.tables)} tables, "
        f"{report.objects} objects ({report.object_bytes / 1e6:.1f} MB)"
    )
    return report


def _dump_table(conn: Connection, table: Table, path: Path) -> int:
    count = 0
    order = list(table.primary_key.columns) or list(table.columns)
    result = conn.execution_options(stream_results=True, yield_per=INSERT_BATCH).execute(
        select(table).order_by(*order)
    )
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in result.mappings():
            handle.write(json.dumps({k: _encode(v) for k, v in row.items()}) + "\n")
            count += 1
    return count


def _dump_bucket(
    client: S3Client, bucket: str, root: Path, start: int, progress: Progress
) -> list[dict[str, Any]]:
    # Objects are files named by number: keys may hold anything, paths must not.
    (root / bucket).mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            number = start + len(entries)
            path = root / bucket / f"{number:08d}"
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
            digest = hashlib.sha256()
            size = 0
            with path.open("wb") as handle:
                for chunk in body.iter_chunks(CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            entries.append(
                {
                    "bucket": bucket,
                    "key": item["Key"],
                    "file": f"objects/{bucket}/{number:08d}",
                    "size": size,
                    "sha256": digest.hexdigest(),
                }
            )
        if entries:
            progress(f"bucket {bucket}: {len(entries)} objects so far")
    return entries


# --- restore ------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    revision: str
    tables: dict[str, int] = field(default_factory=dict)
    objects: int = 0


def read_manifest(source: Path) -> dict[str, Any]:
    """The backup's manifest, checked: format, version, revision known, files present."""
    path = source / MANIFEST
    if not path.is_file():
        raise BackupError(f"{source} is not a Keystone backup: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        fmt, version = manifest["format"], manifest["format_version"]
        revision, tables, objects = manifest["revision"], manifest["tables"], manifest["objects"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{path} is corrupt: {exc}") from None
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise BackupError(f"{path}: format {fmt!r} version {version!r} is not supported")
    try:
        ScriptDirectory.from_config(migrate.alembic_config()).get_revision(revision)
    except CommandError:
        raise BackupError(
            f"the backup is at schema revision {revision!r}, which this Keystone does not "
            "know (a newer version made it): upgrade Keystone first"
        ) from None
    unknown = set(tables) - keystone_table_names()
    if unknown:
        raise BackupError(f"the backup holds tables Keystone does not have: {sorted(unknown)}")
    for name in tables:
        if not (source / "tables" / f"{name}.jsonl.gz").is_file():
            raise BackupError(f"the backup is incomplete: tables/{name}.jsonl.gz is missing")
    for entry in objects:
        if not (source / entry["file"]).is_file():
            raise BackupError(f"the backup is incomplete: {entry['file']} is missing")
    return manifest


def verify_objects(source: Path, manifest: dict[str, Any], progress: Progress = _quiet) -> None:
    for entry in manifest["objects"]:
        path = source / entry["file"]
        if path.stat().st_size != entry["size"] or _sha256_file(path) != entry["sha256"]:
            raise BackupError(
                f"{entry['file']} (s3://{entry['bucket']}/{entry['key']}) does not match its "
                "checksum: the backup is damaged"
            )
    progress(f"verified {len(manifest['objects'])} objects")


def rows_in_database(engine: Engine) -> dict[str, int]:
    """Keystone tables that hold rows, with their counts."""
    with engine.connect() as conn:
        metadata = _reflect(conn)
        counts = {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in metadata.sorted_tables
        }
    return {name: count for name, count in counts.items() if count}


def restore(
    engine: Engine,
    client: S3Client | None,
    settings: Settings,
    source: Path,
    *,
    force: bool = False,
    database: bool = True,
    progress: Progress = _quiet,
) -> RestoreReport:
    """Restore ``source`` into the database (unless ``database`` is false) and, with
    ``client``, its objects into their buckets."""
    manifest = read_manifest(source)
    if client is not None:
        verify_objects(source, manifest, progress)
    report = RestoreReport(revision=manifest["revision"])
    if database:
        occupied = rows_in_database(engine)
        if occupied and not force:
            sample = ", ".join(f"{n} ({c})" for n, c in sorted(occupied.items())[:5])
            raise BackupError(
                f"the target database holds Keystone data ({sample}): restore empties it "
                "only with --force"
            )
        _recreate_schema(engine, settings, manifest["revision"], progress)
        report.tables = _load_tables(engine, source, manifest, progress)
        migrate.upgrade(engine, lock_dir=settings.data_dir)
        progress("database migrated to head")
    if client is not None:
        report.objects = _upload_objects(client, source, manifest, progress)
    return report


def _recreate_schema(engine: Engine, settings: Settings, revision: str, progress: Progress) -> None:
    with engine.begin() as conn:
        metadata = _reflect(conn)
        if conn.dialect.name in {"mysql", "mariadb"}:
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=0")
        metadata.drop_all(conn)
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        if conn.dialect.name in {"mysql", "mariadb"}:
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=1")
    migrate.upgrade(engine, lock_dir=settings.data_dir, revision=revision)
    progress(f"schema created at revision {revision}")


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _load_tables(
    engine: Engine, source: Path, manifest: dict[str, Any], progress: Progress
) -> dict[str, int]:
    counts: dict[str, int] = {}
    expected: dict[str, int] = manifest["tables"]
    with engine.begin() as conn:
        mysql = conn.dialect.name in {"mysql", "mariadb"}
        if mysql:
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=0")
        metadata = _reflect(conn)
        for table in metadata.sorted_tables:
            if table.name not in expected:
                continue
            decoders = {c.name: _decoder(c.type) for c in table.columns}
            batch: list[dict[str, Any]] = []
            count = 0
            for row in _lines(source / "tables" / f"{table.name}.jsonl.gz"):
                batch.append({k: decoders[k](v) for k, v in row.items() if k in decoders})
                if len(batch) >= INSERT_BATCH:
                    conn.execute(table.insert(), batch)
                    count += len(batch)
                    batch = []
            if batch:
                conn.execute(table.insert(), batch)
                count += len(batch)
            if count != expected[table.name]:
                raise BackupError(
                    f"tables/{table.name}.jsonl.gz holds {count} rows, the manifest says "
                    f"{expected[table.name]}: the backup is damaged"
                )
            counts[table.name] = count
            progress(f"table {table.name}: {count} rows")
        if mysql:
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=1")
    return counts


def _upload_objects(
    client: S3Client, source: Path, manifest: dict[str, Any], progress: Progress
) -> int:
    buckets: set[str] = set()
    for number, entry in enumerate(manifest["objects"], start=1):
        if entry["bucket"] not in buckets:
            ensure_bucket(client, entry["bucket"])
            buckets.add(entry["bucket"])
        client.upload_file(str(source / entry["file"]), entry["bucket"], entry["key"])
        if number % 500 == 0:
            progress(f"uploaded {number}/{len(manifest['objects'])} objects")
    progress(f"uploaded {len(manifest['objects'])} objects")
    return len(manifest["objects"])
