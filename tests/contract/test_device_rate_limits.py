"""Device rate limits on a live ``keystone api``: one noisy device does not starve another.

Registration, callbacks and config downloads answer 429 with ``Retry-After`` per device
(or per address where the device is not known yet) while another device in the same
window is served; a flooding recorder socket has its frames dropped and counted while a
second device's RPCs still round-trip. Devices get their own source addresses
(127.0.0.x) the way robots on a factory network have theirs. The same live server also
shows the access log: one JSON line per request, uvicorn's own access line off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from keystone_core import clock
from keystone_core.models import EnrollmentWindow, Factory
from keystone_core.storage import EmbeddedS3Server
from tests.contract.capture import ReplayRecorder, events
from tests.contract.conftest import LiveApi, World, api_env, seed_world, start_api, stop_api

pytestmark = [pytest.mark.contract, pytest.mark.integration]

REGISTRATIONS_PER_MINUTE = 3
CALLBACKS_PER_MINUTE = 5
DOWNLOADS_PER_MINUTE = 4
FRAMES_PER_SECOND = 50
RPC_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def live_api(
    mariadb_migrated: str, s3_server: EmbeddedS3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveApi]:
    """This module's API, with limits low enough to reach (the conftest one's are high)."""
    data = tmp_path_factory.mktemp("limited-api")
    env = api_env(
        mariadb_migrated,
        s3_server,
        data,
        KEYSTONE_REGISTRATION_RATE_PER_MINUTE=str(REGISTRATIONS_PER_MINUTE),
        KEYSTONE_CALLBACK_RATE_PER_MINUTE=str(CALLBACKS_PER_MINUTE),
        KEYSTONE_CONFIG_DOWNLOAD_RATE_PER_MINUTE=str(DOWNLOADS_PER_MINUTE),
        KEYSTONE_RECORDER_FRAME_RATE_PER_SECOND=str(FRAMES_PER_SECOND),
        KEYSTONE_RECORDER_RPC_TIMEOUT_S=str(RPC_TIMEOUT_S),
        KEYSTONE_DEVICE_S3_CREDENTIALS="none",
        KEYSTONE_LOG_FORMAT="json",
    )
    api = start_api(env, data / "api.log")
    yield api
    stop_api(api.process)


def client_from(live: LiveApi, address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (a device of its own)."""
    return httpx.Client(
        base_url=live.base_url,
        transport=httpx.HTTPTransport(local_address=address),
        timeout=30,
    )


def register_from(live: LiveApi, world: World, address: str) -> httpx.Response:
    with client_from(live, address) as client:
        return client.post(
            "/api/v1/devices/register",
            content=f'{{"factory":"{world.factory_name}","robot_type":"{world.robot_type_model}"}}',
            headers={"Content-Type": "application/json", "User-Agent": "axon-config/1.0"},
        )


def registered(live: LiveApi, world: World, address: str) -> dict[str, Any]:
    response = register_from(live, world, address)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    body = response.json()
    assert body["code"] == "rate_limited"
    assert body["message"].startswith("too many requests; retry in ")


# --- registration ---------------------------------------------------------------------


def test_a_noisy_address_is_refused_registration_while_another_registers(
    live_api: LiveApi, db: Engine
) -> None:
    world = seed_world(db, live_api, tag="rl-reg")
    noisy = [register_from(live_api, world, "127.0.0.11") for _ in range(5)]
    assert [r.status_code for r in noisy] == [201] * REGISTRATIONS_PER_MINUTE + [429, 429]
    assert_rate_limited(noisy[-1])
    assert register_from(live_api, world, "127.0.0.12").status_code == 201
    # A factory takes ten addresses' worth; the noisy address's refusals did not count.
    statuses = [
        register_from(live_api, world, f"127.0.0.{13 + n // 3}").status_code for n in range(27)
    ]
    used_before = REGISTRATIONS_PER_MINUTE + 1
    allowed = 10 * REGISTRATIONS_PER_MINUTE - used_before
    assert statuses == [201] * allowed + [429] * (27 - allowed)
    # Another factory is not affected by this one's storm.
    other = another_factory(db, world)
    assert register_from(live_api, other, "127.0.0.30").status_code == 201


def another_factory(db: Engine, world: World) -> World:
    """A second factory with an open enrollment window, same organization and robot type."""
    stamp = uuid.uuid4().hex[:8]
    with Session(db) as session:
        first = session.get(Factory, world.factory_id)
        assert first is not None
        factory = Factory(
            organization_id=first.organization_id, name=f"Factory {stamp}", slug=f"fac-{stamp}"
        )
        session.add(factory)
        session.flush()
        assert factory.id is not None
        session.add(
            EnrollmentWindow(
                factory_id=factory.id, expires_at=clock.now() + dt.timedelta(minutes=30)
            )
        )
        session.commit()
        return dataclasses.replace(world, factory_id=factory.id, factory_name=factory.name)


