"""The transfer channel (axon-protocol.md §5, C-TR/C-S3) against a live API and real S3.

The device side sends the frames of §5.3 as the transfer program serialises them and
uploads the real recorder's MCAP and sidecar (tests/contract/fixtures) with the device's
own prefix-scoped key, the way the uploader does (checksum metadata on the MCAP).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from websockets.asyncio.client import ClientConnection, connect

from keystone_core.storage import create_s3_client_for_endpoint
from tests.contract.capture import FIXTURES
from tests.contract.conftest import Device, LiveApi, register, task_row
from tests.contract.test_recorder_channel import upgrade_status

pytestmark = [pytest.mark.contract, pytest.mark.integration, pytest.mark.anyio]

MCAP = (FIXTURES / "recording" / "task-cap-0001.mcap").read_bytes()
SIDECAR = (FIXTURES / "recording" / "task-cap-0001.json").read_bytes()
CHECKSUM = "d894dea17c95661705fabe9c001828d1b71087d1577ce4b3c3ac53443fe18d5f"


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def frame(kind: str, data: dict[str, Any]) -> str:
    """Device → server envelope: keys sorted, compact (nlohmann's default)."""
    return json.dumps(
        {"data": data, "timestamp": iso_now(), "type": kind}, sort_keys=True, separators=(",", ":")
    )


def status_data(
    device_id: str, uploads: list[dict[str, Any]], waiting: list[str]
) -> dict[str, Any]:
    return {
        "active_count": 0,
        "bytes_per_sec": 0,
        "completed_count": 0,
        "destination": {"bucket": "b", "endpoint_url": "http://s3", "region": "us-east-1"},
        "device_id": device_id,
        "failed_count": 0,
        "pending_bytes": 0,
        "pending_count": 0,
        "progress": {},
        "recovery": {
            "incomplete_count": 0,
            "recovered_count": 0,
            "recovered_from_state": False,
            "state_db_path": "/x",
        },
        "retry_wait_count": 0,
        "status_counts": {
            "active": 0,
            "completed": 0,
            "failed": 0,
            "pending": 0,
            "retry_wait": 0,
            "uploaded_wait_ack": len(waiting),
        },
        "uploading_count": 0,
        "uploads": uploads,
        "version": "0.1.0",
        "waiting_ack_count": len(waiting),
        "waiting_ack_task_ids": waiting,
    }


def upload_entry(task_id: str, key: str, status: str = "uploaded_wait_ack") -> dict[str, Any]:
    return {
        "checksum_sha256": CHECKSUM,
        "completed_at": None,
        "delete_last_error": "",
        "delete_last_error_category": "",
        "delete_next_retry_at": None,
        "delete_retry_count": 0,
        "file_path": f"/axon/recording/{task_id}.mcap",
        "file_size_bytes": len(MCAP),
        "json_path": f"/axon/recording/{task_id}.json",
        "last_error": "",
        "last_error_category": "",
        "next_retry_at": None,
        "object_key": key,
        "retry_count": 0,
        "s3_key": key,
        "status": status,
        "task_id": task_id,
        "updated_at": "2026-11-23T08:06:01Z",
        "upload_mode": "mcap_json",
    }


def complete_data(task_id: str, key: str, checksum: str = CHECKSUM) -> dict[str, Any]:
    return {
        "bytes_uploaded": 0,
        "checksum_sha256": checksum,
        "duration_ms": 0,
        "file_size_bytes": len(MCAP),
        "object_key": key,
        "s3_key": key,
        "status": "uploaded_wait_ack",
        "task_id": task_id,
        "upload_mode": "mcap_json",
    }


class Transfer:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []

    async def send(self, kind: str, data: dict[str, Any]) -> None:
        await self.ws.send(frame(kind, data))

    async def expect(
        self, kind: str, task_id: str | None = None, timeout: float = 8
    ) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            while True:
                got = json.loads(await self.ws.recv())
                self.received.append(got)
                if got.get("type") == kind and (task_id is None or got.get("task_id") == task_id):
                    return dict(got)

        return await asyncio.wait_for(wait(), timeout)

    async def none_of(self, kind: str, task_id: str, seconds: float = 2.5) -> None:
        with contextlib.suppress(TimeoutError):
            await self.expect(kind, task_id, timeout=seconds)
            raise AssertionError(f"unexpected {kind} for {task_id}")


@pytest.fixture
async def transfer(live_api: LiveApi, device: Device) -> AsyncIterator[Transfer]:
    url = device.registration["endpoints"]["transfer_ws_url"] + "/" + device.device_id
    async with connect(
        url, user_agent_header=None, compression=None, max_size=64 * 1024 * 1024
    ) as ws:
        yield Transfer(ws)


def uploading_task(db: Engine, device: Device, index: int = 0) -> str:
    task_id = device.world.task_ids[index]
    with db.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET robot_id=:r, status='uploading' WHERE task_id=:t"),
            {"r": int(device.registration["robot_id"]), "t": task_id},
        )
    return task_id


