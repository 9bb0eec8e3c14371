"""The transfer hub: WebSocket ``/transfer/{device_id}`` of the Axon transfer program.

The transfer program sends no credentials, so only registered, live device ids are
admitted (404 otherwise), optionally only from the factory's ``allowed_networks`` (403),
and nothing it says changes state without checking the object store first. Frames of up
to 64 MiB are accepted (``connected``/``status`` list every upload the device ever made).
Server → device frames are flat ``{type, task_id?, priority?}`` and get no reply; they go
through the same ``device_commands`` rows as recorder RPCs, so any worker can send them.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket

from keystone_api.ws.recorder import (
    FRAMES,
    REJECTED_FRAMES,
    DeviceHub,
    LocalSocket,
)
from keystone_core.errors import KeystoneError, PermissionDeniedError
from keystone_core.models import DeviceCommand, Factory
from keystone_core.services import presence, uploads
from keystone_core.services.devices import DeviceIdentity, live_device
from keystone_core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("keystone.transfer")

ACKS = Counter("keystone_upload_acks_total", "upload_ack frames sent", ["reason"])
VERIFICATIONS = Counter(
    "keystone_upload_verifications_total", "Upload verifications by outcome", ["outcome"]
)
MAX_FRAME_BYTES = 64 * 1024 * 1024
# How often a worker looks for verified-but-unACKed uploads and recordings to ask for.
ACK_POLL_S = 1.0


def _in_networks(networks: list[str], peer: str) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


class TransferHub(DeviceHub):
    channel = presence.TRANSFER

    def __init__(self, engine: Engine, settings: Settings, s3: S3Client) -> None:
        super().__init__(engine, settings)
        self.s3 = s3
        self._last_requests = 0.0
        # (robot, task) whose ACK this process is deciding or sending right now: the tick
        # and a device message must not both ACK the same upload.
        self._acking: set[tuple[int, str]] = set()

    def refusal_status(self, exc: KeystoneError) -> int:
        return 403 if isinstance(exc, PermissionDeniedError) else 404

    def max_frame_bytes(self) -> int:
        return MAX_FRAME_BYTES

    def _admit(
        self, session: Session, device_id: str, token: str | None, peer: str
    ) -> DeviceIdentity:
        device = live_device(session, device_id)
        factory = session.get(Factory, device.factory_id)
        networks = factory.allowed_networks if factory else []
        if networks and not _in_networks(networks, peer):
            raise PermissionDeniedError(
                f"transfer connections of factory {device.factory_id} are not accepted from {peer}",
                code="network_not_allowed",
            )
        return device

    async def _tick(self) -> None:
        await super()._tick()
        now = time.monotonic()
        if not self.local or now - self._last_requests < ACK_POLL_S:
            return
        self._last_requests = now
        sockets = {conn.device.robot_id: conn for conn in self.local.values()}
        due = await self.db(
            lambda s: uploads.due_upload_requests(
                s, sorted(sockets), dt.timedelta(seconds=self.settings.upload_request_cooldown_s)
            )
        )
        # Verified by the verify_uploads job (or earlier) but not ACKed yet.
        ready = await self.db(lambda s: uploads.verified_unacked(s, sorted(sockets)))
        for robot_id, task_id in ready:
            conn = sockets[robot_id]
            key = (robot_id, task_id)
            if key in self._acking:
                continue  # a device message is ACKing it now
            self._acking.add(key)
            try:
                # The list is a snapshot: the upload may have been ACKed since.
                pending = functools.partial(uploads.unacked, device=conn.device, task_id=task_id)
                if not await self.db(pending):
                    continue
                if await self._send(conn, {"type": "upload_ack", "task_id": task_id}):
                    ACKS.labels("verified").inc()
                    mark = functools.partial(
                        uploads.mark_acked, device=conn.device, task_id=task_id
                    )
                    await self.db(mark)
            finally:
                self._acking.discard(key)
        for robot_id, task_id in due:
            conn = sockets[robot_id]
            frame = {"type": "upload_request", "task_id": task_id, "priority": 1}
            if await self._send(conn, frame):
                mark = functools.partial(
                    uploads.mark_requested, device=conn.device, task_id=task_id
                )
                await self.db(mark)

    async def _send(self, conn: LocalSocket, frame: dict[str, Any]) -> bool:
        try:
            async with conn.send_lock:
                await conn.ws.send_text(json.dumps(frame, separators=(",", ":")))
        except Exception as exc:  # a dying socket: the next connection catches up
            log.warning("sending %s to %s failed: %s", frame["type"], conn.device.device_id, exc)
            return False
        return True

    async def _send_command(self, command: DeviceCommand) -> None:
        """Flat frame; the device never replies, so the command is answered on send."""
        conn = self.local.get(command.connection_id)
        if conn is None:
            return
        frame: dict[str, Any] = {"type": command.action}
        params = command.params or {}
        if isinstance(params.get("task_id"), str):
            frame["task_id"] = params["task_id"]
        if isinstance(params.get("priority"), int):
            frame["priority"] = params["priority"]
        if not await self._send(conn, frame):
            return
        reply = {"request_id": command.request_id, "success": True, "message": "sent"}
        await self.db(
            lambda s: presence.answer_command(s, command.request_id, success=True, response=reply)
        )
        if command.action == "upload_request" and isinstance(frame.get("task_id"), str):
            await self.db(lambda s: uploads.mark_requested(s, conn.device, frame["task_id"]))
        waiter = self._waiters.get(command.request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    async def _dispatch(self, conn: LocalSocket, frame: Any) -> None:
        device = conn.device
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            REJECTED_FRAMES.labels(self.channel, "malformed").inc()
            log.warning("transfer %s sent a frame that is not a typed object", device.device_id)
            return
        kind = frame["type"]
        data = frame.get("data") if isinstance(frame.get("data"), dict) else {}
        assert isinstance(data, dict)
        handlers = {
            "upload_started": uploads.on_upload_started,
            "upload_failed": uploads.on_upload_failed,
            "upload_not_found": uploads.on_upload_not_found,
            "local_cleanup_failed": uploads.on_local_cleanup_failed,
        }
        if kind in ("connected", "status"):
            FRAMES.labels(self.channel, kind).inc()
            if kind == "connected" or uploads.is_full_status(data):
                version = str(data.get("version", ""))[:32]
                waiting = await self.db(
                    lambda s: uploads.on_status(s, device, data, version=version)
                )
                for report in waiting:
                    await self._verify_and_ack(conn, report, reason="waiting_ack")
            else:
                # The short form (the upload_all reply): ask for the details.
                await self._send(conn, {"type": "status_query"})
        elif kind in handlers:
            FRAMES.labels(self.channel, kind).inc()
            handler = handlers[kind]
            await self.db(lambda s: handler(s, device, data))
        elif kind == "upload_complete":
            FRAMES.labels(self.channel, kind).inc()
            complete = uploads.Reported.of(data)
            if complete is not None:
                await self._verify_and_ack(conn, complete, reason="upload_complete")
        else:
            REJECTED_FRAMES.labels(self.channel, "unknown_type").inc()
            log.warning("transfer %s sent an unknown frame type %r", device.device_id, kind)

    async def _verify_and_ack(
        self, conn: LocalSocket, report: uploads.Reported, *, reason: str
    ) -> None:
        key = (conn.device.robot_id, report.task_id)
        if key in self._acking:
            return  # the tick is ACKing this upload right now
        self._acking.add(key)
        try:
            await self._verify_and_ack_once(conn, report, reason=reason)
        finally:
            self._acking.discard(key)

    async def _verify_and_ack_once(
        self, conn: LocalSocket, report: uploads.Reported, *, reason: str
    ) -> None:
        device = conn.device
        known = await self.db(lambda s: uploads.verified_upload(s, device, report.task_id))
        if known is None:
            if report.s3_key is None:  # a waiting id without an uploads[] entry
                task_id = report.task_id
                stored = await self.db(lambda s: uploads.known_report(s, device, task_id))
                if stored is None:
                    log.warning(
                        "transfer %s waits for an ACK of %s but names no object",
                        device.device_id,
                        report.task_id,
                    )
                    return
                report = stored
            verification = await run_in_threadpool(
                uploads.verify_objects, self.settings, self.s3, device, report
            )
            rehash = self.settings.ack_verify == "sha256"
            decision = await self.db(
                lambda s: uploads.record_verification(
                    s, device, report, verification, rehash=rehash
                )
            )
            outcome = (
                "checked" if decision.pending_hash else "verified" if decision.ack else "rejected"
            )
            VERIFICATIONS.labels(outcome).inc()
            if decision.pending_hash:
                return  # the verify_uploads job re-hashes it; the tick ACKs it then
            if not decision.ack:
                log.warning(
                    "no ACK for %s of %s: %s", report.task_id, device.device_id, decision.reason
                )
                return
        if await self._send(conn, {"type": "upload_ack", "task_id": report.task_id}):
            ACKS.labels(reason).inc()
            await self.db(lambda s: uploads.mark_acked(s, device, report.task_id))


async def transfer_socket(ws: WebSocket) -> None:
    hub: TransferHub = ws.app.state.transfer_hub
    await hub.serve(ws)
