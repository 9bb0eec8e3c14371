"""C-REC, C-CB, C-CFG and C-REG cases of axon-protocol.md §9 against a live API.

The device side is the real recorder replayed from its captures (tests/contract/capture.py):
every frame and callback body below was sent by axon-recorder; only ids are swapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import Engine, text
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.contract.capture import (
    ReplayRecorder,
    Step,
    device_frames,
    events,
    exchanges,
    post_like_recorder,
    read_http_response,
)
from tests.contract.conftest import (
    Device,
    LiveApi,
    register,
    task_row,
    wait_for,
)

pytestmark = [pytest.mark.contract, pytest.mark.integration, pytest.mark.anyio]


async def connected(api: httpx.AsyncClient, device_id: str, state: str = "idle") -> dict[str, Any]:
    for _ in range(100):
        body = (await api.get(f"/api/v1/recorder/{device_id}/state")).json()
        if body.get("connected") and body.get("current_state") == state:
            return dict(body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"recorder {device_id} never reported {state}: {body}")


async def status_of(db: Engine, task_id: str, want: str, timeout: float = 10.0) -> Any:
    for _ in range(int(timeout / 0.1)):
        row = await asyncio.to_thread(task_row, db, task_id)
        if row is not None and row["status"] == want:
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} is {row['status'] if row else None}, want {want}")


@pytest.fixture
async def recorder(device: Device) -> AsyncIterator[ReplayRecorder]:
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await rec.connect()
    rec.start()
    yield rec
    await rec.close()


# --- registration (C-REG) --------------------------------------------------------------


def test_c_reg_1_registration_answers_201_with_plain_ws_endpoints(
    device: Device, live_api: LiveApi
) -> None:
    body = device.registration
    assert body["device_id"].startswith(f"AB-F{device.world.factory_id:04d}-T")
    assert body["factory_id"] == str(device.world.factory_id)
    assert body["robot_type_id"] == str(device.world.robot_type_id)
    assert body["robot_id"].isdigit()
    assert body["ws_client_auth_token"].startswith("kws_v1_")
    port = urlsplit(live_api.base_url).port
    assert body["endpoints"]["recorder_rpc_url"] == (
        f"ws://127.0.0.1:{port}/recorder/{body['device_id']}"
    )
    # The transfer program appends "/{device_id}" itself.
    assert body["endpoints"]["transfer_ws_url"] == f"ws://127.0.0.1:{port}/transfer"
    assert body["s3"]["prefix"] == f"{body['factory_id']}/{body['device_id']}/"
    assert body["s3"]["credentials"] == "scoped"


def test_the_device_key_writes_only_under_its_own_prefix(device: Device, s3_server: Any) -> None:
    from botocore.exceptions import ClientError

    from keystone_core.storage import create_s3_client_for_endpoint

    s3 = device.registration["s3"]
    admin = create_s3_client_for_endpoint(
        s3_server.endpoint_url, access_key=s3_server.access_key, secret_key=s3_server.secret_key
    )
    with contextlib.suppress(ClientError):
        admin.create_bucket(Bucket=s3["bucket"])
    own = create_s3_client_for_endpoint(
        s3_server.endpoint_url, access_key=s3["access_key"], secret_key=s3["secret_key"]
    )
    own.put_object(Bucket=s3["bucket"], Key=f"{s3['prefix']}2026-11-23/t.mcap", Body=b"x")
    with pytest.raises(ClientError):
        own.put_object(Bucket=s3["bucket"], Key="other-device/t.mcap", Body=b"x")


# --- the socket (C-REC-1..3, 17, 18, 20) -----------------------------------------------


async def test_c_rec_1_upgrade_with_token_binds_the_socket_and_records_the_snapshot(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder
) -> None:
    state = await connected(api, device.device_id)
    assert state["task_id"] is None
    devices = (await api.get("/api/v1/recorder/devices")).json()["devices"]
    assert [d["device_id"] for d in devices] == [device.device_id]


async def upgrade_status(url: str, token: str | None) -> int:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    try:
        async with connect(url, additional_headers=headers, user_agent_header=None):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_c_rec_2_unknown_device_or_bad_token_is_refused_at_the_upgrade(
    live_api: LiveApi, device: Device
) -> None:
    assert (
        await upgrade_status(f"{live_api.ws_url}/recorder/AB-F9999-T9999-000001", device.token)
        == 404
    )
    assert await upgrade_status(device.rpc_url, None) == 401
    assert await upgrade_status(device.rpc_url, "kws_v1_not-a-real-token") == 401
    other = register_other(live_api, device)
    assert await upgrade_status(device.rpc_url, other["ws_client_auth_token"]) == 401


def register_other(live_api: LiveApi, device: Device) -> dict[str, Any]:
    return register(live_api, device.world)


def raw_upgrade(live_api: LiveApi, path: str, header_list: list[list[str]]) -> tuple[int, bool]:
    """Send a captured upgrade byte for byte; the status and whether the server closed TCP."""
    parts = urlsplit(live_api.base_url)
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in header_list)
    with socket.create_connection((parts.hostname, parts.port), 10) as s:
        s.sendall((head + "\r\n").encode())
        status, _ = read_http_response(s)
        if status == 101:
            return status, False
        s.settimeout(5)
        try:
            closed = s.recv(1) == b""
        except TimeoutError:
            closed = False
        return status, closed


def captured_upgrade(device: Device) -> list[list[str]]:
    for event in events("02_lifecycle_with_auth.jsonl"):
        if event["kind"] == "ws_handshake_request":
            headers = [list(h) for h in event["header_list"]]
            for h in headers:
                if h[0] == "Authorization":
                    h[1] = f"Bearer {device.token}"
            return headers
    raise AssertionError("no captured upgrade")


def test_c_rec_3_the_recorders_exact_upgrade_is_accepted(live_api: LiveApi, device: Device) -> None:
    headers = captured_upgrade(device)
    assert ["Host", "127.0.0.1"] in headers  # no port, no User-Agent, no Origin
    status, _ = raw_upgrade(live_api, f"/recorder/{device.device_id}", headers)
    assert status == 101


def test_c_rec_2_a_refused_upgrade_closes_the_tcp_connection(
    live_api: LiveApi, device: Device
) -> None:
    headers = [h for h in captured_upgrade(device) if h[0] != "Authorization"]
    status, closed = raw_upgrade(live_api, f"/recorder/{device.device_id}", headers)
    assert status == 401
    assert closed


def test_the_default_rpc_path_is_refused_and_logged(live_api: LiveApi, device: Device) -> None:
    status, closed = raw_upgrade(live_api, "/rpc", captured_upgrade(device))
    assert status == 404
    assert closed
    wait_for(lambda: "dialed /rpc" in live_api.log())


async def test_c_rec_17_a_second_socket_replaces_the_first_which_is_closed_with_1000(
    api: httpx.AsyncClient, device: Device
) -> None:
    first = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await first.connect()
    await connected(api, device.device_id)
    second = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await second.connect()
    assert first.ws is not None
    await asyncio.wait_for(first.ws.wait_closed(), 10)
    assert first.ws.close_code == 1000
    second.start()
    reply = await api.get(f"/api/v1/recorder/{device.device_id}/stats")
    assert reply.status_code == 200
    assert any(r["action"] == "get_stats" for r in second.received)
    await second.close()


async def test_c_rec_18_recorder_pings_are_answered(device: Device) -> None:
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await rec.connect()
    assert rec.ws is not None
    pong = await rec.ws.ping()
    await asyncio.wait_for(pong, 5)
    await rec.close()


async def test_c_rec_20_large_frames_are_accepted_and_oversized_closed_with_1009(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder
) -> None:
    await connected(api, device.device_id)
    assert recorder.ws is not None
    big = {"type": "state_update", "timestamp": 1, "data": {"current": "idle", "previous": "idle"}}
    big["padding"] = "x" * (2 * 1024 * 1024)  # a 2 MiB frame: over common 1 MiB defaults
    await recorder.ws.send(json.dumps(big))
    reply = await api.get(f"/api/v1/recorder/{device.device_id}/stats")
    assert reply.status_code == 200  # still connected after the 2 MiB frame
    await recorder.ws.send("x" * (16 * 1024 * 1024 + 1))
    await asyncio.wait_for(recorder.ws.wait_closed(), 10)
    assert recorder.ws.close_code == 1009


async def test_bad_frames_are_dropped_and_the_connection_stays_up(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder
) -> None:
    await connected(api, device.device_id)
    assert recorder.ws is not None
    for frame in (
        "this is not json",
        "[1, 2]",
        '{"type":"rpc_response","request_id":42,"success":true,"message":"x"}',
        '{"type":"hello","data":{}}',
        b'{"data":{"current":"idle","previous":"idle"},"timestamp":1,"type":"state_update"}',
    ):
        await recorder.ws.send(frame)
    reply = await api.get(f"/api/v1/recorder/{device.device_id}/stats")
    assert reply.status_code == 200
    metrics = (await api.get("/metrics")).text
    assert 'keystone_device_frames_rejected_total{channel="recorder",reason="malformed"}' in metrics


# --- the façade flow (C-REC-4, 6, 9, 19; C-CB-1, 2; C-CFG-1, 4) ---------------------------


async def test_the_facade_drives_a_task_from_config_to_uploading(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder, db: Engine
) -> None:
    await connected(api, device.device_id)
    task_id = device.world.task_ids[0]

    config = await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    assert config.status_code == 200, config.text
    assert config.json()["success"] is True
    assert config.json()["task_id"] == task_id  # the station's next pending task
    await status_of(db, task_id, "ready")
    sent = recorder.received[-1]
    assert sent["action"] == "config"
    assert isinstance(sent["timestamp_ms"], int)  # C-REC-19
    task_config = sent["params"]["task_config"]
    assert None not in task_config.values()  # C-CFG-1
    assert task_config["device_id"] == device.device_id
    assert task_config["user_token"].startswith("kct_v1_")
    assert task_config["operator_name"] == "op-117"  # ASCII code, not the name (C-CFG-3)
    assert task_config["start_callback_url"].endswith("/api/v1/callbacks/start")

    begin = await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})
    assert begin.json()["success"] is True, begin.text
    row = await status_of(db, task_id, "in_progress")
    assert row["started_at"] is not None
    assert ("start", 200) in recorder.callback_results

    for action, state in (("pause", "paused"), ("resume", "recording")):
        reply = await api.post(f"/api/v1/recorder/{device.device_id}/{action}")
        assert reply.json()["success"] is True, reply.text
        await connected(api, device.device_id, state)

    finish = await api.post(f"/api/v1/recorder/{device.device_id}/finish", json={})
    assert finish.json()["success"] is True, finish.text
    row = await status_of(db, task_id, "uploading")
    assert ("finish", 200) in recorder.callback_results
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    assert meta["device_finish"]["duration_sec"] == 4.164  # active time (C-CB-2)
    assert meta["device_finish"]["message_count"] == 61

    # C-CFG-4: the next recording gets a new task id and a new config.
    again = await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    assert again.json()["task_id"] == device.world.task_ids[1]


async def test_c_rec_5_a_rejected_config_is_surfaced_and_the_task_stays_pending(
    api: httpx.AsyncClient, device: Device, db: Engine
) -> None:
    rec = ReplayRecorder(
        device.rpc_url, device.token, device.device_id, capture="03_state_machine_errors.jsonl"
    )
    await rec.connect()
    rec.start()
    await connected(api, device.device_id)
    # The capture's first config replies are refusals (missing task_config, bad types, …).
    reply = (await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})).json()
    assert reply["success"] is False
    second = (await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})).json()
    assert second["success"] is False
    assert second["data"]["validation_errors"]
    row = await asyncio.to_thread(task_row, db, reply["task_id"])
    assert row["status"] == "pending"
    assert len([r for r in rec.received if r["action"] == "config"]) == 2  # no retry loop
    await rec.close()


async def test_c_rec_8_an_unsolicited_pause_is_recorded_as_the_devices(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder, db: Engine
) -> None:
    await connected(api, device.device_id)
    await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})
    task_id = device.world.task_ids[0]
    await status_of(db, task_id, "in_progress")
    assert recorder.ws is not None
    # Captured: the task-size guard tripped with no request outstanding.
    frame = next(
        raw
        for raw in device_frames("12_disk_limit.jsonl")
        if '"current":"paused","previous":"recording"' in raw
    )
    recorder.use_capture("12_disk_limit.jsonl")
    await recorder.ws.send(recorder.swap(frame))
    state = await connected(api, device.device_id, "paused")
    assert state["paused_by_device"] is True


async def test_c_rec_10_and_c_cb_6_a_lost_finish_is_recovered_from_the_snapshot(
    api: httpx.AsyncClient, device: Device, db: Engine
) -> None:
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    rec.skip_callbacks = True  # the finish callback never arrives (server down, wrong URL)
    await rec.connect()
    rec.start()
    await connected(api, device.device_id)
    await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})
    task_id = device.world.task_ids[0]
    await status_of(db, task_id, "in_progress")
    await rec.close()  # the socket drops before finish is answered
    again = ReplayRecorder(device.rpc_url, device.token, device.device_id, task_id=task_id)
    await again.connect(send_snapshot=False)
    assert again.ws is not None
    await again.ws.send(
        json.dumps(
            {
                "data": {"current": "idle", "previous": "idle", "task_id": task_id},
                "timestamp": 1795422657060,
                "type": "state_update",
            },
            separators=(",", ":"),
        )
    )
    await status_of(db, task_id, "uploading")
    await again.close()


async def test_c_rec_11_cancel_cancels_the_task(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder, db: Engine
) -> None:
    await connected(api, device.device_id)
    await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})
    task_id = device.world.task_ids[0]
    await status_of(db, task_id, "in_progress")
    # No capture holds a successful cancel; these are §2.4's frames in the recorder's
    # serialisation (compact, keys sorted): state_update →idle with the task id, then
    # the reply.
    recorder.play_next(
        "cancel",
        [
            Step(
                "frame",
                '{"data":{"current":"idle","previous":"recording","task_id":"task-cap-0001"},'
                '"timestamp":1795422657060,"type":"state_update"}',
            ),
            Step(
                "frame",
                '{"data":{"state":"idle"},"message":"Recording cancelled successfully",'
                '"request_id":"req-cancel","success":true,"type":"rpc_response"}',
            ),
        ],
    )
    reply = await api.post(f"/api/v1/recorder/{device.device_id}/cancel")
    assert reply.json()["success"] is True, reply.text
    assert reply.json()["task_status"] == "cancelled"
    await status_of(db, task_id, "cancelled")
    status, _ = post_like_recorder(  # no finish can revive it
        f"{api.base_url}/api/v1/callbacks/finish",
        finish_body(task_id, device.device_id),
        device.token,
    )
    assert status == 200
    assert task_row(db, task_id)["status"] == "cancelled"


async def test_c_rec_7_a_failed_begin_needs_a_fresh_config(
    api: httpx.AsyncClient, device: Device, db: Engine
) -> None:
    rec = ReplayRecorder(
        device.rpc_url, device.token, device.device_id, capture="12_disk_limit.jsonl"
    )
    await rec.connect()
    rec.start()
    await connected(api, device.device_id)
    failing = exchanges("12_disk_limit.jsonl")["begin"][1]  # disk hard limit: ready→idle
    rec.play_next("begin", failing)
    await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    task_id = device.world.task_ids[0]
    await status_of(db, task_id, "ready")
    reply = (await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})).json()
    assert reply["success"] is False
    assert "Disk hard limit" in reply["message"]
    row = await status_of(db, task_id, "pending")
    assert "begin failed" in row["error_message"]
    again = await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})
    assert again.json()["code"] == "task_not_beginable"  # never begin alone again
    await rec.close()


async def test_c_rec_12_quit_while_recording_leaves_the_outcome_unknown(
    api: httpx.AsyncClient, device: Device, db: Engine
) -> None:
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await rec.connect()
    rec.start()
    await connected(api, device.device_id)
    await api.post(f"/api/v1/recorder/{device.device_id}/config", json={})
    await api.post(f"/api/v1/recorder/{device.device_id}/begin", json={})
    task_id = device.world.task_ids[0]
    await status_of(db, task_id, "in_progress")
    rec.use_capture("07_quit_while_recording.jsonl")
    quit_reply = (await api.post(f"/api/v1/recorder/{device.device_id}/quit")).json()
    assert quit_reply["data"]["state"] == "recording"
    await rec.close()
    row = await asyncio.to_thread(task_row, db, task_id)
    assert row["status"] == "in_progress"
    assert row["outcome_unknown"]
    # A new process: idle snapshot without a task id.
    fresh = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await fresh.connect()
    await connected(api, device.device_id)
    row = await asyncio.to_thread(task_row, db, task_id)
    assert row["status"] == "in_progress"
    await fresh.close()


async def test_c_rec_13_no_reply_times_out_cleanly_and_keeps_the_socket(
    api: httpx.AsyncClient, device: Device
) -> None:
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await rec.connect()  # connected but never answers
    await connected(api, device.device_id)
    reply = await api.get(f"/api/v1/recorder/{device.device_id}/stats")
    assert reply.status_code == 504
    assert reply.json()["code"] == "recorder_timeout"
    rec.start()  # now it answers again on the same socket
    assert (await api.get(f"/api/v1/recorder/{device.device_id}/stats")).status_code == 200
    await rec.close()


async def test_c_rec_15_pipelined_requests_are_matched_by_request_id(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder
) -> None:
    await connected(api, device.device_id)
    replies = await asyncio.gather(
        *(api.get(f"/api/v1/recorder/{device.device_id}/stats") for _ in range(5))
    )
    assert [r.status_code for r in replies] == [200] * 5
    ids = [r["request_id"] for r in recorder.received]
    assert len(set(ids)) == 5


async def test_c_rec_16_an_orphan_reply_before_the_snapshot_is_dropped(
    api: httpx.AsyncClient, device: Device
) -> None:
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await rec.connect(send_snapshot=False)
    assert rec.ws is not None
    await rec.ws.send(
        '{"data":{"state":"idle"},"message":"State retrieved successfully",'
        '"request_id":"req-from-an-old-connection","success":true,"type":"rpc_response"}'
    )
    await rec.ws.send(
        '{"data":{"current":"idle","previous":"idle"},"timestamp":1,"type":"state_update"}'
    )
    await connected(api, device.device_id)
    await rec.close()


async def test_gates_answer_409_with_their_codes(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder, db: Engine
) -> None:
    base = f"/api/v1/recorder/{device.device_id}"
    await recorder.close()
    await asyncio.sleep(0.3)
    gone = await api.post(f"{base}/config", json={})
    assert (gone.status_code, gone.json()["code"]) == (409, "recorder_not_connected")
    rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
    await rec.connect()
    rec.start()
    await connected(api, device.device_id)
    begin = await api.post(f"{base}/begin", json={})
    assert (begin.status_code, begin.json()["code"]) == (409, "task_not_beginable")
    finish = await api.post(f"{base}/finish", json={})
    assert (finish.status_code, finish.json()["code"]) == (409, "recorder_not_recording")
    with db.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET status='cancelled' WHERE batch_id=:b"),
            {"b": device.world.batch_id},
        )
    none_left = await api.post(f"{base}/config", json={})
    assert (none_left.status_code, none_left.json()["code"]) == (409, "task_not_configurable")
    missing = await api.post("/api/v1/recorder/AB-F9999-T9999-000009/config", json={})
    assert missing.status_code == 404
    await rec.close()


# --- callbacks (C-CB) -----------------------------------------------------------------


def captured_callback(capture: str, kind: str, task_id: str, device_id: str) -> str:
    """A callback body as the recorder sent it, with the test's ids."""
    for event in events(capture):
        if event["kind"] == "http_request" and kind in event["path"]:
            raw = str(event["raw"])
            body = json.loads(raw)
            return raw.replace(f'"{body["task_id"]}"', f'"{task_id}"').replace(
                f'"{body["device_id"]}"', f'"{device_id}"'
            )
    raise AssertionError(f"{capture} has no {kind} callback")