def upload_objects(device: Device, task_id: str, *, checksum: str = CHECKSUM) -> str:
    """PUT the MCAP and sidecar as axon-transfer does, with the device's own key."""
    s3 = device.registration["s3"]
    client = create_s3_client_for_endpoint(
        s3["endpoint_url"], access_key=s3["access_key"], secret_key=s3["secret_key"]
    )
    day = dt.datetime.now(dt.UTC).date().isoformat()
    key = f"{s3['prefix']}{day}/{task_id}.mcap"
    client.put_object(
        Bucket=s3["bucket"],
        Key=key,
        Body=MCAP,
        ContentType="application/octet-stream",
        Metadata={"checksum-sha256": checksum},
    )
    client.put_object(
        Bucket=s3["bucket"], Key=key[:-5] + ".json", Body=SIDECAR, ContentType="application/json"
    )
    return key


def run_verify_job(live: LiveApi) -> int:
    """One ``verify_uploads`` run, in process, on the live API's database and store."""
    from dagster import DagsterInstance

    from keystone_pipelines.definitions import defs
    from keystone_pipelines.resources import KeystoneDatabase

    env = live.env
    resource = KeystoneDatabase(
        database_url=env["KEYSTONE_DATABASE_URL"],
        s3_endpoint_url=env["KEYSTONE_S3_ENDPOINT_URL"],
        s3_access_key=env["KEYSTONE_S3_ACCESS_KEY"],
        s3_secret_key=env["KEYSTONE_S3_SECRET_KEY"],
    )
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("verify_uploads").execute_in_process(
            instance=instance, resources={"database": resource}
        )
    assert result.success
    return int(result.output_for_node("verify_uploads_op"))


