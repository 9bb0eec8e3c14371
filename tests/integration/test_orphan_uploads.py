"""Objects in a factory bucket without an episode are found one device prefix at a time and
repaired through the transfer hub's checks; on MariaDB with a real S3 server."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    Failure,
    RunRequest,
    SkipReason,
    build_op_context,
    build_sensor_context,
)
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.db import session_scope
from keystone_core.models import (
    DeviceEvent,
    DeviceUpload,
    Episode,
    EpisodeStatus,
    Order,
    Task,
    TaskStatus,
)
from keystone_core.services.devices import DeviceIdentity, identity_of
from keystone_core.services.orphans import (
    ORPHAN_EVENT,
    OrphanOutcome,
    OrphanRepair,
    PrefixScan,
    find_orphans,
    parse_cursor,
    repair_orphan,
)
from keystone_core.settings import Settings
from keystone_core.simulation.episodes import EpisodeSpec, generate
from keystone_core.storage import EmbeddedS3Server, create_s3_client, ensure_bucket
from keystone_pipelines.defs import orphans as orphan_defs
from keystone_pipelines.defs.orphans import (
    OP_NAME,
    RepairOrphanUploadsConfig,
    orphan_upload_sensor,
    repair_orphan_uploads,
    repair_orphan_uploads_op,
    repair_run_config,
)
from keystone_pipelines.resources import KeystoneDatabase
from tests.conftest import make_settings
from tests.factories import make_batch, make_factory, make_robot, make_robot_type, make_task
from tests.support.s3 import s3_settings_overrides

pytestmark = pytest.mark.integration

DAY = "2026-01-15"
GRACE = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Site:
    bucket: str
    device: DeviceIdentity  # robot A: the device whose prefix is walked
    other: DeviceIdentity  # robot B, same factory and bucket
    task_id: str  # a task of A, its recording final on the device (uploading)
    other_task_id: str  # a task of B
    order_id: int


@pytest.fixture
def config(tmp_path: Path, mariadb_migrated: str, s3_server: EmbeddedS3Server) -> Settings:
    return make_settings(
        tmp_path, database_url=mariadb_migrated, **s3_settings_overrides(s3_server)
    )


@pytest.fixture
def s3(config: Settings) -> Any:
    return create_s3_client(config)


@pytest.fixture
def site(mariadb_engine: Engine, config: Settings, s3: Any) -> Site:
    with Session(mariadb_engine, expire_on_commit=False) as session:
        factory = make_factory(session)
        robot_type = make_robot_type(session)
        robot_a = make_robot(session, factory_id=factory.id, robot_type_id=robot_type.id)
        robot_b = make_robot(session, factory_id=factory.id, robot_type_id=robot_type.id)
        batch = make_batch(session, factory_id=factory.id)
        task_a = make_task(
            session, batch_id=batch.id, robot_id=robot_a.id, status=TaskStatus.UPLOADING
        )
        task_b = make_task(
            session, batch_id=batch.id, robot_id=robot_b.id, status=TaskStatus.UPLOADING
        )
        session.commit()
    bucket = config.bucket_for_factory(str(factory.id))
    ensure_bucket(s3, bucket)
    return Site(
        bucket=bucket,
        device=identity_of(robot_a),
        other=identity_of(robot_b),
        task_id=task_a.task_id,
        other_task_id=task_b.task_id,
        order_id=batch.order_id,
    )


@pytest.fixture
def listings(s3: Any) -> list[dict[str, Any]]:
    """Every ListObjectsV2 call's parameters, as sent."""
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))

    s3.meta.events.register("provide-client-params.s3.ListObjectsV2", record)
    return calls


@contextmanager
def later(minutes: float = 60) -> Iterator[None]:
    """The clock ``minutes`` after the objects just uploaded (they are that old then)."""
    with clock.frozen(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)):
        yield


KEEP = object()