def start_body(task_id: str, device_id: str) -> str:
    return captured_callback("02_lifecycle_with_auth.jsonl", "start", task_id, device_id)


def finish_body(task_id: str, device_id: str, capture: str = "10_sidecar_disabled.jsonl") -> str:
    return captured_callback(capture, "finish", task_id, device_id)


def configured(db: Engine, device: Device, live_api: LiveApi, index: int = 0) -> tuple[str, str]:
    """Assign task ``index`` to the device (as a config would) and get its user_token."""
    task_id = device.world.task_ids[index]
    with db.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET robot_id=:r, status='ready' WHERE task_id=:t"),
            {"r": int(device.registration["robot_id"]), "t": task_id},
        )
        row_id = conn.execute(
            text("SELECT id FROM tasks WHERE task_id=:t"), {"t": task_id}
        ).scalar()
    config = httpx.get(
        f"{live_api.base_url}/api/v1/tasks/{row_id}/config", headers=device.world.admin_headers
    ).json()
    return task_id, config["user_token"]


def test_c_cb_1_2_4_callbacks_with_the_task_token_are_idempotent(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    task_id, token = configured(db, device, live_api)
    url = f"{live_api.base_url}/api/v1/callbacks/"
    status, body = post_like_recorder(url + "start", start_body(task_id, device.device_id), token)
    assert status == 200, body
    assert json.loads(body)["task_status"] == "in_progress"
    raw = finish_body(task_id, device.device_id)
    assert '"sidecar_path": null' in raw
    assert '"error": null' in raw
    for _ in range(2):  # C-CB-4: a repeat changes nothing
        status, body = post_like_recorder(url + "finish", raw, token)
        assert status == 200, body
        assert json.loads(body)["task_status"] == "uploading"
    with db.connect() as conn:
        events_ = conn.execute(
            text("SELECT COUNT(*) FROM device_events WHERE kind='callback_finish' AND task_id=:t"),
            {"t": task_id},
        ).scalar()
    assert events_ == 2
    assert task_row(db, task_id)["status"] == "uploading"


def test_c_cb_3_unknown_task_is_404_and_kept_as_an_orphan(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    status, _ = post_like_recorder(
        f"{live_api.base_url}/api/v1/callbacks/finish",
        finish_body("task-nobody-knows", device.device_id),
        "kct_v1_whatever",
    )
    assert status == 404
    with db.connect() as conn:
        kinds = (
            conn.execute(text("SELECT kind FROM device_events WHERE task_id='task-nobody-knows'"))
            .scalars()
            .all()
        )
    assert kinds == ["callback_finish_orphan"]


def test_callbacks_for_another_task_or_device_are_refused(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    first, token = configured(db, device, live_api, 0)
    second, _ = configured(db, device, live_api, 1)
    url = f"{live_api.base_url}/api/v1/callbacks/start"
    status, body = post_like_recorder(url, start_body(second, device.device_id), token)
    assert status == 403, body
    other = register(live_api, device.world)
    status, _ = post_like_recorder(
        url, start_body(first, device.device_id), other["ws_client_auth_token"]
    )
    assert status == 403
    status, _ = post_like_recorder(url, start_body(first, device.device_id), None)
    assert status == 401
    status, _ = post_like_recorder(url, start_body(first, device.device_id), device.token)
    assert status == 200  # the device's own token works too
    assert task_row(db, second)["status"] == "ready"


def test_c_cb_5_an_expired_task_token_is_still_accepted_and_never_moves_a_final_task(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    task_id, token = configured(db, device, live_api)
    with db.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET status='cancelled', completed_at='2020-01-01' WHERE task_id=:t"),
            {"t": task_id},
        )
    status, body = post_like_recorder(
        f"{live_api.base_url}/api/v1/callbacks/finish",
        finish_body(task_id, device.device_id),
        token,
    )
    assert status == 200, body
    assert json.loads(body)["task_status"] == "cancelled"
    with db.connect() as conn:
        data = conn.execute(
            text("SELECT data FROM device_events WHERE kind='callback_finish' AND task_id=:t"),
            {"t": task_id},
        ).scalar()
    flags = json.loads(data)["flags"]
    assert "expired_token" in flags
    assert "late" in flags


def test_c_cb_7_malformed_or_oversized_bodies_are_400_or_413(
    live_api: LiveApi, device: Device
) -> None:
    url = f"{live_api.base_url}/api/v1/callbacks/finish"
    assert post_like_recorder(url, "{not json", device.token)[0] == 400
    assert post_like_recorder(url, "[1, 2]", device.token)[0] == 400
    assert post_like_recorder(url, '{"device_id": "x"}', device.token)[0] == 400
    huge = json.dumps({"task_id": "t", "padding": "x" * (1024 * 1024 + 10)})
    assert post_like_recorder(url, huge, device.token)[0] == 413


# --- rotation and decommissioning -----------------------------------------------------------


async def test_a_rotated_token_keeps_the_old_one_for_the_overlap(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    async with httpx.AsyncClient(
        base_url=live_api.base_url, headers=device.world.admin_headers
    ) as c:
        rotated = await c.post(
            f"/api/v1/robots/{device.registration['robot_id']}/ws-client-auth-token/rotate"
        )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["ws_client_auth_token"]
    assert rotated.json()["previous_valid_until"] is not None
    assert await upgrade_status(device.rpc_url, new) == 101
    assert await upgrade_status(device.rpc_url, device.token) == 101
    # Once the overlap is over, only the new token works.
    with db.begin() as conn:
        conn.execute(
            text(
                "UPDATE device_credentials SET expires_at='2020-01-01' WHERE robot_id=:r "
                "AND expires_at IS NOT NULL"
            ),
            {"r": int(device.registration["robot_id"])},
        )
    assert await upgrade_status(device.rpc_url, device.token) == 401
    assert await upgrade_status(device.rpc_url, new) == 101


async def test_decommissioning_closes_the_socket_and_refuses_the_device(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder, db: Engine
) -> None:
    await connected(api, device.device_id)
    with db.begin() as conn:
        conn.execute(
            text("UPDATE workstations SET robot_id=NULL WHERE id=:s"), {"s": int(device.station_id)}
        )
    deleted = await api.delete(f"/api/v1/robots/{device.registration['robot_id']}")
    assert deleted.status_code == 204, deleted.text
    assert recorder.ws is not None
    await asyncio.wait_for(recorder.ws.wait_closed(), 10)
    assert await upgrade_status(device.rpc_url, device.token) == 404
    from botocore.exceptions import ClientError

    from keystone_core.storage import create_s3_client_for_endpoint

    s3 = device.registration["s3"]
    revoked = create_s3_client_for_endpoint(
        s3["endpoint_url"], access_key=s3["access_key"], secret_key=s3["secret_key"]
    )
    with pytest.raises(ClientError):
        revoked.put_object(Bucket=s3["bucket"], Key=f"{s3['prefix']}late.mcap", Body=b"x")
    status, _ = post_like_recorder(
        f"{api.base_url}/api/v1/callbacks/start",
        start_body(device.world.task_ids[0], device.device_id),
        device.token,
    )
    assert status in {401, 403}


# --- several workers ------------------------------------------------------------------------


@pytest.fixture
def second_api(live_api: LiveApi, tmp_path: Any) -> Iterator[LiveApi]:
    from tests.contract.conftest import start_api, stop_api

    api = start_api(dict(live_api.env), tmp_path / "second.log")
    yield api
    stop_api(api.process)


async def test_a_call_on_one_worker_reaches_a_socket_held_by_another(
    second_api: LiveApi, device: Device, recorder: ReplayRecorder, db: Engine
) -> None:
    async with httpx.AsyncClient(
        base_url=second_api.base_url, headers=device.world.admin_headers, timeout=30
    ) as other:
        await connected(other, device.device_id)
        reply = await other.post(f"/api/v1/recorder/{device.device_id}/config", json={})
        assert reply.status_code == 200, reply.text
        assert reply.json()["success"] is True
        await status_of(db, device.world.task_ids[0], "ready")


# --- the device-state stream ------------------------------------------------------------


async def test_device_state_changes_are_streamed(api: httpx.AsyncClient, device: Device) -> None:
    async with api.stream("GET", "/api/v1/device-state/stream") as stream:
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith(": connected")
        rec = ReplayRecorder(device.rpc_url, device.token, device.device_id)
        await rec.connect()
        seen: list[str] = []

        async def read() -> None:
            async for line in lines:
                if line.startswith("event: "):
                    seen.append(line.removeprefix("event: "))
                    if "recorder_state" in seen:
                        return

        await asyncio.wait_for(read(), 10)
        assert seen[:2] == ["device_connection", "recorder_state"]
        await rec.close()


AXON_CONFIG_DERIVED = {
    "keystone_url",
    "keystone_ws_url",
    "recorder_rpc_url",
    "transfer_ws_url",
    "robot_model",
    "config_dir",
}


def render_like_axon_config(template: str, registration: dict[str, Any]) -> str:
    """axon-config's rendering: dotted names from the response; an unknown name aborts."""
    import re

    def flat(prefix: str, value: Any) -> dict[str, str]:
        if isinstance(value, dict):
            out: dict[str, str] = {}
            for key, sub in value.items():
                out |= (
                    flat(f"{prefix}{key}.", sub)
                    if isinstance(sub, dict)
                    else {f"{prefix}{key}": str(sub)}
                )
            return out
        return {}

    values = flat("", registration)
    values["robot_model"] = registration["robot_type"]

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in values, f"axon-config would abort: unknown placeholder {name}"
        return values[name]

    return re.sub(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}", fill, template)


def test_c_reg_2_every_template_placeholder_is_in_the_registration_response(
    live_api: LiveApi, device: Device
) -> None:
    import yaml

    rendered = {}
    for name in ("recorder.yaml", "transfer.yaml"):
        template = httpx.get(  # no credentials, as axon-config downloads it
            f"{live_api.base_url}/api/v1/robot_types/{device.registration['robot_type_id']}"
            f"/configs/{name}",
            headers={"User-Agent": "axon-config/1.0"},
        )
        assert template.status_code == 200
        assert device.token not in template.text  # no secret in a template
        rendered[name] = yaml.safe_load(render_like_axon_config(template.text, device.registration))
    recorder, transfer = rendered["recorder.yaml"], rendered["transfer.yaml"]
    assert recorder["rpc"]["ws_client"]["url"] == device.rpc_url
    assert recorder["rpc"]["ws_client"]["auth_token"] == device.token
    assert recorder["recording"]["sidecar"]["mode"] == "always"
    assert transfer["scanner"]["require_json_sidecar"] is True
    assert recorder["dataset"]["path"] == transfer["scanner"]["data_dir"]
    assert transfer["device_id"] == device.device_id
    assert transfer["ws"]["url"] == device.registration["endpoints"]["transfer_ws_url"]
    assert transfer["uploader"]["s3"]["access_key"] == device.registration["s3"]["access_key"]


async def test_a_flooding_device_is_limited_without_affecting_others(
    api: httpx.AsyncClient, device: Device, recorder: ReplayRecorder, live_api: LiveApi
) -> None:
    other = register(live_api, device.world)
    quiet = ReplayRecorder(
        other["endpoints"]["recorder_rpc_url"], other["ws_client_auth_token"], other["device_id"]
    )
    await quiet.connect()
    quiet.start()
    await connected(api, device.device_id)
    await connected(api, other["device_id"])
    assert recorder.ws is not None
    # Frames are handled one at a time per socket (a flood of state updates queues behind
    # itself); cheap ones arrive faster than the per-socket rate and are dropped.
    frame = '{"data":{},"type":"flood"}'
    await asyncio.gather(*(recorder.ws.send(frame) for _ in range(600)))
    reply = await api.get(f"/api/v1/recorder/{other['device_id']}/stats")
    assert reply.status_code == 200
    metrics = (await api.get("/metrics")).text
    assert 'keystone_device_frames_rejected_total{channel="recorder",reason="rate"}' in metrics
    await quiet.close()


def test_a_flood_of_callbacks_is_rate_limited_per_device(
    live_api: LiveApi, device: Device, db: Engine
) -> None:
    task_id, token = configured(db, device, live_api)
    url = f"{live_api.base_url}/api/v1/callbacks/start"
    body = start_body(task_id, device.device_id)
    statuses = [post_like_recorder(url, body, token)[0] for _ in range(130)]
    assert statuses[0] == 200
    assert statuses[-1] == 429
    other = register(live_api, device.world)  # another device is not affected
    second, other_token = device.world.task_ids[1], other["ws_client_auth_token"]
    with db.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET robot_id=:r WHERE task_id=:t"),
            {"r": int(other["robot_id"]), "t": second},
        )
    assert post_like_recorder(url, start_body(second, other["device_id"]), other_token)[0] == 200