@pytest.fixture
def bucket(device: Device, s3_server: Any) -> None:
    s3 = device.registration["s3"]
    admin = create_s3_client_for_endpoint(
        s3_server.endpoint_url, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    with contextlib.suppress(Exception):
        admin.create_bucket(Bucket=s3["bucket"])


async def test_c_tr_a_verified_upload_is_acked_and_completes_the_task(
    transfer: Transfer, device: Device, db: Engine, bucket: None, live_api: LiveApi
) -> None:
    await transfer.send("connected", status_data(device.device_id, [], []))
    task_id = uploading_task(db, device)
    request = await transfer.expect("upload_request", task_id)  # nothing uploads unasked
    assert request == {"type": "upload_request", "task_id": task_id, "priority": 1}
    key = upload_objects(device, task_id)
    await transfer.send(
        "upload_started",
        {
            "checksum_sha256": CHECKSUM,
            "file_size_bytes": len(MCAP),
            "files": [f"{task_id}.mcap", f"{task_id}.json"],
            "object_key": key,
            "s3_key": key,
            "status": "pending",
            "task_id": task_id,
            "total_bytes": len(MCAP),
            "upload_mode": "mcap_json",
        },
    )
    await transfer.send("upload_complete", complete_data(task_id, key))
    # KEYSTONE_ACK_VERIFY=sha256 (the default): checked now, ACKed once re-hashed.
    await transfer.none_of("upload_ack", task_id, seconds=1.5)
    assert task_row(db, task_id)["status"] == "uploading"
    assert await asyncio.to_thread(run_verify_job, live_api) == 1
    ack = await transfer.expect("upload_ack", task_id)
    assert ack == {"type": "upload_ack", "task_id": task_id}  # flat, no data wrapper
    for _ in range(50):
        row = task_row(db, task_id)
        if row["status"] == "completed":
            break
        await asyncio.sleep(0.1)
    assert row["status"] == "completed"
    assert row["upload_acked_at"] is not None
    with db.connect() as conn:
        episode = (
            conn.execute(
                text(
                    "SELECT e.status, e.mcap_path, e.checksum, e.duration_sec FROM episodes e "
                    "JOIN tasks t ON t.id=e.task_id WHERE t.task_id=:t"
                ),
                {"t": task_id},
            )
            .mappings()
            .one()
        )
        counted = conn.execute(
            text("SELECT episode_count FROM orders WHERE id=:o"), {"o": device.world.order_id}
        ).scalar()
    assert episode["status"] == "pending_qa"
    assert episode["mcap_path"] == key
    assert episode["checksum"] == CHECKSUM
    assert counted == 1
    # The same upload_complete again (stale queue flush): same episode, ACKed again.
    await transfer.send("upload_complete", complete_data(task_id, key))
    await transfer.expect("upload_ack", task_id)
    with db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM episodes")).scalar() == 1
        assert (
            conn.execute(
                text("SELECT episode_count FROM orders WHERE id=:o"), {"o": device.world.order_id}
            ).scalar()
            == 1
        )


async def test_a_checksum_mismatch_gets_no_ack_and_the_task_keeps_uploading(
    transfer: Transfer, device: Device, db: Engine, bucket: None
) -> None:
    task_id = uploading_task(db, device)
    key = upload_objects(device, task_id, checksum="0" * 64)
    await transfer.send("upload_complete", complete_data(task_id, key))
    await transfer.none_of("upload_ack", task_id)
    assert task_row(db, task_id)["status"] == "uploading"
    with db.connect() as conn:
        error = conn.execute(
            text("SELECT verify_error FROM device_uploads WHERE task_id=:t"), {"t": task_id}
        ).scalar()
    assert "checksum" in error


async def test_a_key_outside_the_devices_prefix_gets_no_ack(
    transfer: Transfer, device: Device, db: Engine, bucket: None
) -> None:
    task_id = uploading_task(db, device)
    upload_objects(device, task_id)
    foreign = f"{device.world.factory_id}/another-device/2026-11-23/{task_id}.mcap"
    await transfer.send("upload_complete", complete_data(task_id, foreign))
    await transfer.none_of("upload_ack", task_id)
    await transfer.send("upload_complete", complete_data("task-unknown", foreign))
    await transfer.none_of("upload_ack", "task-unknown", seconds=1)


async def test_waiting_ack_ids_are_acked_again_on_reconnect(
    live_api: LiveApi, device: Device, db: Engine, bucket: None
) -> None:
    task_id = uploading_task(db, device)
    key = upload_objects(device, task_id)
    url = device.registration["endpoints"]["transfer_ws_url"] + "/" + device.device_id
    async with connect(url, user_agent_header=None, max_size=64 * 1024 * 1024) as ws:
        # An ACK sent before upload_complete is lost on the device: it says so again here.
        channel = Transfer(ws)
        await channel.send(
            "connected", status_data(device.device_id, [upload_entry(task_id, key)], [task_id])
        )
        await channel.none_of("upload_ack", task_id, seconds=1)
        await asyncio.to_thread(run_verify_job, live_api)
        await channel.expect("upload_ack", task_id)
    async with connect(url, user_agent_header=None, max_size=64 * 1024 * 1024) as ws:
        channel = Transfer(ws)
        await channel.send("connected", status_data(device.device_id, [], [task_id]))
        await channel.expect("upload_ack", task_id)  # verified before: ACKed from the DB

    def acks() -> int:  # recorded right after the frame went out
        with db.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT ack_count FROM device_uploads WHERE task_id=:t"), {"t": task_id}
                ).scalar()
            )

    for _ in range(50):
        if acks() == 2:
            break
        await asyncio.sleep(0.1)
    assert acks() == 2


