"""What the transfer program reports, and the verification that earns an ``upload_ack``.

The ACK makes the device delete its only other copy, so Keystone sends it only after it
has checked the stored objects itself: both keys under the device's own prefix, the size,
the SHA-256 in the message = the object's ``checksum-sha256`` metadata = the sidecar's
``recording.checksum_sha256``, and an MCAP whose footer and summary read back (ranged
reads, never the whole file). Then, in one transaction, the episode is created
(``pending_qa``, one per task) and the batch/order counters move; the task becomes
``completed`` once the ACK has been sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, cast

from botocore.exceptions import BotoCoreError, ClientError
from mcap.reader import make_reader
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from keystone_core import clock, metrics
from keystone_core.models import DeviceUpload, Episode, Task, TaskStatus, TransferStatus
from keystone_core.services import presence
from keystone_core.services.device_tasks import advance_task, device_task, fail_task
from keystone_core.services.devices import DeviceIdentity
from keystone_core.services.production import record_verified_upload
from keystone_core.settings import Settings
from keystone_core.states import TASK
from keystone_core.storage.reader import S3RangeReader

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DEVICE_STATUSES = frozenset(
    {"pending", "active", "retry-wait", "uploaded_wait_ack", "completed", "failed"}
)


def _text(value: Any, limit: int = 2048) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# --- what the device reports ----------------------------------------------------------------


@dataclass(frozen=True)
class Reported:
    """One upload as the device describes it (``upload_complete`` or an ``uploads[]`` entry)."""

    task_id: str
    s3_key: str | None
    file_size_bytes: int | None
    checksum_sha256: str | None
    upload_mode: str = ""
    status: str = ""

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Reported | None:
        task_id = data.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            return None
        key = data.get("s3_key") or data.get("object_key")
        checksum = data.get("checksum_sha256")
        return cls(
            task_id=task_id[:128],
            s3_key=key if isinstance(key, str) else None,
            file_size_bytes=_int(data.get("file_size_bytes")),
            checksum_sha256=checksum.lower() if isinstance(checksum, str) else None,
            upload_mode=_text(data.get("upload_mode"), 16),
            status=_text(data.get("status"), 24),
        )


def _upload(session: Session, device: DeviceIdentity, task_id: str) -> DeviceUpload:
    """The (robot, task) row, locked; created first if missing (two frames may race)."""
    query = (
        select(DeviceUpload)
        .where(col(DeviceUpload.robot_id) == device.robot_id, col(DeviceUpload.task_id) == task_id)
        .with_for_update()
    )
    row = session.exec(query).first()
    if row is not None:
        return row
    row = DeviceUpload(
        robot_id=device.robot_id,
        factory_id=device.factory_id,
        device_id=device.device_id,
        task_id=task_id,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another worker or frame inserted it first (the savepoint's
        # rollback already took our copy out of the session)
        return session.exec(query).one()
    return row


def _apply(row: DeviceUpload, report: Reported) -> bool:
    changed = False
    for name in ("s3_key", "file_size_bytes", "checksum_sha256"):
        value = getattr(report, name)
        if value is not None and getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    if report.upload_mode and row.upload_mode != report.upload_mode:
        row.upload_mode = report.upload_mode
        changed = True
    if report.status in DEVICE_STATUSES and row.status != report.status:
        row.status = report.status
        changed = True
    return changed


def _save(session: Session, row: DeviceUpload) -> None:
    row.updated_at = clock.now()
    session.add(row)
    session.flush()


def on_upload_started(session: Session, device: DeviceIdentity, data: Mapping[str, Any]) -> None:
    """The device queued the upload: the recording is final on the device (``uploading``)."""
    report = Reported.of(data)
    if report is None:
        return
    row = _upload(session, device, report.task_id)
    _apply(row, report)
    if row.status not in DEVICE_STATUSES:
        row.status = "pending"
    _save(session, row)
    task = device_task(session, device, report.task_id)
    if task is not None:
        advance_task(session, task, TaskStatus.UPLOADING)
    _event(session, device, "upload_started", report.task_id, {"s3_key": report.s3_key})


def on_upload_failed(session: Session, device: DeviceIdentity, data: Mapping[str, Any]) -> None:
    """A refused enqueue is retryable; anything else is the device giving up for good."""
    task_id = data.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        return
    reason = _text(data.get("reason")) or "upload failed"
    rejected = reason == "upload enqueue rejected"
    row = _upload(session, device, task_id)
    row.status = "rejected" if rejected else "failed"
    row.last_error = reason
    row.retry_count = _int(data.get("retry_count")) or row.retry_count
    _save(session, row)
    task = device_task(session, device, task_id)
    if task is not None and not rejected:
        # Files sit in the device's failed_uploads_dir; only an operator can recover them.
        fail_task(session, task, f"upload failed on the device: {reason}")
    _event(session, device, "upload_failed", task_id, {"reason": reason, "permanent": not rejected})


def on_upload_not_found(session: Session, device: DeviceIdentity, data: Mapping[str, Any]) -> None:
    """Also the answer for tasks the device already tracks: never read as "file gone"."""
    task_id = data.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        return
    detail = _text(data.get("detail"))
    row = _upload(session, device, task_id)
    row.last_error = detail
    if row.status in ("requested", "not_found", "rejected"):
        # Not tracked by the device (yet): the sentinel may not be ready; ask again later.
        row.status = "not_found"
    # Otherwise the device tracks it already (pending … failed): "not found" means that.
    _save(session, row)
    _event(session, device, "upload_not_found", task_id, {"detail": detail})


def on_local_cleanup_failed(
    session: Session, device: DeviceIdentity, data: Mapping[str, Any]
) -> None:
    task_id = data.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        return
    reason = _text(data.get("reason"))
    row = _upload(session, device, task_id)
    row.last_error = f"local cleanup failed: {reason}"
    _save(session, row)
    _event(session, device, "local_cleanup_failed", task_id, {"reason": reason})


def is_full_status(data: Mapping[str, Any]) -> bool:
    """``status`` has two shapes; the full one carries ``status_counts`` or ``uploads``."""
    return "status_counts" in data or "uploads" in data


def on_status(
    session: Session, device: DeviceIdentity, data: Mapping[str, Any], *, version: str = ""
) -> list[Reported]:
    """Persist what changed in a full status; return the uploads waiting for an ACK."""
    uploads = data.get("uploads") if isinstance(data.get("uploads"), list) else []
    assert isinstance(uploads, list)
    waiting = [t for t in data.get("waiting_ack_task_ids") or [] if isinstance(t, str)]
    failed = [
        str(u.get("task_id"))
        for u in uploads
        if isinstance(u, dict) and u.get("status") == "failed" and u.get("task_id")
    ]
    digest = hashlib.sha256(
        json.dumps(uploads, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    status = session.get(TransferStatus, device.robot_id)
    unchanged = status is not None and status.uploads_digest == digest
    if status is None:
        status = TransferStatus(
            robot_id=device.robot_id,
            factory_id=device.factory_id,
            device_id=device.device_id,
            reported_at=clock.now(),
        )
    counts = data.get("status_counts")
    status.counts = dict(counts) if isinstance(counts, dict) else status.counts
    status.waiting_ack_task_ids = waiting
    status.failed_task_ids = failed
    status.pending_bytes = _int(data.get("pending_bytes")) or 0
    status.bytes_per_sec = _int(data.get("bytes_per_sec")) or 0
    destination = data.get("destination")
    status.destination = dict(destination) if isinstance(destination, dict) else {}
    status.version = version or status.version
    status.uploads_digest = digest
    status.reported_at = clock.now()
    session.add(status)
    session.flush()
    by_task: dict[str, Reported] = {}
    for entry in uploads:
        if isinstance(entry, dict):
            report = Reported.of(entry)
            if report is not None:
                by_task[report.task_id] = report
    if not unchanged:
        _store_reports(session, device, by_task)
    return [by_task.get(t) or Reported(t, None, None, None) for t in waiting]


def _store_reports(session: Session, device: DeviceIdentity, reports: dict[str, Reported]) -> None:
    """Write only the records whose device status or key changed (lists grow forever)."""
    if not reports:
        return
    known = {
        row.task_id: row
        for row in session.exec(
            select(DeviceUpload).where(
                col(DeviceUpload.robot_id) == device.robot_id,
                col(DeviceUpload.task_id).in_(sorted(reports)),
            )
        ).all()
    }
    for task_id, report in reports.items():
        row = known.get(task_id) or DeviceUpload(
            robot_id=device.robot_id,
            factory_id=device.factory_id,
            device_id=device.device_id,
            task_id=task_id,
        )
        if _apply(row, report) or row.id is None:
            _save(session, row)


def _event(
    session: Session,
    device: DeviceIdentity,
    kind: str,
    task_id: str | None,
    data: Mapping[str, Any],
) -> None:
    presence.record_device_event(session, device, kind, task_id, data)


# --- verification ---------------------------------------------------------------------------


@dataclass
class Verification:
    ok: bool
    reason: str = ""
    bucket: str = ""
    mcap_key: str = ""
    sidecar_key: str | None = None
    sidecar: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    checksum: str | None = None
    # The recorder's axon.* metadata records, parsed (axon-protocol.md §8.3).
    axon: dict[str, Any] = field(default_factory=dict)


def parse_axon_metadata(records: dict[str, dict[str, str]]) -> dict[str, Any]:
    """``axon.task`` / ``axon.device`` / ``axon.recording`` / ``axon.topics`` as values:
    JSON-encoded arrays decoded, the zero-padded size as an int (all zeros = unknown)."""
    task = dict(records.get("axon.task", {}))
    recording = dict(records.get("axon.recording", {}))
    out: dict[str, Any] = {
        "task": task,
        "device": dict(records.get("axon.device", {})),
        "recording": recording,
    }
    for section, key in (("task", "skills"), ("recording", "topics_recorded")):
        value = out[section].get(key)
        if isinstance(value, str):
            try:
                out[section][key] = json.loads(value)
            except ValueError:
                out[section][key] = []
    size = recording.get("file_size_bytes")
    if isinstance(size, str):
        out["recording"]["file_size_bytes"] = int(size) if size.isdigit() and int(size) else None
    for key in ("message_count",):
        value = recording.get(key)
        if isinstance(value, str) and value.isdigit():
            out["recording"][key] = int(value)
    topics = records.get("axon.topics", {}).get("topics_summary")
    try:
        out["topics_summary"] = json.loads(topics) if isinstance(topics, str) else []
    except ValueError:
        out["topics_summary"] = []
    return out


def expected_prefix(device: DeviceIdentity) -> str:
    return f"{device.factory_id}/{device.device_id}/"


def check_key(device: DeviceIdentity, task_id: str, key: str | None) -> str | None:
    """Why ``key`` is not ``{factory_id}/{device_id}/{YYYY-MM-DD}/{task_id}.mcap`` (or None)."""
    if not key:
        return "the message names no object key"
    prefix = expected_prefix(device)
    if not key.startswith(prefix):
        return f"object key {key!r} is outside the device's prefix {prefix!r}"
    rest = key[len(prefix) :].split("/")
    if len(rest) != 2 or not _DATE.match(rest[0]) or rest[1] != f"{task_id}.mcap":
        return f"object key {key!r} is not {prefix}YYYY-MM-DD/{task_id}.mcap"
    return None


def verify_objects(
    settings: Settings, s3: S3Client, device: DeviceIdentity, report: Reported
) -> Verification:
    """Check the stored MCAP and sidecar against the message (network only, no database)."""
    bucket = settings.bucket_for_factory(str(device.factory_id))
    problem = check_key(device, report.task_id, report.s3_key)
    if problem:
        return Verification(False, problem, bucket)
    assert report.s3_key is not None
    checksum = report.checksum_sha256
    if checksum is None or not _SHA256.match(checksum):
        return Verification(False, "the message carries no SHA-256", bucket, report.s3_key)
    result = Verification(False, "", bucket, report.s3_key, checksum=checksum)
    try:
        head = s3.head_object(Bucket=bucket, Key=report.s3_key)
    except ClientError as exc:
        result.reason = f"MCAP object not readable: {exc.response.get('Error', {}).get('Code')}"
        return result
    except BotoCoreError as exc:
        result.reason = f"object store unreachable: {exc}"
        return result
    size = int(head["ContentLength"])
    result.size = size
    if report.file_size_bytes is not None and size != report.file_size_bytes:
        result.reason = f"MCAP is {size} bytes in the store, {report.file_size_bytes} reported"
        return result
    stored = str(head.get("Metadata", {}).get("checksum-sha256", "")).lower()
    if stored != checksum:
        result.reason = f"MCAP checksum metadata {stored or 'missing'} ≠ reported {checksum}"
        return result
    if report.upload_mode != "mcap_only":
        sidecar_key = report.s3_key[: -len(".mcap")] + ".json"
        result.sidecar_key = sidecar_key
        problem = _check_sidecar(s3, bucket, sidecar_key, checksum, result)
        if problem:
            result.reason = problem
            return result
    try:
        with S3RangeReader(s3, bucket, report.s3_key, size) as stream:
            reader = make_reader(cast(IO[bytes], stream))
            summary = reader.get_summary()
            # Read through the metadata index: a few ranged reads, never the chunks.
            records = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
    except Exception as exc:  # any parse failure of a device file means "not readable"
        result.reason = f"MCAP footer/summary unreadable: {type(exc).__name__}: {exc}"[:500]
        return result
    if summary is None:
        result.reason = "MCAP has no summary section"
        return result
    result.axon = parse_axon_metadata(records)
    result.ok = True
    return result


def _check_sidecar(
    s3: S3Client, bucket: str, key: str, checksum: str, result: Verification
) -> str | None:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        if int(head["ContentLength"]) > MAX_SIDECAR_BYTES:
            return f"sidecar is larger than {MAX_SIDECAR_BYTES} bytes"
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            raw = body.read()
        finally:
            body.close()
    except ClientError as exc:
        return f"sidecar not readable: {exc.response.get('Error', {}).get('Code')}"
    except BotoCoreError as exc:
        return f"object store unreachable: {exc}"
    try:
        sidecar = json.loads(raw)
    except ValueError:
        return "sidecar is not JSON"
    recording = sidecar.get("recording") if isinstance(sidecar, dict) else None
    if not isinstance(recording, dict):
        return "sidecar has no recording section"
    stated = str(recording.get("checksum_sha256", "")).lower()
    if stated != checksum:
        return f"sidecar checksum {stated or 'missing'} ≠ reported {checksum}"
    result.sidecar = sidecar
    return None


# --- recording the outcome ------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    ack: bool
    reason: str = ""
    episode_id: str | None = None
    # Checked, waiting for the stored object to be re-hashed (KEYSTONE_ACK_VERIFY=sha256).
    pending_hash: bool = False


def record_verification(
    session: Session,
    device: DeviceIdentity,
    report: Reported,
    verification: Verification,
    *,
    rehash: bool,
) -> Decision:
    """Store the outcome of the object checks. With ``rehash`` the episode waits for the
    ``verify_uploads`` job; otherwise it is created now. ``ack`` says whether to ACK now."""
    row = _upload(session, device, report.task_id)
    _apply(row, report)
    if row.status not in DEVICE_STATUSES:
        row.status = "uploaded_wait_ack"
    if not verification.ok:
        row.verify_error = verification.reason[:2048]
        _save(session, row)
        _event(session, device, "upload_rejected", report.task_id, {"reason": verification.reason})
        return Decision(False, verification.reason)
    task = session.exec(
        select(Task).where(col(Task.task_id) == report.task_id, col(Task.deleted_at).is_(None))
    ).first()
    if task is None or task.robot_id != device.robot_id:
        row.verify_error = "no such task on this device"
        _save(session, row)
        _event(session, device, "upload_rejected", report.task_id, {"reason": row.verify_error})
        return Decision(False, row.verify_error)
    recording = verification.sidecar.get("recording", {}) if verification.sidecar else {}
    row.bucket = verification.bucket
    row.sidecar_key = verification.sidecar_key
    row.recording_started_at = _parse_time(recording.get("recording_started_at"))
    row.duration_sec = _float(recording.get("duration_sec"))
    row.file_size_bytes = verification.size
    row.checksum_sha256 = verification.checksum
    row.checked_at = row.checked_at or clock.now()
    row.axon_metadata = verification.axon
    row.verify_error = ""
    if task.status in (TaskStatus.CANCELLED, TaskStatus.FAILED):
        # Checked and kept for ops to decide; the device may free its disk.
        row.orphan = True
        row.verified_at = row.verified_at or clock.now()
        _save(session, row)
        _event(session, device, "upload_orphan", report.task_id, {"s3_key": report.s3_key})
        return Decision(True, "task is " + task.status.value)
    if rehash and row.verified_at is None:
        _save(session, row)
        return Decision(False, "waiting for the SHA-256 of the stored object", pending_hash=True)
    _save(session, row)
    episode = finalize(session, row, task)
    return Decision(True, episode_id=episode.episode_id)


def finalize(session: Session, row: DeviceUpload, task: Task | None = None) -> Episode:
    """The upload is verified: its episode (one per task, ``pending_qa``) and the counters."""
    if task is None:
        task = session.exec(
            select(Task).where(col(Task.task_id) == row.task_id, col(Task.robot_id) == row.robot_id)
        ).one()
    assert task.id is not None
    row.verified_at = row.verified_at or clock.now()
    _save(session, row)
    existing = session.exec(select(Episode).where(col(Episode.task_id) == task.id)).first()
    if existing is not None:
        return existing
    assert row.s3_key is not None
    key_date = dt.date.fromisoformat(row.s3_key.split("/")[-2])
    started = row.recording_started_at
    now = clock.now()
    episode = Episode(
        episode_id=f"episode_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}",
        task_id=task.id,
        factory_id=task.factory_id,
        order_id=task.order_id,
        batch_id=task.batch_id,
        robot_id=row.robot_id,
        device_id=row.device_id,
        recording_date=started.date() if started else key_date,
        recording_started_at=started,
        duration_sec=row.duration_sec,
        bucket=row.bucket,
        mcap_path=row.s3_key,
        sidecar_path=row.sidecar_key,
        file_size_bytes=row.file_size_bytes,
        checksum=row.checksum_sha256,
        verified_at=row.verified_at,
        meta={"axon": row.axon_metadata} if row.axon_metadata else {},
    )
    session.add(episode)
    session.flush()
    assert episode.id is not None
    record_verified_upload(session, episode.id)
    return episode


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value >= 0 else None


# --- re-hashing the stored object (the verify_uploads job) ---------------------------------


HASH_CHUNK = 8 * 1024 * 1024


def claim_for_hashing(session: Session, limit: int, lease: dt.timedelta) -> list[DeviceUpload]:
    """Checked uploads still to re-hash, leased to the caller (skip rows others hold)."""
    now = clock.now()
    query = (
        select(DeviceUpload)
        .where(
            col(DeviceUpload.checked_at).is_not(None),
            col(DeviceUpload.verified_at).is_(None),
            col(DeviceUpload.verify_error) == "",
            (col(DeviceUpload.hash_lease_until).is_(None))
            | (col(DeviceUpload.hash_lease_until) < now),
        )
        .order_by(col(DeviceUpload.checked_at))
        .limit(limit)
    )
    if session.get_bind().dialect.name in {"mysql", "mariadb"}:
        query = query.with_for_update(skip_locked=True)
    rows = list(session.exec(query).all())
    for row in rows:
        row.hash_lease_until = now + lease
        session.add(row)
    session.flush()
    return rows


def hash_object(s3: S3Client, bucket: str, key: str) -> tuple[str, int]:
    """SHA-256 and size of a stored object, streamed (never held in memory)."""
    digest = hashlib.sha256()
    size = 0
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        for chunk in iter(lambda: body.read(HASH_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    finally:
        body.close()
    return digest.hexdigest(), size


def complete_hash(session: Session, upload_id: int, digest: str | None, error: str = "") -> bool:
    """Record a re-hash; a match verifies the upload (episode created). True when verified."""
    row = session.exec(
        select(DeviceUpload).where(col(DeviceUpload.id) == upload_id).with_for_update()
    ).one()
    row.hash_lease_until = None
    if row.verified_at is not None:
        _save(session, row)
        return True
    if error or digest != row.checksum_sha256:
        row.verify_error = error or (
            f"stored object SHA-256 {digest} ≠ reported {row.checksum_sha256}"
        )
        _save(session, row)
        presence.record_event(
            session,
            "upload_rejected",
            factory_id=row.factory_id,
            robot_id=row.robot_id,
            device_id=row.device_id,
            task_id=row.task_id,
            data={"reason": row.verify_error},
        )
        return False
    finalize(session, row)
    return True


def verified_unacked(session: Session, robot_ids: list[int]) -> list[tuple[int, str]]:
    """Uploads verified since the last look that the device has not been ACKed for."""
    if not robot_ids:
        return []
    rows = session.exec(
        select(DeviceUpload.robot_id, DeviceUpload.task_id).where(
            col(DeviceUpload.robot_id).in_(robot_ids),
            col(DeviceUpload.verified_at).is_not(None),
            col(DeviceUpload.acked_at).is_(None),
        )
    ).all()
    return [(int(r), str(t)) for r, t in rows]


def unacked(session: Session, device: DeviceIdentity, task_id: str) -> bool:
    """The upload is verified and its ACK has not gone out yet."""
    row = verified_upload(session, device, task_id)
    return row is not None and row.acked_at is None


def verified_upload(session: Session, device: DeviceIdentity, task_id: str) -> DeviceUpload | None:
    return session.exec(
        select(DeviceUpload).where(
            col(DeviceUpload.robot_id) == device.robot_id,
            col(DeviceUpload.task_id) == task_id,
            col(DeviceUpload.verified_at).is_not(None),
        )
    ).first()


def mark_acked(session: Session, device: DeviceIdentity, task_id: str) -> None:
    """The ACK went out: count it, and the task is ``completed`` (verified and ACKed)."""
    row = _upload(session, device, task_id)
    now = clock.now()
    if row.ack_count == 0:
        metrics.observe_ack(row.checked_at, now)
    row.acked_at = now
    row.ack_count += 1
    _save(session, row)
    task = device_task(session, device, task_id)
    if task is not None and task.status not in TASK.final:
        advance_task(session, task, TaskStatus.COMPLETED, upload_acked_at=now)


# --- asking for uploads ---------------------------------------------------------------------

_IN_FLIGHT = ("pending", "active", "retry-wait", "uploaded_wait_ack", "completed", "failed")


def due_upload_requests(
    session: Session, robot_ids: list[int], cooldown: dt.timedelta
) -> list[tuple[int, str]]:
    """(robot id, task id) of ``uploading`` tasks the device should be asked to upload.

    The transfer program uploads nothing on its own; a task whose recording is final on
    the device is asked for, and asked again after ``cooldown`` until the device tracks it.
    """
    if not robot_ids:
        return []
    tasks = session.exec(
        select(Task.robot_id, Task.task_id).where(
            col(Task.robot_id).in_(robot_ids),
            col(Task.status) == TaskStatus.UPLOADING,
            col(Task.deleted_at).is_(None),
        )
    ).all()
    if not tasks:
        return []
    uploads = {
        (u.robot_id, u.task_id): u
        for u in session.exec(
            select(DeviceUpload).where(
                col(DeviceUpload.robot_id).in_(robot_ids),
                col(DeviceUpload.task_id).in_([t for _, t in tasks]),
            )
        ).all()
    }
    now = clock.now()
    due = []
    for robot_id, task_id in tasks:
        assert robot_id is not None
        upload = uploads.get((robot_id, task_id))
        if upload is not None and upload.status in _IN_FLIGHT:
            continue
        if (
            upload is not None
            and upload.request_sent_at
            and now - upload.request_sent_at < cooldown
        ):
            continue
        due.append((robot_id, task_id))
    return due


MAX_UPLOAD_REQUESTS = 10


def mark_requested(session: Session, device: DeviceIdentity, task_id: str) -> None:
    """An upload_request went out; after the last try the upload is flagged for ops."""
    row = _upload(session, device, task_id)
    row.request_sent_at = clock.now()
    row.request_count += 1
    if row.request_count >= MAX_UPLOAD_REQUESTS and row.status in ("requested", "not_found"):
        row.verify_error = (
            f"the device did not find the recording after {row.request_count} upload "
            "requests (sidecar missing in sidecar mode, or the file was removed)"
        )
        _event(session, device, "upload_unfindable", task_id, {"requests": row.request_count})
    _save(session, row)


def known_report(session: Session, device: DeviceIdentity, task_id: str) -> Reported | None:
    """What an earlier message told us about an upload (for a bare waiting-ACK id)."""
    row = session.exec(
        select(DeviceUpload).where(
            col(DeviceUpload.robot_id) == device.robot_id, col(DeviceUpload.task_id) == task_id
        )
    ).first()
    if row is None or row.s3_key is None:
        return None
    return Reported(
        task_id=task_id,
        s3_key=row.s3_key,
        file_size_bytes=row.file_size_bytes,
        checksum_sha256=row.checksum_sha256,
        upload_mode=row.upload_mode,
        status=row.status,
    )