# --- callbacks -------------------------------------------------------------------------


def start_callback(task_id: str, device_id: str) -> str:
    """The recorder's captured start callback with this test's ids."""
    for event in events("02_lifecycle_with_auth.jsonl"):
        if event["kind"] == "http_request" and "start" in event["path"]:
            raw = str(event["raw"])
            body = json.loads(raw)
            return raw.replace(f'"{body["task_id"]}"', f'"{task_id}"').replace(
                f'"{body["device_id"]}"', f'"{device_id}"'
            )
    raise AssertionError("no captured start callback")


def task_for(db: Engine, live: LiveApi, world: World, index: int, robot_id: str) -> tuple[str, str]:
    """Task ``index`` assigned to the robot (as a config would); its id and user_token."""
    task_id = world.task_ids[index]
    with db.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET robot_id=:r, status='ready' WHERE task_id=:t"),
            {"r": int(robot_id), "t": task_id},
        )
        row_id = conn.execute(
            text("SELECT id FROM tasks WHERE task_id=:t"), {"t": task_id}
        ).scalar()
    config = httpx.get(f"{live.base_url}/api/v1/tasks/{row_id}/config", headers=world.admin_headers)
    assert config.status_code == 200, config.text
    return task_id, str(config.json()["user_token"])


def callback(client: httpx.Client, task_id: str, device_id: str, token: str) -> httpx.Response:
    return client.post(
        "/api/v1/callbacks/start",
        content=start_callback(task_id, device_id),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )


def test_a_device_flooding_callbacks_gets_429_while_a_device_behind_the_same_nat_is_served(
    live_api: LiveApi, db: Engine
) -> None:
    world = seed_world(db, live_api, tasks=2, tag="rl-cb")
    noisy = registered(live_api, world, "127.0.0.31")
    quiet = registered(live_api, world, "127.0.0.32")
    noisy_task, noisy_token = task_for(db, live_api, world, 0, noisy["robot_id"])
    quiet_task, quiet_token = task_for(db, live_api, world, 1, quiet["robot_id"])
    with client_from(live_api, "127.0.0.33") as nat:  # both robots behind one address
        flood = [callback(nat, noisy_task, noisy["device_id"], noisy_token) for _ in range(7)]
        assert [r.status_code for r in flood] == [200] * CALLBACKS_PER_MINUTE + [429, 429]
        assert_rate_limited(flood[-1])
        answer = callback(nat, quiet_task, quiet["device_id"], quiet_token)
        assert answer.status_code == 200, answer.text

    # The address itself takes ten devices' worth; unauthenticated tries count there too.
    with client_from(live_api, "127.0.0.34") as storm:
        refused = [
            callback(storm, quiet_task, quiet["device_id"], "kws_v1_wrong").status_code
            for _ in range(10 * CALLBACKS_PER_MINUTE)
        ]
        assert set(refused) == {401}
        assert_rate_limited(callback(storm, quiet_task, quiet["device_id"], quiet_token))
    with client_from(live_api, "127.0.0.35") as elsewhere:
        answer = callback(elsewhere, quiet_task, quiet["device_id"], quiet_token)
        assert answer.status_code == 200, answer.text


# --- config downloads ------------------------------------------------------------------


def test_config_downloads_are_limited_per_address(live_api: LiveApi, db: Engine) -> None:
    world = seed_world(db, live_api, tag="rl-cfg")
    path = f"/api/v1/robot_types/{world.robot_type_id}/configs/recorder.yaml"
    with client_from(live_api, "127.0.0.41") as noisy:
        statuses = [noisy.get(path) for _ in range(DOWNLOADS_PER_MINUTE + 2)]
    assert [r.status_code for r in statuses] == [200] * DOWNLOADS_PER_MINUTE + [429, 429]
    assert_rate_limited(statuses[-1])
    with client_from(live_api, "127.0.0.42") as quiet:
        assert quiet.get(path).status_code == 200


# --- recorder sockets ------------------------------------------------------------------


REJECTED = re.compile(
    r'^keystone_device_frames_rejected_total\{channel="recorder",reason="(\w+)"\} ([0-9.e+]+)$',
    re.M,
)


async def rejected(api: httpx.AsyncClient) -> dict[str, float]:
    metrics = (await api.get("/metrics")).text
    return {reason: float(value) for reason, value in REJECTED.findall(metrics)}