async def test_large_status_frames_are_accepted_and_stored_once(
    transfer: Transfer, device: Device, db: Engine, api: httpx.AsyncClient
) -> None:
    # A long-lived device lists every upload it ever made: ~700 B each, several MB.
    entries = [
        upload_entry(
            f"old-{i:05d}",
            f"{device.world.factory_id}/{device.device_id}/2026-01-01/old-{i:05d}.mcap",
            status="completed",
        )
        for i in range(7000)
    ]
    big = status_data(device.device_id, entries, [])
    assert len(frame("connected", big)) > 4 * 1024 * 1024
    await transfer.send("connected", big)
    await transfer.send("status", big)  # unchanged: not written again
    await transfer.send(
        "status",
        {
            "active_count": 0,
            "completed_count": 0,
            "failed_count": 0,
            "pending_count": 2,
            "retry_wait_count": 0,
            "uploading_count": 0,
        },
    )  # the short form (upload_all reply)
    # 7,000 rows on a busy 2-core host can take a while: wait for them, up to a minute.
    deadline = time.monotonic() + 60
    while True:
        listed = (await api.get("/api/v1/transfer/devices")).json()["devices"]
        if (listed and listed[0]["status"] is not None) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert listed[0]["device_id"] == device.device_id
    assert listed[0]["connected"] is True
    assert listed[0]["status"]["version"] == "0.1.0"
    with db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM device_uploads")).scalar() == 7000


async def test_rest_requests_reach_the_device_as_flat_frames(
    transfer: Transfer, device: Device, api: httpx.AsyncClient
) -> None:
    await transfer.send("connected", status_data(device.device_id, [], []))
    base = f"/api/v1/transfer/{device.device_id}"
    sent = await api.post(f"{base}/upload_request", json={"task_id": "task-x", "priority": 3})
    assert sent.json() == {"status": "sent"}, sent.text
    assert await transfer.expect("upload_request", "task-x") == {
        "type": "upload_request",
        "task_id": "task-x",
        "priority": 3,
    }
    assert (await api.post(f"{base}/status_query")).status_code == 200
    assert await transfer.expect("status_query") == {"type": "status_query"}
    bad = await api.post(f"{base}/upload_request", json={"task_id": "../x"})
    assert bad.status_code == 422


async def test_bad_frames_are_ignored_and_unknown_devices_refused(
    transfer: Transfer, device: Device, live_api: LiveApi, api: httpx.AsyncClient
) -> None:
    for raw in (
        "not json",
        "[]",
        '{"type": 5}',
        '{"type":"upload_progress","data":{}}',
        '{"type":"upload_complete","data":{"task_id":7}}',
    ):
        await transfer.ws.send(raw)
    await transfer.send("connected", status_data(device.device_id, [], []))
    sent = await api.post(f"/api/v1/transfer/{device.device_id}/status_query")
    assert sent.status_code == 200  # still connected
    assert await upgrade_status(f"{live_api.ws_url}/transfer/AB-F9999-T9999-000001", None) == 404
    gone = await api.post("/api/v1/transfer/AB-F9999-T9999-000001/status_query")
    assert gone.status_code == 404


async def test_bytes_that_do_not_hash_to_the_checksum_are_never_acked(
    transfer: Transfer, device: Device, db: Engine, bucket: None, live_api: LiveApi
) -> None:
    """Metadata and sidecar agree, but the stored bytes differ (an unsigned upload)."""
    task_id = uploading_task(db, device)
    key = upload_objects(device, task_id)
    s3 = device.registration["s3"]
    client = create_s3_client_for_endpoint(
        s3["endpoint_url"], access_key=s3["access_key"], secret_key=s3["secret_key"]
    )
    tampered = MCAP[:100] + bytes([MCAP[100] ^ 0xFF]) + MCAP[101:]
    client.put_object(
        Bucket=s3["bucket"], Key=key, Body=tampered, Metadata={"checksum-sha256": CHECKSUM}
    )
    await transfer.send("upload_complete", complete_data(task_id, key))
    await asyncio.sleep(1)
    assert await asyncio.to_thread(run_verify_job, live_api) == 0
    await transfer.none_of("upload_ack", task_id)
    assert task_row(db, task_id)["status"] == "uploading"
    with db.connect() as conn:
        error = conn.execute(
            text("SELECT verify_error FROM device_uploads WHERE task_id=:t"), {"t": task_id}
        ).scalar()
    assert "SHA-256" in error