def put_recording(
    s3: Any,
    site: Site,
    task_id: str,
    tmp_path: Path,
    *,
    device: DeviceIdentity | None = None,
    day: str = DAY,
    checksum: object = KEEP,
    sidecar: bool = True,
    tamper: Callable[[bytes], bytes] | None = None,
    faults: frozenset[str] = frozenset(),
) -> str:
    """Upload a real Axon episode the way axon-transfer does: MCAP with its SHA-256 in the
    ``checksum-sha256`` metadata, then the JSON sidecar. Returns the MCAP key.

    ``tamper`` changes the stored bytes after the checksums were taken.
    """
    device = device or site.device
    spec = EpisodeSpec(task_id=task_id, device_id=device.device_id, duration_s=0.3, faults=faults)
    episode = generate(spec, tmp_path / f"{device.device_id}-{task_id}-{day}")
    key = f"{device.factory_id}/{device.device_id}/{day}/{task_id}.mcap"
    stated = episode.sha256 if checksum is KEEP else checksum
    raw = episode.mcap_path.read_bytes()
    s3.put_object(
        Bucket=site.bucket,
        Key=key,
        Body=raw if tamper is None else tamper(raw),
        Metadata={"checksum-sha256": stated} if stated else {},
    )
    if sidecar:
        s3.put_object(
            Bucket=site.bucket, Key=key[:-5] + ".json", Body=episode.sidecar_path.read_bytes()
        )
    return key


def scan(
    engine: Engine, config: Settings, s3: Any, device: DeviceIdentity, cursor: str = "", **kw: Any
) -> PrefixScan:
    with Session(engine) as session:
        return find_orphans(session, config, s3, device, cursor, **kw)


def repair(engine: Engine, config: Settings, s3: Any, key: str) -> OrphanRepair:
    with session_scope(engine) as session:
        return repair_orphan(session, config, s3, key)


def episodes(engine: Engine) -> list[Episode]:
    with Session(engine) as session:
        return list(session.exec(select(Episode)).all())


def orphan_events(engine: Engine) -> list[DeviceEvent]:
    with Session(engine) as session:
        return list(
            session.exec(select(DeviceEvent).where(col(DeviceEvent.kind) == ORPHAN_EVENT)).all()
        )


def upload_row(engine: Engine, device: DeviceIdentity, task_id: str) -> DeviceUpload | None:
    with Session(engine) as session:
        return session.exec(
            select(DeviceUpload).where(
                col(DeviceUpload.robot_id) == device.robot_id,
                col(DeviceUpload.task_id) == task_id,
            )
        ).first()


def modified(s3: Any, site: Site, key: str) -> dt.datetime:
    return s3.head_object(Bucket=site.bucket, Key=key)["LastModified"]  # type: ignore[no-any-return]


def etag(s3: Any, site: Site, key: str) -> str:
    return str(s3.head_object(Bucket=site.bucket, Key=key)["ETag"])


# --- repair -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ack_verify", ["metadata", "sha256"])
def test_an_orphan_of_its_devices_task_becomes_exactly_one_pending_qa_episode(
    ack_verify: str,
    tmp_path: Path,
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    s3: Any,
    site: Site,
) -> None:
    config = make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        ack_verify=ack_verify,
        **s3_settings_overrides(s3_server),
    )
    key = put_recording(s3, site, site.task_id, tmp_path)
    with later():
        found = scan(mariadb_engine, config, s3, site.device)
        assert found.orphans == [key]
        first = repair(mariadb_engine, config, s3, key)
        second = repair(mariadb_engine, config, s3, key)
        again = scan(mariadb_engine, config, s3, site.device, found.cursor)

    assert first.outcome is OrphanOutcome.REPAIRED
    assert first.episode_id
    assert second.outcome is OrphanOutcome.KNOWN
    assert second.episode_id == first.episode_id
    assert again.orphans == []
    [episode] = episodes(mariadb_engine)
    assert episode.episode_id == first.episode_id
    assert episode.status == EpisodeStatus.PENDING_QA
    assert (episode.bucket, episode.mcap_path) == (site.bucket, key)
    assert episode.sidecar_path == key[:-5] + ".json"
    assert episode.device_id == site.device.device_id
    row = upload_row(mariadb_engine, site.device, site.task_id)
    assert row is not None
    assert row.verified_at is not None
    assert row.verify_error == ""
    with Session(mariadb_engine) as session:
        order = session.get(Order, site.order_id)
        assert order is not None
        assert order.episode_count == 1
    [event] = orphan_events(mariadb_engine)
    assert event.data["outcome"] == "repaired"
    assert event.data["s3_key"] == key


