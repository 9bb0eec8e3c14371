"""``keystone simulate``: Axon devices speaking the real protocol, and operators driving them.

Each simulated robot registers like ``axon-config`` (no credentials, inside an enrollment
window), then runs both programs the way the real ones behave on the wire:

- a **recorder** on ``/recorder/{device_id}`` (Bearer device token) that answers
  ``config``/``begin``/``finish``/… with the recorder's frames (``config_applied``,
  ``state_update``, ``rpc_response``, compact JSON with sorted keys) and fires the start and
  finish callbacks with the task's ``user_token``; on ``finish`` it writes an Axon-format
  episode (:mod:`keystone_core.simulation.episodes`) into its data directory;
- a **transfer** program on ``/transfer/{device_id}`` that sends ``connected``, answers
  ``upload_request`` with ``upload_started``, uploads MCAP + sidecar to S3 under
  ``{factory_id}/{device_id}/{date}/`` with its own key and ``checksum-sha256`` metadata,
  sends ``upload_complete``, and deletes its copy on ``upload_ack``.

An operator per robot drives the REST façade as Synapse does (``config`` → ``begin`` →
record → ``finish``) for its tasks. It is also the load generator: the summary reports
latencies and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from keystone_core.simulation.episodes import EpisodeSpec, generate
from keystone_core.storage.client import create_s3_client_for_endpoint


def _compact(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _iso_now() -> str:
    moment = datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class Metrics:
    started: float = field(default_factory=time.monotonic)
    callback_ms: list[float] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    episode_s: list[float] = field(default_factory=list)
    episodes: int = 0
    acked: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(message)

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

        elapsed = time.monotonic() - self.started
        return {
            "seconds": round(elapsed, 1),
            "episodes_recorded": self.episodes,
            "episodes_acked": self.acked,
            "episodes_per_hour": round(self.acked / elapsed * 3600, 1) if elapsed else 0.0,
            "callback_ms": {"p50": pct(self.callback_ms, 0.5), "p95": pct(self.callback_ms, 0.95)},
            "upload_complete_to_ack_ms": {
                "p50": pct(self.ack_ms, 0.5),
                "p95": pct(self.ack_ms, 0.95),
                "p99": pct(self.ack_ms, 0.99),
                "mean": round(statistics.fmean(self.ack_ms), 1) if self.ack_ms else None,
            },
            "errors": len(self.errors),
            "first_errors": self.errors[:10],
        }


@dataclass
class SimulatedRobot:
    """One robot: its registration, recorder socket, transfer socket and data directory."""

    base_url: str
    registration: dict[str, Any]
    data_dir: Path
    metrics: Metrics
    duration_s: float = 2.0
    target_bytes: int | None = None
    state: str = "idle"
    task_config: dict[str, Any] = field(default_factory=dict)
    recorder: ClientConnection | None = None
    transfer: ClientConnection | None = None
    complete_sent: dict[str, float] = field(default_factory=dict)
    _started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _callbacks: set[asyncio.Task[None]] = field(default_factory=set)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def device_id(self) -> str:
        return str(self.registration["device_id"])

    async def start(self) -> None:
        token = self.registration["ws_client_auth_token"]
        self.recorder = await connect(
            self.registration["endpoints"]["recorder_rpc_url"],
            additional_headers=[("Authorization", f"Bearer {token}")],
            user_agent_header=None,
            compression=None,
            max_size=16 * 1024 * 1024,
        )
        await self._send_state("idle", "idle", None)
        self.transfer = await connect(
            self.registration["endpoints"]["transfer_ws_url"] + "/" + self.device_id,
            user_agent_header=None,
            compression=None,
            max_size=16 * 1024 * 1024,
        )
        await self._transfer_send("connected", self._status())
        self._tasks = [
            asyncio.create_task(self._recorder_loop()),
            asyncio.create_task(self._transfer_loop()),
        ]

    async def stop(self) -> None:
        for ws in (self.recorder, self.transfer):
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- recorder ------------------------------------------------------------------------

    async def _send_state(self, previous: str, current: str, task_id: str | None) -> None:
        assert self.recorder is not None
        data: dict[str, Any] = {"current": current, "previous": previous}
        if task_id:
            data["task_id"] = task_id
        await self.recorder.send(
            _compact({"data": data, "timestamp": _now_ms(), "type": "state_update"})
        )

    async def _reply(
        self, request_id: str, success: bool, message: str, data: dict[str, Any]
    ) -> None:
        assert self.recorder is not None
        await self.recorder.send(
            _compact(
                {
                    "data": data,
                    "message": message,
                    "request_id": request_id,
                    "success": success,
                    "type": "rpc_response",
                }
            )
        )

    async def _recorder_loop(self) -> None:
        assert self.recorder is not None
        async for raw in self.recorder:
            request = json.loads(raw)
            try:
                await self._handle_rpc(request)
            except Exception as exc:  # a simulator bug must not kill the fleet
                self.metrics.error(f"{self.device_id} {request.get('action')}: {exc}")

    async def _handle_rpc(self, request: dict[str, Any]) -> None:
        action, request_id = request.get("action"), request.get("request_id")
        if not isinstance(action, str) or not isinstance(request_id, str):
            return  # the recorder answers nothing here
        params = request.get("params") if isinstance(request.get("params"), dict) else {}
        assert isinstance(params, dict)
        task_id = self.task_config.get("task_id")
        if action == "config" and self.state in ("idle", "ready"):
            self.task_config = dict(params.get("task_config") or {})
            task_id = self.task_config.get("task_id")
            echo = {
                k: v
                for k, v in self.task_config.items()
                if k not in ("start_callback_url", "finish_callback_url", "user_token") and v
            }
            assert self.recorder is not None
            await self.recorder.send(
                _compact({"data": echo, "timestamp": _now_ms(), "type": "config_applied"})
            )
            if self.state == "idle":
                await self._send_state("idle", "ready", task_id)
            self.state = "ready"
            await self._reply(
                request_id,
                True,
                "Task configuration set successfully",
                {"state": "ready", "task_id": task_id},
            )
        elif action == "begin" and self.state == "ready" and params.get("task_id") == task_id:
            self.state = "recording"
            self._started_at = datetime.now(UTC)
            await self._send_state("ready", "recording", task_id)
            self._fire(
                "start",
                {
                    "task_id": task_id,
                    "device_id": self.task_config.get("device_id"),
                    "status": "recording",
                    "started_at": self._started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "topics": self.task_config.get("topics", []),
                },
            )
            await self._reply(
                request_id,
                True,
                "Recording started successfully",
                {"state": "recording", "task_id": task_id},
            )
        elif action == "finish" and self.state in ("recording", "paused"):
            assert isinstance(task_id, str)
            episode = await asyncio.to_thread(
                generate,
                EpisodeSpec(
                    task_id=task_id,
                    device_id=self.device_id,
                    duration_s=self.duration_s,
                    target_bytes=self.target_bytes,
                    started_at=self._started_at,
                    seed=hash(task_id) % 10_000,
                ),
                self.data_dir,
            )
            self.metrics.episodes += 1
            previous, self.state = self.state, "idle"
            await self._send_state(previous, "idle", task_id)
            finished = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._fire(
                "finish",
                {
                    "task_id": task_id,
                    "device_id": self.task_config.get("device_id"),
                    "status": "finished",
                    "started_at": self._started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "finished_at": finished,
                    "duration_sec": round(self.duration_s, 3),
                    "message_count": episode.message_count,
                    "file_size_bytes": episode.size,
                    "output_path": f"/axon/recording/{task_id}.mcap",
                    "sidecar_path": f"/axon/recording/{task_id}.json",
                    "sidecar_enabled": True,
                    "sidecar_generated": True,
                    "topics": self.task_config.get("topics", []),
                    "metadata": {
                        "scene": self.task_config.get("scene", ""),
                        "subscene": self.task_config.get("subscene", ""),
                        "skills": self.task_config.get("skills", []),
                        "factory": self.task_config.get("factory", ""),
                    },
                    "error": None,
                },
            )
            await self._reply(
                request_id,
                True,
                "Recording finished successfully",
                {"state": "idle", "task_id": task_id},
            )
        elif action in ("get_state", "get_stats", "get_status"):
            await self._reply(
                request_id,
                True,
                "State retrieved successfully",
                {"state": self.state, "version": "0.4.0"},
            )
        else:
            await self._reply(
                request_id,
                False,
                f"Cannot {action} from state: {self.state}",
                {"state": self.state},
            )

    def _fire(self, kind: str, body: dict[str, Any]) -> None:
        task = asyncio.create_task(self._callback(kind, body))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _callback(self, kind: str, body: dict[str, Any]) -> None:
        """Fire-and-forget, like the recorder (the body keeps its fixed key order)."""
        url = self.task_config.get(f"{kind}_callback_url")
        if not url:
            return
        headers = {"User-Agent": "axon-recorder/1.0", "Content-Type": "application/json"}
        if self.task_config.get("user_token"):
            headers["Authorization"] = f"Bearer {self.task_config['user_token']}"
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(
                    url, content=json.dumps(body, separators=(", ", ": ")), headers=headers
                )
            self.metrics.callback_ms.append((time.monotonic() - started) * 1000)
            if response.status_code // 100 != 2:
                self.metrics.error(f"{kind} callback → {response.status_code}")
        except httpx.HTTPError as exc:
            self.metrics.error(f"{kind} callback: {exc}")

    # --- transfer -----------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        waiting = sorted(self.complete_sent)
        return {
            "active_count": 0,
            "bytes_per_sec": 0,
            "completed_count": 0,
            "destination": {},
            "device_id": self.device_id,
            "failed_count": 0,
            "pending_bytes": 0,
            "pending_count": 0,
            "progress": {},
            "recovery": {},
            "retry_wait_count": 0,
            "status_counts": {},
            "uploading_count": 0,
            "uploads": [],
            "version": "0.1.0",
            "waiting_ack_count": len(waiting),
            "waiting_ack_task_ids": waiting,
        }

    async def _transfer_send(self, kind: str, data: dict[str, Any]) -> None:
        assert self.transfer is not None
        await self.transfer.send(_compact({"data": data, "timestamp": _iso_now(), "type": kind}))

    async def _transfer_loop(self) -> None:
        assert self.transfer is not None
        async for raw in self.transfer:
            message = json.loads(raw)
            try:
                if message.get("type") == "upload_request":
                    await self._upload(str(message.get("task_id")))
                elif message.get("type") == "upload_ack":
                    self._on_ack(str(message.get("task_id")))
                elif message.get("type") == "status_query":
                    await self._transfer_send("status", self._status())
            except Exception as exc:
                self.metrics.error(f"{self.device_id} transfer {message.get('type')}: {exc}")

    async def _upload(self, task_id: str) -> None:
        mcap, sidecar = self.data_dir / f"{task_id}.mcap", self.data_dir / f"{task_id}.json"
        if task_id in self.complete_sent or not mcap.exists() or not sidecar.exists():
            await self._transfer_send(
                "upload_not_found",
                {
                    "detail": f"No MCAP file matching {task_id} in {self.data_dir}",
                    "task_id": task_id,
                },
            )
            return
        checksum = json.loads(sidecar.read_text())["recording"]["checksum_sha256"]
        s3 = self.registration["s3"]
        key = f"{s3['prefix']}{datetime.now(UTC):%Y-%m-%d}/{task_id}.mcap"
        size = mcap.stat().st_size
        await self._transfer_send(
            "upload_started",
            {
                "checksum_sha256": checksum,
                "file_size_bytes": size,
                "files": [mcap.name, sidecar.name],
                "object_key": key,
                "s3_key": key,
                "status": "pending",
                "task_id": task_id,
                "total_bytes": size,
                "upload_mode": "mcap_json",
            },
        )

        def put() -> None:
            client = create_s3_client_for_endpoint(
                s3["endpoint_url"] or None,
                access_key=s3["access_key"],
                secret_key=s3["secret_key"],
                region=s3["region"] or "us-east-1",
            )
            client.upload_file(
                str(mcap),
                s3["bucket"],
                key,
                ExtraArgs={
                    "ContentType": "application/octet-stream",
                    "Metadata": {"checksum-sha256": checksum},
                },
            )
            client.upload_file(
                str(sidecar),
                s3["bucket"],
                key[:-5] + ".json",
                ExtraArgs={"ContentType": "application/json"},
            )

        await asyncio.to_thread(put)
        self.complete_sent[task_id] = time.monotonic()
        await self._transfer_send(
            "upload_complete",
            {
                "bytes_uploaded": 0,
                "checksum_sha256": checksum,
                "duration_ms": 0,
                "file_size_bytes": size,
                "object_key": key,
                "s3_key": key,
                "status": "uploaded_wait_ack",
                "task_id": task_id,
                "upload_mode": "mcap_json",
            },
        )

    def _on_ack(self, task_id: str) -> None:
        sent = self.complete_sent.pop(task_id, None)
        if sent is None:
            return  # a repeated ACK is a no-op
        self.metrics.ack_ms.append((time.monotonic() - sent) * 1000)
        self.metrics.acked += 1
        for suffix in (".mcap", ".json"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / f"{task_id}{suffix}").unlink()
        self.acked.set()


@dataclass
class FleetPlan:
    base_url: str
    admin_account: str
    admin_password: str
    factory_id: int
    robots: int
    tasks_per_robot: int
    data_dir: Path
    duration_s: float = 2.0
    target_bytes: int | None = None
    ack_timeout_s: float = 120.0


async def _admin(client: httpx.AsyncClient, plan: FleetPlan) -> dict[str, str]:
    response = await client.post(
        "/api/v1/auth/login", json={"account": plan.admin_account, "password": plan.admin_password}
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def _setup(
    client: httpx.AsyncClient, plan: FleetPlan, headers: dict[str, str], robot_type: str
) -> list[dict[str, Any]]:
    """Enrollment window, N registrations, a station and a batch of tasks per robot."""
    factory = (await client.get(f"/api/v1/factories/{plan.factory_id}", headers=headers)).json()
    window = await client.post(
        "/api/v1/enrollment_windows",
        headers=headers,
        json={
            "factory_id": plan.factory_id,
            "duration_minutes": 30,
            "max_registrations": plan.robots,
            "note": "keystone simulate",
        },
    )
    window.raise_for_status()
    registrations = []
    for _ in range(plan.robots):
        response = await client.post(
            "/api/v1/devices/register",
            headers={"User-Agent": "axon-config/1.0"},
            json={"factory": factory["name"], "robot_type": robot_type},
        )
        response.raise_for_status()
        registrations.append(response.json())
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S%f")
    scene = await client.post(
        "/api/v1/scenes",
        headers=headers,
        json={"factory_id": plan.factory_id, "name": f"sim-scene-{stamp}"},
    )
    scene.raise_for_status()
    subscene = await client.post(
        "/api/v1/subscenes",
        headers=headers,
        json={"scene_id": int(scene.json()["id"]), "name": "sim-subscene"},
    )
    subscene.raise_for_status()
    sop = await client.post("/api/v1/sops", headers=headers, json={"slug": f"sim-sop-{stamp}"})
    sop.raise_for_status()
    group = {
        "sop_id": int(sop.json()["id"]),
        "subscene_id": int(subscene.json()["id"]),
        "quantity": plan.tasks_per_robot,
    }
    order = await client.post(
        "/api/v1/orders",
        headers=headers,
        json={
            "factory_id": plan.factory_id,
            "name": f"simulate {datetime.now(UTC):%Y%m%d-%H%M%S}",
            "target_count": plan.robots * plan.tasks_per_robot,
        },
    )
    order.raise_for_status()
    for registration in registrations:
        station = await client.post(
            "/api/v1/stations",
            headers=headers,
            json={
                "factory_id": plan.factory_id,
                "name": f"sim-{registration['device_id']}",
                "robot_id": int(registration["robot_id"]),
            },
        )
        station.raise_for_status()
        batch = await client.post(
            "/api/v1/batches",
            headers=headers,
            json={
                "order_id": int(order.json()["id"]),
                "workstation_id": int(station.json()["id"]),
                "task_groups": [group],
            },
        )
        batch.raise_for_status()
    return registrations


async def _operate(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    robot: SimulatedRobot,
    tasks: int,
    timeout: float,
) -> None:
    """What a data collector does in Synapse: next task, begin, record, finish, repeat."""
    base = f"/api/v1/recorder/{robot.device_id}"
    for _ in range(tasks):
        robot.acked.clear()
        for action in ("config", "begin"):
            reply = await client.post(f"{base}/{action}", headers=headers, json={})
            if reply.status_code != 200 or not reply.json().get("success"):
                robot.metrics.error(
                    f"{robot.device_id} {action} → {reply.status_code} {reply.text[:200]}"
                )
                return
        await asyncio.sleep(robot.duration_s)
        started = time.monotonic()
        reply = await client.post(f"{base}/finish", headers=headers, json={})
        if reply.status_code != 200 or not reply.json().get("success"):
            robot.metrics.error(
                f"{robot.device_id} finish → {reply.status_code} {reply.text[:200]}"
            )
            return
        try:
            await asyncio.wait_for(robot.acked.wait(), timeout)
        except TimeoutError:
            robot.metrics.error(f"{robot.device_id}: no upload_ack within {timeout:g} s")
            return
        robot.metrics.episode_s.append(time.monotonic() - started)


async def run_fleet(
    plan: FleetPlan,
    *,
    robot_type: str,
    progress: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Set up, connect every robot, record ``tasks_per_robot`` episodes each; the summary."""
    metrics = Metrics()
    async with httpx.AsyncClient(base_url=plan.base_url, timeout=300) as client:
        headers = await _admin(client, plan)
        registrations = await _setup(client, plan, headers, robot_type)
        progress(f"registered {len(registrations)} robots")
        robots = [
            SimulatedRobot(
                plan.base_url,
                r,
                plan.data_dir / r["device_id"],
                metrics,
                duration_s=plan.duration_s,
                target_bytes=plan.target_bytes,
            )
            for r in registrations
        ]
        for robot in robots:
            robot.data_dir.mkdir(parents=True, exist_ok=True)
            await robot.start()
        progress("all robots connected; recording")
        await asyncio.sleep(1.5)  # let the hubs see the connections
        try:
            await asyncio.gather(
                *(
                    _operate(client, headers, robot, plan.tasks_per_robot, plan.ack_timeout_s)
                    for robot in robots
                )
            )
        finally:
            for robot in robots:
                await robot.stop()
    return metrics.summary()