async def test_metadata_level_acks_right_after_the_checks(
    device: Device, db: Engine, bucket: None, live_api: LiveApi, tmp_path: Any
) -> None:
    from tests.contract.conftest import start_api, stop_api

    quick = start_api({**live_api.env, "KEYSTONE_ACK_VERIFY": "metadata"}, tmp_path / "m.log")
    try:
        task_id = uploading_task(db, device)
        key = upload_objects(device, task_id)
        url = f"{quick.ws_url}/transfer/{device.device_id}"
        async with connect(url, user_agent_header=None, max_size=64 * 1024 * 1024) as ws:
            channel = Transfer(ws)
            await channel.send("upload_complete", complete_data(task_id, key))
            await channel.expect("upload_ack", task_id)
    finally:
        stop_api(quick.process)


async def test_an_upload_for_a_cancelled_task_is_kept_as_orphan_and_acked(
    transfer: Transfer, device: Device, db: Engine, bucket: None
) -> None:
    task_id = uploading_task(db, device)
    key = upload_objects(device, task_id)
    with db.begin() as conn:
        conn.execute(text("UPDATE tasks SET status='cancelled' WHERE task_id=:t"), {"t": task_id})
    await transfer.send("upload_complete", complete_data(task_id, key))
    await transfer.expect("upload_ack", task_id)  # the device may free its disk
    with db.connect() as conn:
        orphan = conn.execute(
            text("SELECT orphan FROM device_uploads WHERE task_id=:t"), {"t": task_id}
        ).scalar()
        episodes = conn.execute(text("SELECT COUNT(*) FROM episodes")).scalar()
    assert orphan
    assert episodes == 0
    assert task_row(db, task_id)["status"] == "cancelled"


async def test_c_tr_7_8_not_found_means_tracked_or_ask_again_later(
    transfer: Transfer, device: Device, db: Engine
) -> None:
    await transfer.send("connected", status_data(device.device_id, [], []))
    task_id = uploading_task(db, device)
    await transfer.expect("upload_request", task_id)
    # Not ready yet on the device (sentinel missing): asked again after the cooldown.
    detail = f"No MCAP file matching {task_id} in /axon/recording"
    await transfer.send("upload_not_found", {"detail": detail, "task_id": task_id})
    await transfer.expect("upload_request", task_id, timeout=10)
    # Now tracked: a later "not found" is the duplicate-request answer, not "missing".
    key = f"{device.world.factory_id}/{device.device_id}/2026-11-23/{task_id}.mcap"
    await transfer.send(
        "upload_started",
        {
            "checksum_sha256": CHECKSUM,
            "file_size_bytes": 1,
            "files": [],
            "object_key": key,
            "s3_key": key,
            "status": "pending",
            "task_id": task_id,
            "total_bytes": 1,
            "upload_mode": "mcap_json",
        },
    )
    await transfer.send("upload_not_found", {"detail": detail, "task_id": task_id})
    await transfer.none_of("upload_request", task_id, seconds=3)
    with db.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM device_uploads WHERE task_id=:t"), {"t": task_id}
        ).scalar()
    assert status == "pending"


async def test_c_tr_9_a_permanent_failure_fails_the_task_and_is_surfaced(
    transfer: Transfer, device: Device, db: Engine, api: httpx.AsyncClient
) -> None:
    task_id = uploading_task(db, device)
    await transfer.expect("upload_request", task_id)  # asked for once it is uploading
    await transfer.send(
        "upload_failed",
        {"next_retry_at": "", "reason": "AccessDenied", "retry_count": 5, "task_id": task_id},
    )
    for _ in range(50):
        if task_row(db, task_id)["status"] == "failed":
            break
        await asyncio.sleep(0.1)
    assert task_row(db, task_id)["status"] == "failed"
    failed = status_data(device.device_id, [upload_entry(task_id, "k", status="failed")], [])
    await transfer.send("status", failed)
    await transfer.none_of("upload_request", task_id, seconds=2)  # it would only get not_found
    listed = (await api.get("/api/v1/transfer/devices")).json()["devices"]
    assert listed[0]["status"]["failed_task_ids"] == [task_id]