async def connected(api: httpx.AsyncClient, device_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = (await api.get(f"/api/v1/recorder/{device_id}/state")).json()
        if body.get("connected"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"recorder {device_id} never connected")


async def round_trip(api: httpx.AsyncClient, device_id: str) -> float:
    """One get_stats RPC through the device's socket; its duration in seconds."""
    started = time.monotonic()
    reply = await api.get(f"/api/v1/recorder/{device_id}/stats")
    assert reply.status_code == 200, reply.text
    return time.monotonic() - started


@pytest.mark.anyio
async def test_a_flooding_recorder_loses_frames_not_its_socket_and_others_keep_round_tripping(
    live_api: LiveApi, db: Engine
) -> None:
    world = seed_world(db, live_api, tag="rl-ws")
    noisy = registered(live_api, world, "127.0.0.51")
    quiet = registered(live_api, world, "127.0.0.52")
    flooder = ReplayRecorder(
        noisy["endpoints"]["recorder_rpc_url"], noisy["ws_client_auth_token"], noisy["device_id"]
    )
    other = ReplayRecorder(
        quiet["endpoints"]["recorder_rpc_url"], quiet["ws_client_auth_token"], quiet["device_id"]
    )
    async with httpx.AsyncClient(
        base_url=live_api.base_url, headers=world.admin_headers, timeout=30
    ) as api:
        for recorder in (flooder, other):
            await recorder.connect()
            recorder.start()
            await connected(api, recorder.device_id)
        before = await rejected(api)
        assert flooder.ws is not None
        sent = 3000
        frame = '{"data":{},"type":"flood"}'
        started = time.monotonic()

        async def flood() -> None:
            assert flooder.ws is not None
            for _ in range(sent):
                await flooder.ws.send(frame)

        async def rpcs() -> list[float]:
            return [await round_trip(api, other.device_id) for _ in range(5)]

        _, durations = await asyncio.gather(flood(), rpcs())
        # The quiet device's RPCs were answered through its own socket, well inside the
        # RPC timeout, while the flood went on.
        assert max(durations) < RPC_TIMEOUT_S / 2, durations

        # Every flood frame is accounted for: dropped over the rate ("rate") or let through
        # and then dropped as an unknown type.
        deadline = time.monotonic() + 30
        while True:
            after = await rejected(api)
            dropped = after.get("rate", 0) - before.get("rate", 0)
            let_through = after.get("unknown_type", 0) - before.get("unknown_type", 0)
            if dropped + let_through >= sent or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        assert dropped + let_through == sent
        # A sliding window of one second lets at most FRAMES_PER_SECOND through per second.
        assert let_through <= FRAMES_PER_SECOND * (elapsed + 1)
        assert dropped >= sent - FRAMES_PER_SECOND * (elapsed + 1)

        # The flooder kept its socket (frames were dropped, not the connection) and, once
        # its window has room again, its own RPCs round-trip. A reply it sent while its
        # window was still full was dropped like any frame: that RPC times out (504).
        state = (await api.get(f"/api/v1/recorder/{flooder.device_id}/state")).json()
        assert state["connected"] is True
        deadline = time.monotonic() + 4 * RPC_TIMEOUT_S
        while True:
            reply = await api.get(f"/api/v1/recorder/{flooder.device_id}/stats")
            if reply.status_code == 200 or time.monotonic() > deadline:
                break
            assert reply.status_code == 504, reply.text
        assert reply.status_code == 200, reply.text
        for recorder in (flooder, other):
            await recorder.close()


# --- the access log of the live server -------------------------------------------------


def test_the_live_server_writes_one_json_access_line_per_request(live_api: LiveApi) -> None:
    request_id = f"req-live-{uuid.uuid4().hex[:8]}"
    live = f"{live_api.base_url}/api/v1/health/live"
    answer = httpx.get(live, headers={"X-Request-ID": request_id})
    assert answer.headers["x-request-id"] == request_id
    unsafe = httpx.get(live, headers={"X-Request-ID": "two words"})
    replaced = unsafe.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)

    def mentions(value: str) -> list[str]:
        return [line for line in live_api.log().splitlines() if value in line]

    deadline = time.monotonic() + 10
    while not (mentions(request_id) and mentions(replaced)) and time.monotonic() < deadline:
        time.sleep(0.1)
    (line,) = mentions(request_id)
    entry = json.loads(line)
    assert entry["logger"] == "keystone.access"
    assert entry["route"] == "/api/v1/health/live"
    assert entry["status"] == 200
    assert entry["method"] == "GET"
    assert entry["client"] == "127.0.0.1"
    assert entry["duration_ms"] >= 0
    assert len(mentions(replaced)) == 1
    assert "two words" not in live_api.log()
    # uvicorn's own lines go through the same formatter; its access log is off.
    startup = [json.loads(x) for x in live_api.log().splitlines() if '"logger": "uvicorn' in x]
    assert startup
    assert {e["logger"] for e in startup} <= {"uvicorn.error", "uvicorn"}