@pytest.mark.parametrize("whose", ["no_task", "other_device"])
def test_an_object_of_a_task_the_device_does_not_have_is_reported_once_and_left_alone(
    whose: str,
    tmp_path: Path,
    mariadb_engine: Engine,
    config: Settings,
    s3: Any,
    site: Site,
) -> None:
    task_id = "task_never_created" if whose == "no_task" else site.other_task_id
    key = put_recording(s3, site, task_id, tmp_path)
    before = etag(s3, site, key)
    with later():
        found = scan(mariadb_engine, config, s3, site.device)
        assert found.orphans == [key]
        result = repair(mariadb_engine, config, s3, key)
        again = scan(mariadb_engine, config, s3, site.device, found.cursor)

    assert result.outcome is OrphanOutcome.UNKNOWN_TASK
    assert result.episode_id is None
    expected = (
        f"no task {task_id}"
        if whose == "no_task"
        else f"assigned to {site.other.device_id}, not {site.device.device_id}"
    )
    assert expected in result.reason
    assert episodes(mariadb_engine) == []
    [event] = orphan_events(mariadb_engine)
    assert (event.device_id, event.task_id) == (site.device.device_id, task_id)
    assert event.data["outcome"] == "unknown_task"
    assert expected in event.data["reason"]
    assert again.orphans == []  # reported once, not every tick
    assert etag(s3, site, key) == before  # never rewritten or deleted
    # The other device's own upload record is untouched.
    assert upload_row(mariadb_engine, site.other, task_id) is None