async def test_c_tr_11_12_13_unknown_ack_cleanup_failure_and_short_status(
    transfer: Transfer, device: Device, db: Engine
) -> None:
    await transfer.send(
        "upload_not_found", {"detail": "ACK for unknown task_id", "task_id": "task-gone"}
    )
    await transfer.send(
        "local_cleanup_failed",
        {
            "file_path": "/axon/recording/t.mcap",
            "reason": "EACCES",
            "retry_count": 6,
            "task_id": "task-gone",
        },
    )
    await transfer.send(
        "status",
        {
            "active_count": 0,
            "completed_count": 0,
            "failed_count": 0,
            "pending_count": 3,
            "retry_wait_count": 0,
            "uploading_count": 0,
        },
    )
    assert await transfer.expect("status_query") == {"type": "status_query"}
    await transfer.none_of("upload_request", "task-gone", seconds=1)
    with db.connect() as conn:
        kinds = (
            conn.execute(
                text("SELECT kind FROM device_events WHERE task_id='task-gone' ORDER BY id")
            )
            .scalars()
            .all()
        )
    assert kinds == ["upload_not_found", "local_cleanup_failed"]


async def test_c_tr_15_a_fleet_reconnecting_at_once_is_accepted(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    """500 transfer programs upgrade within the same second (unseeded, lockstep jitter)."""
    with db.begin() as conn:
        robot_type = conn.execute(
            text("SELECT robot_type_id FROM robots WHERE device_id=:d"), {"d": device.device_id}
        ).scalar()
        conn.execute(
            text(
                "INSERT INTO robots (factory_id, robot_type_id, device_id, name, status, "
                "metadata, created_at, updated_at) VALUES (:f, :t, :d, '', 'active', '{}', "
                "NOW(6), NOW(6))"
            ),
            [
                {"f": device.world.factory_id, "t": robot_type, "d": f"fleet-{i:04d}"}
                for i in range(500)
            ],
        )

    async def one(i: int) -> bool:
        url = f"{live_api.ws_url}/transfer/fleet-{i:04d}"
        async with connect(url, user_agent_header=None, open_timeout=60) as ws:
            await ws.send(frame("connected", status_data(f"fleet-{i:04d}", [], [])))
            await asyncio.sleep(2)
            return True

    results = await asyncio.gather(*(one(i) for i in range(500)), return_exceptions=True)
    failures = [r for r in results if r is not True]
    assert failures == [], failures[:3]
    # ... and the 500 disconnects are absorbed: presence is up to date soon after.
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=live_api.base_url, timeout=60) as client:
        while True:
            listed = (
                await client.get("/api/v1/transfer/devices", headers=device.world.admin_headers)
            ).json()["devices"]
            if not any(d["connected"] for d in listed if d["device_id"].startswith("fleet-")):
                break
            assert time.monotonic() - started < 60, "disconnects not absorbed within 60 s"
            await asyncio.sleep(0.5)


async def test_c_tr_14_a_stale_upload_complete_before_connected_is_handled(
    live_api: LiveApi, device: Device, db: Engine, bucket: None
) -> None:
    task_id = uploading_task(db, device)
    key = upload_objects(device, task_id)
    url = f"{live_api.ws_url}/transfer/{device.device_id}"
    async with connect(url, user_agent_header=None) as ws:
        channel = Transfer(ws)
        await channel.send("upload_complete", complete_data(task_id, key))  # queued frame
        await channel.send("connected", status_data(device.device_id, [], []))
        await asyncio.sleep(1)
    assert await asyncio.to_thread(run_verify_job, live_api) == 1
    with db.connect() as conn:
        checked = conn.execute(
            text("SELECT checked_at FROM device_uploads WHERE task_id=:t"), {"t": task_id}
        ).scalar()
    assert checked is not None


