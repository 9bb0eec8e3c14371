"""Objects in a factory bucket that have no episode: find them one device prefix at a time,
and repair each through the transfer hub's own checks.

A device uploads ``{factory_id}/{device_id}/{YYYY-MM-DD}/{task_id}.mcap`` + ``.json`` and
then tells Keystone over the transfer WebSocket. When that message or its ACK path is lost
(the device crashed, was re-imaged, its status never listed the upload), the object sits
in the bucket with no episode. The scan walks one device's prefix with a cursor, a few
pages per call, never the whole bucket; the repair runs the checks the hub runs and turns a
good object into its task's episode (``pending_qa``, once), or reports it as a device
event. Keystone never rewrites or deletes a device object either way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.errors import DependencyUnavailable, NotFoundError
from keystone_core.models import DeviceEvent, DeviceUpload, Episode, Robot, Task
from keystone_core.services import presence
from keystone_core.services.devices import DeviceIdentity, identity_of, live_device
from keystone_core.services.uploads import (
    Reported,
    Verification,
    check_key,
    expected_prefix,
    hash_object,
    record_verification,
    verify_objects,
)
from keystone_core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef, ObjectTypeDef

log = logging.getLogger(__name__)

ORPHAN_EVENT = "orphan_object"
# The transfer hub may still be working on an object this young (ACK path, re-hash).
DEFAULT_GRACE = dt.timedelta(minutes=10)
# ListObjectsV2 returns at most 1000 keys a page; a device rarely records more in a day.
DEFAULT_PAGE_SIZE = 1000
DEFAULT_MAX_PAGES = 2
DEFAULT_MAX_ORPHANS = 100
_MCAP = ".mcap"
# The reason verify_objects gives when it could not reach the store (not the object's fault).
_STORE_UNREACHABLE = "object store unreachable"
_GONE = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})


class OrphanOutcome(StrEnum):
    REPAIRED = "repaired"  # the checks passed: the task's episode exists now
    REJECTED = "rejected"  # a check failed, or the object is not what its key says
    UNKNOWN_TASK = "unknown_task"  # no such task, or a task of another device
    KNOWN = "known"  # not an orphan (any more): an episode or a verdict exists already


@dataclass(frozen=True)
class PrefixScan:
    """One call's walk of a device prefix: the orphans found and where to resume."""

    prefix: str
    cursor: str
    orphans: list[str] = field(default_factory=list)
    listed: int = 0
    pages: int = 0
    # A young object stopped the walk (it is looked at again once older than the grace).
    stopped_at_young: bool = False


@dataclass(frozen=True)
class OrphanRepair:
    key: str
    outcome: OrphanOutcome
    reason: str = ""
    episode_id: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "key": self.key,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "episode_id": self.episode_id,
        }


# --- which keys are orphans -----------------------------------------------------------------


def _task_id_of(key: str) -> str:
    """The task id an object key names: the file stem (``…/{task_id}.mcap``)."""
    return key.rsplit("/", 1)[-1].removesuffix(_MCAP)


def _known_keys(
    session: Session,
    device: DeviceIdentity,
    bucket: str,
    keys: Sequence[str],
    *,
    count_reports: bool,
) -> dict[str, str]:
    """The keys among ``keys`` that are not orphans, each with why (three indexed lookups).

    Known: an episode at that key; an upload row for that key the hub verified, rejected or
    still re-hashes. With ``count_reports``, also a key an ``orphan_object`` event reported
    already (so a key the repair could not settle is reported once, not every tick).
    """
    if not keys:
        return {}
    task_ids = sorted({_task_id_of(k) for k in keys})
    known: dict[str, str] = {}
    wanted = set(keys)
    episodes = session.exec(
        select(Episode.episode_id, Episode.bucket, Episode.mcap_path)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .where(col(Task.task_id).in_(task_ids))
    ).all()
    for episode_id, episode_bucket, path in episodes:
        if episode_bucket == bucket and path in wanted:
            known[path] = f"episode {episode_id}"
    uploads = session.exec(
        select(DeviceUpload).where(
            col(DeviceUpload.robot_id) == device.robot_id,
            col(DeviceUpload.task_id).in_(task_ids),
        )
    ).all()
    for row in uploads:
        if row.s3_key not in wanted or row.s3_key in known:
            continue
        if row.verified_at is not None and row.orphan:
            known[row.s3_key] = "upload verified; its task was cancelled or failed (no episode)"
        elif row.verified_at is not None:
            known[row.s3_key] = "upload verified"
        elif row.verify_error:
            known[row.s3_key] = f"upload rejected: {row.verify_error}"
        elif row.checked_at is not None:
            known[row.s3_key] = "upload checked, waiting for the re-hash (verify_uploads)"
    if count_reports:
        events = session.exec(
            select(DeviceEvent.data).where(
                col(DeviceEvent.kind) == ORPHAN_EVENT,
                col(DeviceEvent.robot_id) == device.robot_id,
                col(DeviceEvent.task_id).in_([t[:128] for t in task_ids]),
            )
        ).all()
        for data in events:
            key = data.get("s3_key") if isinstance(data, dict) else None
            if isinstance(key, str) and key in wanted and key not in known:
                known[key] = f"reported already: {data.get('outcome')}"
    return known