def _flip_a_data_byte(raw: bytes) -> bytes:
    """The same length, summary and footer intact, one byte of the first chunk changed."""
    data = bytearray(raw)
    data[len(data) // 4] ^= 0xFF
    return bytes(data)


BAD_OBJECTS: dict[str, tuple[dict[str, Any], str]] = {
    "no_checksum_metadata": ({"checksum": ""}, "no checksum-sha256 metadata"),
    "sidecar_disagrees": ({"faults": frozenset({"wrong_checksum"})}, "sidecar checksum"),
    "no_sidecar": ({"sidecar": False}, "sidecar not readable"),
    "not_an_mcap": ({"faults": frozenset({"garbage"})}, "MCAP footer/summary unreadable"),
    # Metadata and sidecar state the real hash: only a re-hash of the stored bytes tells.
    "bytes_differ_from_checksum": ({"tamper": _flip_a_data_byte}, "stored object SHA-256"),
}


@pytest.mark.parametrize("case", sorted(BAD_OBJECTS))
def test_an_object_that_fails_the_hubs_checks_is_rejected_recorded_and_left_alone(
    case: str,
    tmp_path: Path,
    mariadb_engine: Engine,
    config: Settings,
    s3: Any,
    site: Site,
) -> None:
    options, reason = BAD_OBJECTS[case]
    key = put_recording(s3, site, site.task_id, tmp_path, **options)
    before = etag(s3, site, key)
    with later():
        result = repair(mariadb_engine, config, s3, key)
        again = scan(mariadb_engine, config, s3, site.device)

    assert result.outcome is OrphanOutcome.REJECTED
    assert reason in result.reason
    assert episodes(mariadb_engine) == []
    row = upload_row(mariadb_engine, site.device, site.task_id)
    assert row is not None
    assert reason in row.verify_error  # as the hub records a rejected upload
    assert row.s3_key == key
    assert row.verified_at is None
    [event] = orphan_events(mariadb_engine)
    assert event.data["outcome"] == "rejected"
    assert again.orphans == []  # a verdict: not reported again
    assert etag(s3, site, key) == before


def test_an_upload_for_a_cancelled_task_is_kept_without_an_episode(
    tmp_path: Path, mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    with Session(mariadb_engine) as session:
        task = make_task(
            session,
            batch_id=_batch_of(session, site.task_id),
            robot_id=site.device.robot_id,
            status=TaskStatus.CANCELLED,
        )
        session.commit()
        task_id = task.task_id
    key = put_recording(s3, site, task_id, tmp_path)
    with later():
        result = repair(mariadb_engine, config, s3, key)
        again = scan(mariadb_engine, config, s3, site.device)
    assert result.outcome is OrphanOutcome.REJECTED
    assert "task is cancelled" in result.reason
    assert episodes(mariadb_engine) == []
    row = upload_row(mariadb_engine, site.device, task_id)
    assert row is not None
    assert row.orphan
    assert again.orphans == []


def _batch_of(session: Session, task_id: str) -> int:
    task = session.exec(select(Task).where(col(Task.task_id) == task_id)).one()
    return task.batch_id


def test_a_second_object_of_a_task_that_has_its_episode_is_reported_not_merged(
    tmp_path: Path, mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    first = put_recording(s3, site, site.task_id, tmp_path)
    second = put_recording(s3, site, site.task_id, tmp_path, day="2026-01-16")
    with later():
        assert repair(mariadb_engine, config, s3, first).outcome is OrphanOutcome.REPAIRED
        found = scan(mariadb_engine, config, s3, site.device)
        assert found.orphans == [second]
        result = repair(mariadb_engine, config, s3, second)
        again = scan(mariadb_engine, config, s3, site.device)
    assert result.outcome is OrphanOutcome.REJECTED
    assert "already has episode" in result.reason
    [episode] = episodes(mariadb_engine)
    assert episode.mcap_path == first
    row = upload_row(mariadb_engine, site.device, site.task_id)
    assert row is not None
    assert row.s3_key == first  # the verified upload record is not rewritten
    assert again.orphans == []


def test_bad_keys_in_a_repair_run_are_rejected_and_nothing_is_touched(
    mariadb_engine: Engine, site: Site, resource: KeystoneDatabase
) -> None:
    prefix = f"{site.device.factory_id}/{site.device.device_id}/"
    bad = {
        "no-prefix.mcap": "not under a device prefix",
        "x/y/2026-01-15/t.mcap": "not under a device prefix",
        f"{site.device.factory_id}/nobody/{DAY}/t.mcap": "no live robot",
        f"{site.device.factory_id + 1}/{site.device.device_id}/{DAY}/t.mcap": "belongs to factory",
        f"{prefix}{DAY}/{site.task_id}.json": "is not",
        f"{prefix}not-a-date/{site.task_id}.mcap": "is not",
        f"{prefix}{DAY}/deeper/{site.task_id}.mcap": "is not",
        f"{prefix}{DAY}/{site.task_id}.mcap": "the object is gone",
    }
    keys = [*bad, "no-prefix.mcap"]  # a duplicate is repaired once
    with DagsterInstance.ephemeral() as instance:
        result = repair_orphan_uploads.execute_in_process(
            run_config=repair_run_config(keys), instance=instance, resources={"database": resource}
        )
    assert result.success
    assert result.output_for_node(OP_NAME) == 0
    [output] = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata: dict[str, Any] = {k: v.value for k, v in output.step_output_data.metadata.items()}
    assert metadata["rejected"] == len(bad)
    assert metadata["repaired"] == 0
    assert metadata["errors"] == 0
    rows = metadata["results"]
    assert [r["key"] for r in rows] == list(bad)
    for row in rows:
        assert bad[row["key"]] in row["reason"], row
    assert "| key | outcome | reason | episode |" in metadata["table"]
    assert episodes(mariadb_engine) == []
    assert upload_row(mariadb_engine, site.device, site.task_id) is None
    # Only keys under a live device's prefix are reported to that device's feed.
    assert len(orphan_events(mariadb_engine)) == 4


# --- the walk -------------------------------------------------------------------------------


def test_a_young_object_stops_the_cursor_until_it_is_older_than_the_grace(
    tmp_path: Path, mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    key = put_recording(s3, site, site.task_id, tmp_path)
    uploaded = s3.head_object(Bucket=site.bucket, Key=key)["LastModified"]
    with clock.frozen(uploaded + GRACE - dt.timedelta(seconds=30)):
        young = scan(mariadb_engine, config, s3, site.device)
    assert young.orphans == []
    assert young.stopped_at_young
    assert young.cursor == ""  # the sidecar and the MCAP are both still ahead
    with clock.frozen(uploaded + GRACE + dt.timedelta(seconds=30)):
        ripe = scan(mariadb_engine, config, s3, site.device, young.cursor)
    assert ripe.orphans == [key]
    assert ripe.cursor == key
    assert not ripe.stopped_at_young


def test_the_cursor_stops_before_the_first_young_object_and_passes_older_ones(
    tmp_path: Path, mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    old = put_recording(s3, site, "task_a_old", tmp_path)
    old_at = max(modified(s3, site, old), modified(s3, site, old[:-5] + ".json"))
    # A later day's recording, stored at least one store-clock tick after the first.
    deadline = time.monotonic() + 10
    while True:
        young = put_recording(s3, site, "task_b_new", tmp_path, day="2026-01-16")
        young_at = min(modified(s3, site, young), modified(s3, site, young[:-5] + ".json"))
        if young_at > old_at or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert young_at > old_at
    # The first object is just older than the grace, the second not yet.
    with clock.frozen(old_at + GRACE + (young_at - old_at) / 2):
        first = scan(mariadb_engine, config, s3, site.device)
    assert first.orphans == [old]
    assert first.cursor == old
    assert first.stopped_at_young
    with later():
        second = scan(mariadb_engine, config, s3, site.device, first.cursor)
    assert second.orphans == [old, young]  # the old one is not settled: its day is re-read
    assert second.cursor == young
    assert not second.stopped_at_young


def test_a_key_recorded_late_in_the_cursors_day_is_still_found(
    tmp_path: Path, mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    late_task = "task_0_created_first"  # sorts before the key the cursor has passed
    later_key = put_recording(s3, site, "task_9_created_last", tmp_path)
    with later():
        first = scan(mariadb_engine, config, s3, site.device)
        repair(mariadb_engine, config, s3, later_key)  # settled: known from now on
    assert first.cursor == later_key
    late = put_recording(s3, site, late_task, tmp_path)
    assert late < first.cursor
    with later():
        second = scan(mariadb_engine, config, s3, site.device, first.cursor)
    assert second.orphans == [late]
    assert second.cursor == later_key  # never moves backwards


def test_an_object_with_an_episode_or_a_verdict_is_not_reported(
    tmp_path: Path, mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    with Session(mariadb_engine) as session:
        batch_id = _batch_of(session, site.task_id)
        tasks = {
            name: make_task(session, batch_id=batch_id, robot_id=site.device.robot_id).task_id
            for name in ("episode", "rejected", "rehash", "requested", "other_key", "untracked")
        }
        session.commit()
    keys = {name: put_recording(s3, site, task, tmp_path) for name, task in tasks.items()}
    now = clock.now()
    with Session(mariadb_engine) as session:
        rows: dict[str, dict[str, Any]] = {
            "rejected": {"s3_key": keys["rejected"], "verify_error": "sidecar not readable"},
            "rehash": {"s3_key": keys["rehash"], "checked_at": now},  # verify_uploads has it
            # Flagged unfindable after the upload requests: the device never named an object.
            "requested": {"s3_key": None, "verify_error": "the device did not find it"},
            "other_key": {"s3_key": keys["other_key"][:-5] + "-x.mcap", "status": "active"},
        }
        for name, values in rows.items():
            session.add(
                DeviceUpload(
                    robot_id=site.device.robot_id,
                    factory_id=site.device.factory_id,
                    device_id=site.device.device_id,
                    task_id=tasks[name],
                    **values,
                )
            )
        session.commit()
    with later():
        assert repair(mariadb_engine, config, s3, keys["episode"]).outcome == "repaired"
        found = scan(mariadb_engine, config, s3, site.device)
        other = repair(mariadb_engine, config, s3, keys["other_key"])
    assert sorted(found.orphans) == sorted(
        [keys["requested"], keys["other_key"], keys["untracked"]]
    )
    assert other.outcome is OrphanOutcome.REJECTED
    assert "is recorded under" in other.reason


def test_the_walk_never_lists_outside_the_device_prefix(
    tmp_path: Path,
    mariadb_engine: Engine,
    config: Settings,
    s3: Any,
    site: Site,
    listings: list[dict[str, Any]],
) -> None:
    prefix = f"{site.device.factory_id}/{site.device.device_id}/"
    mine = [put_recording(s3, site, f"task_mine_{i}", tmp_path) for i in range(2)]
    theirs = [
        put_recording(s3, site, f"task_theirs_{i}", tmp_path, device=site.other) for i in range(2)
    ]
    cursor, found = "", []
    with later():
        for _ in range(10):
            step = scan(mariadb_engine, config, s3, site.device, cursor, page_size=1, max_pages=3)
            found += [k for k in step.orphans if k not in found]
            assert step.cursor.startswith(prefix)
            if step.cursor == cursor:
                break
            cursor = step.cursor
        # A cursor from another prefix is not followed: the walk starts over in its own.
        stray = scan(mariadb_engine, config, s3, site.device, theirs[-1])
    assert found == mine
    assert stray.orphans == mine
    assert len(listings) > 2
    for call in listings:
        assert call["Prefix"] == prefix
        assert call["StartAfter"].startswith(prefix)


def test_each_call_lists_a_bounded_number_of_pages_and_hands_out_a_bounded_number_of_orphans(
    tmp_path: Path,
    mariadb_engine: Engine,
    config: Settings,
    s3: Any,
    site: Site,
    listings: list[dict[str, Any]],
) -> None:
    keys = [put_recording(s3, site, f"task_{i}", tmp_path) for i in range(3)]
    with later():
        first = scan(mariadb_engine, config, s3, site.device, page_size=2, max_pages=2)
        assert len(listings) == 2
        assert first.orphans == keys[:2]
        assert first.cursor == keys[1]
        capped = scan(mariadb_engine, config, s3, site.device, max_orphans=1)
        assert capped.orphans == keys[:1]
        assert capped.cursor == keys[0]  # the unhanded orphans stay ahead of the cursor
        for key in keys[:2]:
            repair(mariadb_engine, config, s3, key)
        rest = scan(mariadb_engine, config, s3, site.device, first.cursor, page_size=2, max_pages=2)
    assert rest.orphans == keys[2:]
    assert rest.cursor == keys[2]
    with pytest.raises(ValueError, match="at least 1"):
        scan(mariadb_engine, config, s3, site.device, page_size=0)


def test_a_factory_without_a_bucket_has_no_orphans(
    mariadb_engine: Engine, config: Settings, s3: Any, site: Site
) -> None:
    missing = DeviceIdentity(
        robot_id=site.device.robot_id,
        factory_id=site.device.factory_id + 100_000,
        device_id=site.device.device_id,
        robot_type_id=site.device.robot_type_id,
    )
    result = scan(mariadb_engine, config, s3, missing, "")
    assert (result.orphans, result.cursor, result.listed) == ([], "", 0)


# --- Dagster ----------------------------------------------------------------------------------


@pytest.fixture
def resource(mariadb_migrated: str, s3_server: EmbeddedS3Server) -> KeystoneDatabase:
    return KeystoneDatabase(
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )


def tick(resource: KeystoneDatabase, cursor: str | None) -> tuple[RunRequest | SkipReason, str]:
    context = build_sensor_context(cursor=cursor, resources={"database": resource})
    result = orphan_upload_sensor(context)
    assert isinstance(result, RunRequest | SkipReason)
    assert context.cursor is not None
    return result, context.cursor


def test_the_sensor_requests_a_repair_run_that_repairs_the_orphan(
    tmp_path: Path,
    mariadb_engine: Engine,
    s3: Any,
    site: Site,
    resource: KeystoneDatabase,
) -> None:
    key = put_recording(s3, site, site.task_id, tmp_path)
    with later():
        request, cursor = tick(resource, None)
        assert isinstance(request, RunRequest)
        assert request.run_config == repair_run_config([key])
        assert str(request.run_key).startswith("orphans-")
        assert request.tags["keystone/orphans"] == "1"
        assert json.loads(cursor)[f"{site.device.factory_id}/{site.device.device_id}/"] == key
        with DagsterInstance.ephemeral() as instance:
            run = repair_orphan_uploads.execute_in_process(
                run_config=request.run_config,
                instance=instance,
                resources={"database": resource},
            )
        skip, _ = tick(resource, cursor)
    assert run.success
    assert run.output_for_node(OP_NAME) == 1
    [episode] = episodes(mariadb_engine)
    assert episode.mcap_path == key
    assert isinstance(skip, SkipReason)
    assert "scanned 2 of 2 device prefixes" in str(skip.skip_message)


def test_the_sensor_walks_devices_round_robin_and_survives_a_bad_cursor(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3: Any,
    site: Site,
    resource: KeystoneDatabase,
) -> None:
    monkeypatch.setattr(orphan_defs, "PREFIXES_PER_TICK", 1)
    a = f"{site.device.factory_id}/{site.device.device_id}/"
    b = f"{site.other.factory_id}/{site.other.device_id}/"
    theirs = put_recording(s3, site, site.other_task_id, tmp_path, device=site.other)
    with later():
        first, cursor = tick(resource, "not json")
        assert isinstance(first, SkipReason)  # A first (lowest robot id): nothing there
        assert list(parse_cursor(cursor)) == [a]
        second, cursor = tick(resource, cursor)
        assert isinstance(second, RunRequest)
        assert second.run_config == repair_run_config([theirs])
        assert list(parse_cursor(cursor)) == [a, b]
        _, cursor = tick(resource, cursor)
        assert list(parse_cursor(cursor)) == [b, a]  # A again, B waits its turn
        _, cursor = tick(resource, json.dumps({"gone/robot/": "gone/robot/x", b: theirs}))
    assert parse_cursor(cursor) == {b: theirs, a: ""}  # prefixes of no live robot dropped
    assert parse_cursor("[1, 2]") == {}


def test_the_sensor_skips_a_bucket_it_cannot_read_and_keeps_its_cursor(
    tmp_path: Path, s3: Any, site: Site, mariadb_migrated: str, s3_server: EmbeddedS3Server
) -> None:
    put_recording(s3, site, site.task_id, tmp_path)
    refused = KeystoneDatabase(
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key="not-the-secret",
    )
    a = f"{site.device.factory_id}/{site.device.device_id}/"
    start = json.dumps({a: f"{a}{DAY}/"})
    with later():
        result, cursor = tick(refused, start)
    assert isinstance(result, SkipReason)
    assert "scanned 0 of 2 device prefixes, 2 failed" in str(result.skip_message)
    assert parse_cursor(cursor)[a] == f"{a}{DAY}/"


def test_the_repair_op_fails_for_a_retry_when_the_store_refuses_and_records_nothing(
    tmp_path: Path,
    mariadb_engine: Engine,
    mariadb_migrated: str,
    s3_server: EmbeddedS3Server,
    s3: Any,
    site: Site,
) -> None:
    key = put_recording(s3, site, site.task_id, tmp_path)
    refused = KeystoneDatabase(
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key="not-the-secret",
    )
    context = build_op_context(resources={"database": refused})
    with later(), pytest.raises(Failure) as failure:
        repair_orphan_uploads_op(context, RepairOrphanUploadsConfig(object_keys=[key]))
    assert "1 of 1 keys could not be checked" in str(failure.value)
    failed: Any = failure.value.metadata["failed_keys"].value
    assert key in failed
    assert episodes(mariadb_engine) == []
    assert orphan_events(mariadb_engine) == []
    assert upload_row(mariadb_engine, site.device, site.task_id) is None