async def test_c_s3_3_and_c_mcap_2_half_pairs_and_truncated_files_are_not_acked(
    transfer: Transfer, device: Device, db: Engine, bucket: None, s3_server: Any
) -> None:
    s3 = device.registration["s3"]
    client = create_s3_client_for_endpoint(  # the store's admin: device keys cannot delete
        s3_server.endpoint_url, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    half = uploading_task(db, device, 0)
    key = upload_objects(device, half)
    client.delete_object(Bucket=s3["bucket"], Key=key[:-5] + ".json")
    await transfer.send("upload_complete", complete_data(half, key))
    truncated = uploading_task(db, device, 1)
    short = MCAP[: len(MCAP) // 2]
    digest = hashlib.sha256(short).hexdigest()
    tkey = key.replace(half, truncated)
    client.put_object(
        Bucket=s3["bucket"], Key=tkey, Body=short, Metadata={"checksum-sha256": digest}
    )
    sidecar = json.loads(SIDECAR)
    sidecar["recording"]["checksum_sha256"] = digest
    client.put_object(
        Bucket=s3["bucket"], Key=tkey[:-5] + ".json", Body=json.dumps(sidecar).encode()
    )
    data = complete_data(truncated, tkey, checksum=digest)
    data["file_size_bytes"] = len(short)
    await transfer.send("upload_complete", data)
    await transfer.none_of("upload_ack", half, seconds=2)
    with db.connect() as conn:
        errors = dict(conn.execute(text("SELECT task_id, verify_error FROM device_uploads")).all())
    assert "sidecar not readable" in errors[half]
    assert "unreadable" in errors[truncated]


async def test_c_mcap_1_the_recorders_metadata_is_parsed_onto_the_episode(
    transfer: Transfer, device: Device, db: Engine, bucket: None, live_api: LiveApi
) -> None:
    task_id = uploading_task(db, device)
    key = upload_objects(device, task_id)
    await transfer.send("upload_complete", complete_data(task_id, key))
    await asyncio.sleep(1)
    await asyncio.to_thread(run_verify_job, live_api)
    await transfer.expect("upload_ack", task_id)
    with db.connect() as conn:
        raw = conn.execute(text("SELECT metadata FROM episodes")).scalar()
    axon = json.loads(raw)["axon"]
    assert axon["task"]["task_id"] == "task-cap-0001"  # the recorder's (sanitised) copy
    assert axon["task"]["skills"] == ["pick", "place"]
    assert axon["recording"]["file_size_bytes"] == len(MCAP)  # 20-digit zero-padded
    assert axon["recording"]["topics_recorded"] == ["/imu/data", "/udp/gps"]
    assert axon["device"]["device_id"] == "robot-cap-01"


async def test_the_recorder_config_waits_for_the_transfer_program(
    live_api: LiveApi, device: Device, tmp_path: Any
) -> None:
    from tests.contract.capture import ReplayRecorder
    from tests.contract.conftest import start_api, stop_api

    strict = start_api(
        {**live_api.env, "KEYSTONE_RECORDER_REQUIRE_TRANSFER": "true"}, tmp_path / "s.log"
    )
    try:
        recorder = ReplayRecorder(
            f"{strict.ws_url}/recorder/{device.device_id}", device.token, device.device_id
        )
        await recorder.connect()
        recorder.start()
        async with httpx.AsyncClient(
            base_url=strict.base_url, headers=device.world.admin_headers, timeout=30
        ) as client:
            base = f"/api/v1/recorder/{device.device_id}"
            await asyncio.sleep(0.5)
            refused = await client.post(f"{base}/config", json={})
            assert refused.status_code == 409
            assert refused.json()["code"] == "transfer_not_connected"
            url = f"{strict.ws_url}/transfer/{device.device_id}"
            async with connect(url, user_agent_header=None) as ws:
                await Transfer(ws).send("connected", status_data(device.device_id, [], []))
                await asyncio.sleep(0.5)
                accepted = await client.post(f"{base}/config", json={})
                assert accepted.status_code == 200, accepted.text
        await recorder.close()
    finally:
        stop_api(strict.process)


async def test_bad_input_on_the_transfer_socket(
    live_api: LiveApi, device: Device, db: Engine, bucket: None, api: httpx.AsyncClient
) -> None:
    """Another device's task: no episode, no ACK; a flood is limited; > 64 MiB is 1009."""
    other = register(live_api, device.world)
    task_id = uploading_task(db, device)  # configured on `device`, not on `other`
    key = upload_objects(device, task_id)
    other_key = key.replace(device.device_id, other["device_id"])
    url = f"{live_api.ws_url}/transfer/{other['device_id']}"
    async with connect(url, user_agent_header=None, max_size=None) as ws:
        channel = Transfer(ws)
        await channel.send("upload_complete", complete_data(task_id, other_key))
        await channel.none_of("upload_ack", task_id, seconds=2)
        flood = '{"data":{},"timestamp":"x","type":"upload_progress"}'
        await asyncio.gather(*(ws.send(flood) for _ in range(600)))
        await ws.send("x" * (64 * 1024 * 1024 + 1))
        await asyncio.wait_for(ws.wait_closed(), 30)
        assert ws.close_code == 1009
    metrics = (await api.get("/metrics")).text
    assert 'keystone_device_frames_rejected_total{channel="transfer",reason="rate"}' in metrics
    with db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM episodes")).scalar() == 0