def _resume_after(prefix: str, cursor: str) -> str:
    """Where a walk starts: the start of the cursor's date directory, so keys that arrived
    late in that day (a task created earlier, recorded later) are still seen."""
    if not cursor.startswith(prefix) or cursor == prefix:
        return prefix
    rest = cursor[len(prefix) :]
    if "/" not in rest:
        return cursor
    return prefix + rest.split("/", 1)[0] + "/"


def _list_page(
    s3: S3Client, bucket: str, prefix: str, after: str, size: int
) -> tuple[list[ObjectTypeDef], bool]:
    try:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, StartAfter=after, MaxKeys=size)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
            return [], False  # nothing uploaded to this factory yet
        raise
    return list(page.get("Contents", [])), bool(page.get("IsTruncated"))


def find_orphans(
    session: Session,
    settings: Settings,
    s3: S3Client,
    device: DeviceIdentity,
    cursor: str = "",
    *,
    grace: dt.timedelta = DEFAULT_GRACE,
    page_size: int = DEFAULT_PAGE_SIZE,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_orphans: int = DEFAULT_MAX_ORPHANS,
) -> PrefixScan:
    """List ONE device's prefix from ``cursor`` and return its ``.mcap`` keys without an
    episode or a verdict, with the cursor to resume from.

    At most ``max_pages`` ListObjectsV2 calls of ``page_size`` keys. The walk restarts at
    the cursor's date directory (one page of it is re-read for late keys, then it jumps
    past the cursor) and stops before the first object younger than ``grace`` and after
    ``max_orphans`` orphans: the cursor never passes an object the hub may still settle,
    nor an orphan the caller was not given.
    """
    if page_size < 1 or max_pages < 1 or max_orphans < 1:
        raise ValueError("page_size, max_pages and max_orphans must be at least 1")
    bucket = settings.bucket_for_factory(str(device.factory_id))
    prefix = expected_prefix(device)
    cursor = cursor if cursor.startswith(prefix) else ""
    horizon = clock.now() - grace
    after = _resume_after(prefix, cursor)
    new_cursor, orphans, listed, pages, young = cursor, [], 0, 0, False
    while pages < max_pages:
        objects, truncated = _list_page(s3, bucket, prefix, after, page_size)
        pages += 1
        listed += len(objects)
        ripe: list[str] = []
        for obj in objects:
            if clock.as_utc(obj["LastModified"]) > horizon:
                young = True
                break
            ripe.append(obj["Key"])
        candidates = [k for k in ripe if k.endswith(_MCAP)]
        known = _known_keys(session, device, bucket, candidates, count_reports=True)
        full = False
        for key in ripe:
            new_cursor = max(new_cursor, key)
            if key.endswith(_MCAP) and key not in known:
                orphans.append(key)
                if len(orphans) >= max_orphans:
                    full = True
                    break
        if young or full or not truncated or not objects:
            break
        # After the one page of the cursor's day, continue behind the cursor.
        after = max(objects[-1]["Key"], cursor)
    return PrefixScan(prefix, new_cursor, orphans, listed, pages, young)


# --- the sensor's round-robin cursor --------------------------------------------------------


def scannable_devices(session: Session) -> list[DeviceIdentity]:
    """Live robots, by id: each owns one prefix ``{factory_id}/{device_id}/``."""
    robots = session.exec(
        select(Robot)
        .where(col(Robot.deleted_at).is_(None), col(Robot.device_id) != "")
        .order_by(col(Robot.id))
    ).all()
    return [identity_of(r) for r in robots]


