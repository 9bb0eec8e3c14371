"""The recorder RPC gateway: WebSocket ``/recorder/{device_id}`` and the hub behind the façade.

The recorder dials ``/recorder/{device_id}`` (the URL its registration handed out) with the
device token as ``Authorization: Bearer`` when configured. Unknown devices and bad tokens
are refused at the HTTP upgrade (401/404; an accepted-then-closed socket would make the
recorder reconnect every second). After the upgrade nothing is expected first: the frames
(``state_update``, ``config_applied``, ``rpc_response``) are applied in arrival order.

One hub runs per API worker. Presence, RPCs in flight and their replies are database rows
(:mod:`keystone_core.services.presence`), so the façade on any worker reaches a socket held
by any other; the hub polls for RPCs addressed to its own sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from keystone_core import clock
from keystone_core.db import run_transaction
from keystone_core.errors import (
    AuthenticationError,
    ConflictError,
    DeviceTimeout,
    KeystoneError,
    NotFoundError,
)
from keystone_core.models import DeviceCommand
from keystone_core.ratelimit import RateLimited, RateLimiter
from keystone_core.services import presence, recorder
from keystone_core.services.devices import (
    DeviceIdentity,
    authenticate_device_token,
    live_device,
)
from keystone_core.settings import Settings

log = logging.getLogger("keystone.recorder")
T = TypeVar("T")

FRAMES = Counter(
    "keystone_device_frames_total", "Frames received from devices", ["channel", "type"]
)
REJECTED_FRAMES = Counter(
    "keystone_device_frames_rejected_total",
    "Device frames dropped (malformed, unknown type, over the rate)",
    ["channel", "reason"],
)
UPGRADES_REFUSED = Counter(
    "keystone_device_upgrades_refused_total",
    "Device WebSocket upgrades refused at the HTTP stage",
    ["channel", "reason"],
)
REPLACEMENTS = Counter(
    "keystone_device_replacements_total",
    "Device sockets replaced by a newer one of the same device",
    ["channel", "rapid"],
)
CONNECTIONS = Gauge(
    "keystone_device_connections",
    "Device sockets held (summed over live workers in multiprocess mode)",
    ["channel"],
    multiprocess_mode="livesum",
)
RPCS = Counter("keystone_recorder_rpcs_total", "Recorder RPCs by outcome", ["action", "outcome"])

# axon-protocol.md §2.7: finish hashes the whole file before replying.
SLOW_ACTIONS = frozenset({"finish", "finish_batch", "cancel", "cancel_batch", "quit"})
POLL_S = 0.1


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def bearer_of(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    parts = value.split()
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1]
    return None


def peer_of(ws: WebSocket) -> str:
    return ws.client.host if ws.client else "unknown"


def parse_frame(raw: str | bytes) -> Any:
    """JSON of a text or binary frame (the recorder's binary frames carry JSON too)."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


@dataclass
class LocalSocket:
    ws: WebSocket
    device: DeviceIdentity
    connection_id: str
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DeviceHub:
    """This worker's sockets of one device channel, and the way to every device's socket.

    The recorder hub is this class as is; the transfer hub overrides admission, frame
    handling and sending (its frames are flat and get no replies)."""

    channel = presence.RECORDER

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.worker_id = worker_identity()
        self.local: dict[str, LocalSocket] = {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._frames = RateLimiter(settings.recorder_frame_rate_per_second, 1.0)
        self._task: asyncio.Task[None] | None = None
        self._last_heartbeat = 0.0

    # --- database helpers -----------------------------------------------------------

    async def db(self, work: Callable[[Session], T]) -> T:
        return await run_in_threadpool(run_transaction, self.engine, work)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"{self.channel}-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for conn in list(self.local.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close(1001)
        ids = list(self.local)
        self.local.clear()
        if ids:
            with contextlib.suppress(Exception):
                await self.db(lambda s: [presence.disconnect(s, i, reason="shutdown") for i in ids])

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive a database hiccup
                log.exception("recorder hub tick failed")
                await asyncio.sleep(1.0)
            await asyncio.sleep(POLL_S)

    async def _tick(self) -> None:
        if not self.local:
            return
        ids = list(self.local)
        now = time.monotonic()
        beat = now - self._last_heartbeat >= self.settings.device_heartbeat_s
        if beat:
            self._last_heartbeat = now

        def work(session: Session) -> tuple[list[DeviceCommand], set[str]]:
            if beat:
                presence.heartbeat(session, ids)
            gone = presence.superseded(session, ids) if beat else set()
            return presence.claim_commands(session, ids), gone

        commands, gone = await self.db(work)
        for command in commands:
            await self._send_command(command)
        for connection_id in gone:
            conn = self.local.get(connection_id)
            if conn is not None:
                log.info("closing superseded %s socket of %s", self.channel, conn.device.device_id)
                with contextlib.suppress(Exception):
                    await conn.ws.close(1000)

    # --- the socket -----------------------------------------------------------------

    async def serve(self, ws: WebSocket) -> None:
        device_id = ws.path_params.get("device_id", "")
        peer = peer_of(ws)
        try:
            device = await self.db(lambda s: self._admit(s, device_id, bearer_of(ws.headers), peer))
        except KeystoneError as exc:
            status = self.refusal_status(exc)
            UPGRADES_REFUSED.labels(self.channel, exc.code).inc()
            log.warning(
                "%s upgrade for %r from %s refused: %s", self.channel, device_id, peer, exc.message
            )
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            await ws.send_denial_response(
                JSONResponse(
                    {"code": exc.code, "message": exc.message},
                    status_code=status,
                    headers=headers,
                )
            )
            return
        await ws.accept()
        connection_id = presence.new_connection_id()
        conn = LocalSocket(ws=ws, device=device, connection_id=connection_id)
        connected = await self.db(
            lambda s: presence.connect(
                s,
                robot_id=device.robot_id,
                factory_id=device.factory_id,
                device_id=device.device_id,
                channel=self.channel,
                connection_id=connection_id,
                worker_id=self.worker_id,
                remote_addr=peer,
            )
        )
        self.local[connection_id] = conn
        CONNECTIONS.labels(self.channel).set(len(self.local))
        if connected.replaced_connection_id is not None:
            REPLACEMENTS.labels(self.channel, str(connected.rapid_replacement).lower()).inc()
            level = logging.ERROR if connected.rapid_replacement else logging.INFO
            log.log(
                level,
                "%s %s reconnected from %s; the older socket is closed%s",
                self.channel,
                device.device_id,
                peer,
                " (replaced twice within seconds: two processes share this device id?)"
                if connected.rapid_replacement
                else "",
            )
            old = self.local.get(connected.replaced_connection_id)
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.ws.close(1000)
        reason = "closed"
        try:
            reason = await self._receive_loop(conn)
        finally:
            self.local.pop(connection_id, None)
            CONNECTIONS.labels(self.channel).set(len(self.local))
            await self.db(lambda s: presence.disconnect(s, connection_id, reason=reason))

    def refusal_status(self, exc: KeystoneError) -> int:
        return 404 if isinstance(exc, NotFoundError) else 401

    def max_frame_bytes(self) -> int:
        return self.settings.recorder_max_frame_bytes

    def _admit(
        self, session: Session, device_id: str, token: str | None, peer: str
    ) -> DeviceIdentity:
        device = live_device(session, device_id)
        if not self.settings.recorder_require_token and token is None:
            return device
        if token is None:
            raise AuthenticationError(
                "missing device token (Authorization: Bearer kws_v1_…)", code="missing_token"
            )
        holder = authenticate_device_token(session, token)
        if holder.robot_id != device.robot_id:
            raise AuthenticationError("the token belongs to another device", code="invalid_token")
        return device

    async def _receive_loop(self, conn: LocalSocket) -> str:
        limit = self.max_frame_bytes()
        while True:
            try:
                message = await conn.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return "disconnected"
            if message["type"] == "websocket.disconnect":
                return f"closed {message.get('code', '')}".strip()
            text = message.get("text")
            raw: str | bytes | None = text if text is not None else message.get("bytes")
            if raw is None:
                continue
            size = len(raw) if isinstance(raw, bytes) else len(raw.encode())
            if size > limit:
                REJECTED_FRAMES.labels(self.channel, "too_large").inc()
                log.warning(
                    "recorder %s sent a %d-byte frame (limit %d); closing with 1009",
                    conn.device.device_id,
                    size,
                    limit,
                )
                await conn.ws.close(1009)
                return "frame too large"
            try:
                self._frames.hit(conn.connection_id)
            except RateLimited:
                REJECTED_FRAMES.labels(self.channel, "rate").inc()
                continue
            if size > 64 * 1024:
                frame = await run_in_threadpool(parse_frame, raw)
            else:
                frame = parse_frame(raw)
            try:
                await self._dispatch(conn, frame)
            except Exception:  # one frame's failure must not cost the device its socket
                REJECTED_FRAMES.labels(self.channel, "error").inc()
                log.exception("%s frame of %s failed", self.channel, conn.device.device_id)

    async def _dispatch(self, conn: LocalSocket, frame: Any) -> None:
        device = conn.device
        if not isinstance(frame, dict):
            REJECTED_FRAMES.labels(self.channel, "malformed").inc()
            log.warning("recorder %s sent a frame that is not a JSON object", device.device_id)
            return
        kind = frame.get("type")
        data = frame.get("data")
        if kind == "state_update" and isinstance(data, dict):
            previous, current = data.get("previous"), data.get("current")
            task_id = data.get("task_id")
            if current not in recorder.STATES or previous not in recorder.STATES:
                REJECTED_FRAMES.labels(self.channel, "malformed").inc()
                return
            timestamp = frame.get("timestamp")
            FRAMES.labels(self.channel, kind).inc()
            await self.db(
                lambda s: recorder.on_state_update(
                    s,
                    device,
                    conn.connection_id,
                    previous=str(previous),
                    current=str(current),
                    task_id=task_id if isinstance(task_id, str) and task_id else None,
                    timestamp_ms=timestamp if isinstance(timestamp, int) else None,
                )
            )
        elif kind == "config_applied" and isinstance(data, dict):
            FRAMES.labels(self.channel, kind).inc()
            await self.db(lambda s: recorder.on_config_applied(s, device, conn.connection_id, data))
        elif kind == "rpc_response" and isinstance(frame.get("request_id"), str):
            FRAMES.labels(self.channel, kind).inc()
            await self._on_reply(conn, frame)
        else:
            REJECTED_FRAMES.labels(self.channel, "unknown_type").inc()
            log.warning(
                "recorder %s sent an unexpected frame (type %r); ignored",
                device.device_id,
                kind if isinstance(kind, str) else type(kind).__name__,
            )

    async def _on_reply(self, conn: LocalSocket, frame: dict[str, Any]) -> None:
        request_id = str(frame["request_id"])
        success = frame.get("success") is True

        def work(session: Session) -> None:
            command = presence.answer_command(session, request_id, success=success, response=frame)
            if command is not None and command.robot_id != conn.device.robot_id:
                command = None  # another device's request id: never act on it
            recorder.on_reply(session, conn.device, conn.connection_id, command, frame)

        await self.db(work)
        waiter = self._waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    async def _send_command(self, command: DeviceCommand) -> None:
        conn = self.local.get(command.connection_id)
        if conn is None:
            return
        frame: dict[str, Any] = {
            "type": "rpc_request",
            "request_id": command.request_id,
            "action": command.action,
            "params": command.params or {},
            # Feeds the recorder's clock-gap check (axon-protocol.md §2.6).
            "timestamp_ms": int(clock.now().timestamp() * 1000),
        }
        try:
            async with conn.send_lock:
                await conn.ws.send_text(json.dumps(frame, separators=(",", ":")))
        except Exception as exc:  # a dying socket: the requester times out
            log.warning("sending %s to %s failed: %s", command.action, conn.device.device_id, exc)

    # --- the façade's path to a device ----------------------------------------------

    def timeout_for(self, action: str) -> float:
        if action in SLOW_ACTIONS:
            return self.settings.recorder_finish_timeout_s
        return self.settings.recorder_rpc_timeout_s

    async def call(
        self,
        device: DeviceIdentity,
        action: str,
        params: Mapping[str, Any] | None,
        *,
        task_id: str | None,
        requested_by: str,
        prepare: Callable[[Session], None] | None = None,
    ) -> dict[str, Any]:
        """Send one RPC to the device's socket (on whichever worker) and wait for its reply."""
        timeout = self.timeout_for(action)
        heartbeat = self.settings.device_heartbeat_s

        def create(session: Session) -> DeviceCommand:
            row = presence.current_connection(session, device.robot_id, self.channel)
            if row is None or not presence.is_live(row, heartbeat):
                raise ConflictError(
                    f"recorder {device.device_id} is not connected", code="recorder_not_connected"
                )
            if prepare is not None:
                prepare(session)
            return presence.create_command(
                session,
                robot_id=device.robot_id,
                connection_id=row.connection_id,
                action=action,
                params=params,
                task_id=task_id,
                timeout_s=timeout,
                requested_by=requested_by,
            )

        command = await self.db(create)
        request_id = command.request_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future
        local = command.connection_id in self.local
        deadline = time.monotonic() + timeout
        try:
            if local:
                claimed = await self.db(
                    lambda s: presence.claim_commands(
                        s, [command.connection_id], request_id=request_id
                    )
                )
                for item in claimed:
                    await self._send_command(item)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    reply = await asyncio.wait_for(
                        asyncio.shield(future), timeout=remaining if local else min(0.1, remaining)
                    )
                    RPCS.labels(action, "answered").inc()
                    return reply
                except TimeoutError:
                    if local:
                        continue
                    row = await self.db(lambda s: presence.get_command(s, request_id))
                    if row is not None and row.status == "answered" and row.response is not None:
                        RPCS.labels(action, "answered").inc()
                        return dict(row.response)
        finally:
            self._waiters.pop(request_id, None)
        await self.db(lambda s: presence.expire_command(s, request_id))
        RPCS.labels(action, "timeout").inc()
        raise DeviceTimeout(
            f"recorder {device.device_id} did not answer {action} within {timeout:g} s; "
            "whether it acted is unknown (its next state update will tell)",
            action=action,
            result_unknown=True,
            request_id=request_id,
        )


class RecorderHub(DeviceHub):
    """The recorder channel (the base class is written for it)."""


async def reject_default_path(ws: WebSocket) -> None:
    """``/rpc``: the default path of a recorder provisioned without Keystone's endpoints."""
    UPGRADES_REFUSED.labels(presence.RECORDER, "default_path").inc()
    log.warning(
        "a recorder at %s dialed %s: it was provisioned without Keystone's endpoints "
        "(re-run axon-config register); refused",
        peer_of(ws),
        ws.url.path,
    )
    await ws.send_denial_response(
        JSONResponse(
            {
                "code": "use_device_endpoint",
                "message": "recorders connect to /recorder/{device_id}; re-register the device",
            },
            status_code=404,
        )
    )


async def recorder_socket(ws: WebSocket) -> None:
    hub: RecorderHub = ws.app.state.recorder_hub
    await hub.serve(ws)


def is_open(ws: WebSocket) -> bool:
    return ws.application_state is WebSocketState.CONNECTED