def parse_cursor(text: str | None) -> dict[str, str]:
    """``{device_prefix: last_key}``; anything unreadable starts every prefix over."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        log.warning("orphan scan cursor is not JSON; starting over")
        return {}
    if not isinstance(value, dict):
        log.warning("orphan scan cursor is not an object; starting over")
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def scan_order(
    devices: Iterable[DeviceIdentity], cursor: Mapping[str, str]
) -> list[DeviceIdentity]:
    """Round-robin: devices never scanned first (by robot id), then least recently scanned.

    The cursor's key order is the scan order: :func:`advance_cursor` moves a prefix to the
    end, so JSON object order (which ``json`` keeps) records who is next.
    """
    by_prefix = {expected_prefix(d): d for d in devices}
    fresh = [d for p, d in by_prefix.items() if p not in cursor]
    return fresh + [by_prefix[p] for p in cursor if p in by_prefix]


def advance_cursor(cursor: Mapping[str, str], prefix: str, last_key: str) -> dict[str, str]:
    """The cursor with ``prefix`` at ``last_key``, moved to the end (scanned most recently)."""
    out = {p: k for p, k in cursor.items() if p != prefix}
    out[prefix] = last_key
    return out


def drop_gone(cursor: Mapping[str, str], devices: Iterable[DeviceIdentity]) -> dict[str, str]:
    """The cursor without prefixes of robots that are no longer live."""
    live = {expected_prefix(d) for d in devices}
    return {p: k for p, k in cursor.items() if p in live}


# --- repair ---------------------------------------------------------------------------------


def _device_of(session: Session, key: str) -> DeviceIdentity | str:
    """The live robot whose prefix holds ``key``, or why there is none."""
    parts = key.split("/")
    if len(parts) < 3 or not (parts[0].isascii() and parts[0].isdigit()) or not parts[1]:
        return f"{key!r} is not under a device prefix {{factory_id}}/{{device_id}}/"
    try:
        device = live_device(session, parts[1])
    except NotFoundError:
        return f"no live robot has device id {parts[1]!r}"
    if device.factory_id != int(parts[0]):
        return f"device {device.device_id} belongs to factory {device.factory_id}, not {parts[0]}"
    return device


def _report(
    session: Session, device: DeviceIdentity, bucket: str, result: OrphanRepair
) -> OrphanRepair:
    presence.record_device_event(
        session,
        device,
        ORPHAN_EVENT,
        _task_id_of(result.key)[:128],
        {
            "s3_key": result.key,
            "bucket": bucket,
            "outcome": result.outcome.value,
            "reason": result.reason[:2048],
            "episode_id": result.episode_id,
        },
    )
    session.flush()
    return result


def _head(s3: S3Client, bucket: str, key: str) -> HeadObjectOutputTypeDef | None:
    """The object's HEAD, or None when it is not there.

    Only "not there" is a verdict; any other refusal (credentials, policy) raises, so the
    key is tried again later rather than reported as bad.
    """
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in _GONE:
            return None
        raise


def _check(
    settings: Settings, s3: S3Client, device: DeviceIdentity, report: Reported
) -> Verification:
    """The hub's checks, plus the re-hash ``KEYSTONE_ACK_VERIFY=sha256`` asks for: the hub
    leaves it to the verify_uploads job; here it is done at once (this runs in a job)."""
    verification = verify_objects(settings, s3, device, report)
    if not verification.ok and verification.reason.startswith(_STORE_UNREACHABLE):
        # Not a verdict on the object: fail the run (retried) rather than reject it for good.
        raise DependencyUnavailable(verification.reason)
    if verification.ok and settings.ack_verify == "sha256":
        assert report.s3_key is not None
        digest, size = hash_object(s3, verification.bucket, report.s3_key)
        if digest != report.checksum_sha256 or size != verification.size:
            verification.ok = False
            verification.reason = (
                f"stored object SHA-256 {digest} ({size} bytes) ≠ its metadata "
                f"{report.checksum_sha256} ({verification.size} bytes)"
            )
    return verification


def repair_orphan(session: Session, settings: Settings, s3: S3Client, key: str) -> OrphanRepair:
    """Settle one object without an episode; idempotent (a second call answers ``known``).

    A key under a live device's prefix, named for a task of that device, goes through the
    transfer hub's checks (:func:`verify_objects`, re-hash, :func:`record_verification`):
    a good object becomes the task's episode in ``pending_qa``; a bad one is recorded as a
    rejected upload (``device_uploads.verify_error``). Every outcome but ``known`` is also a
    device event ``orphan_object``. The object itself is never modified.

    The checks read the object store while this session is open, but take no row lock
    before :func:`record_verification`.
    """
    found = _device_of(session, key)
    if isinstance(found, str):
        return OrphanRepair(key, OrphanOutcome.REJECTED, found)
    device = found
    bucket = settings.bucket_for_factory(str(device.factory_id))
    task_id = _task_id_of(key)
    known = _known_keys(session, device, bucket, [key], count_reports=False)
    if key in known:
        episode = _episode_at(session, bucket, key, task_id)
        return OrphanRepair(key, OrphanOutcome.KNOWN, known[key], episode)
    problem = check_key(device, task_id, key)
    if problem:
        return _report(session, device, bucket, OrphanRepair(key, OrphanOutcome.REJECTED, problem))
    task = session.exec(
        select(Task).where(col(Task.task_id) == task_id, col(Task.deleted_at).is_(None))
    ).first()
    if task is None or task.robot_id != device.robot_id:
        reason = (
            f"no task {task_id}"
            if task is None
            else f"task {task_id} is assigned to {_owner(session, task)}, not {device.device_id}"
        )
        return _report(
            session, device, bucket, OrphanRepair(key, OrphanOutcome.UNKNOWN_TASK, reason)
        )
    clash = _clash(session, device, bucket, task, key)
    if clash:
        return _report(session, device, bucket, OrphanRepair(key, OrphanOutcome.REJECTED, clash))
    head = _head(s3, bucket, key)
    if head is None:  # nothing to record against the task's upload: it may still arrive
        gone = OrphanRepair(key, OrphanOutcome.REJECTED, "the object is gone")
        return _report(session, device, bucket, gone)
    checksum = str(head.get("Metadata", {}).get("checksum-sha256", "")).lower() or None
    # Sidecar mode is required by the templates, so the sidecar is checked as well.
    report = Reported(task_id, key, int(head["ContentLength"]), checksum, upload_mode="mcap_json")
    if checksum is None:
        reason = "the object carries no checksum-sha256 metadata"
        verification = Verification(False, reason, bucket, key)
    else:
        verification = _check(settings, s3, device, report)
    decision = record_verification(session, device, report, verification, rehash=False)
    if decision.episode_id:
        result = OrphanRepair(key, OrphanOutcome.REPAIRED, "checks passed", decision.episode_id)
    elif decision.ack:  # the task was cancelled or failed meanwhile: kept, no episode
        result = OrphanRepair(
            key, OrphanOutcome.REJECTED, f"{decision.reason}: kept as an orphan upload"
        )
    else:
        result = OrphanRepair(key, OrphanOutcome.REJECTED, decision.reason)
    return _report(session, device, bucket, result)


def _episode_at(session: Session, bucket: str, key: str, task_id: str) -> str | None:
    return session.exec(
        select(Episode.episode_id)
        .join(Task, col(Task.id) == col(Episode.task_id))
        .where(
            col(Task.task_id) == task_id,
            col(Episode.bucket) == bucket,
            col(Episode.mcap_path) == key,
        )
    ).first()


def _owner(session: Session, task: Task) -> str:
    if task.robot_id is None:
        return "no robot"
    robot = session.get(Robot, task.robot_id)
    return robot.device_id if robot is not None else f"robot {task.robot_id}"


def _clash(
    session: Session, device: DeviceIdentity, bucket: str, task: Task, key: str
) -> str | None:
    """Why ``key`` cannot be the task's upload: the task has one under another key."""
    episode = session.exec(select(Episode).where(col(Episode.task_id) == task.id)).first()
    if episode is not None:
        return (
            f"task {task.task_id} already has episode {episode.episode_id} "
            f"at s3://{episode.bucket}/{episode.mcap_path}"
        )
    row = session.exec(
        select(DeviceUpload).where(
            col(DeviceUpload.robot_id) == device.robot_id,
            col(DeviceUpload.task_id) == task.task_id,
        )
    ).first()
    if row is not None and row.s3_key not in (None, key):
        return f"the upload of task {task.task_id} is recorded under {row.s3_key}"
    return None


def outcome_counts(results: Iterable[OrphanRepair]) -> dict[str, int]:
    counts = dict.fromkeys((o.value for o in OrphanOutcome), 0)
    for result in results:
        counts[result.outcome.value] += 1
    return counts
