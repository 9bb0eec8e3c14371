"""Replay the real recorder: frames and callback bodies from ``../shared/fixtures``.

A :class:`ReplayRecorder` answers each server request with the frames the real
``axon-recorder`` sent for that action in a capture (``config_applied``, ``state_update``,
``rpc_response`` and the start/finish callbacks, in their captured order), with only the
ids swapped for the test's (request id, task id, device id). Callbacks go out as the
recorder sends them: raw HTTP/1.1 with its header order and ``Host`` without the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect

# A copy of the captures in ../shared/fixtures (kept in the repository for CI).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "axon-recorder"
CAPTURED_TASK = "task-cap-0001"
CAPTURED_DEVICE = "robot-cap-01"


def events(name: str) -> list[dict[str, Any]]:
    path = FIXTURES / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Step:
    kind: str  # "frame" (device → server WS text) | "callback" (HTTP POST)
    raw: str
    path: str = ""


def exchanges(name: str) -> dict[str, list[list[Step]]]:
    """For each action, in capture order: what the recorder sent after that request."""
    out: dict[str, list[list[Step]]] = {}
    current: list[Step] | None = None
    pending_id: str | None = None
    for event in events(name):
        body = event.get("body")
        if event["kind"] == "ws_text" and event["direction"] == "server->device":
            if isinstance(body, dict) and isinstance(body.get("request_id"), str):
                current = []
                pending_id = body["request_id"]
                out.setdefault(str(body.get("action")), []).append(current)
            continue
        if current is None:
            continue
        if event["kind"] == "ws_text" and event["direction"] == "device->server":
            current.append(Step("frame", event["raw"]))
            if isinstance(body, dict) and body.get("request_id") == pending_id:
                current = None
        elif event["kind"] == "http_request":
            current.append(Step("callback", event["raw"], event["path"]))
    return out


def captured_task_ids(name: str) -> set[str]:
    """Every task id the capture's server and recorder used (swapped for the test's)."""
    ids: set[str] = set()
    for event in events(name):
        body = event.get("body")
        if not isinstance(body, dict):
            continue
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        config = params.get("task_config") if isinstance(params.get("task_config"), dict) else {}
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        for value in (
            config.get("task_id"),
            params.get("task_id"),
            data.get("task_id"),
            body.get("task_id"),
        ):
            if isinstance(value, str) and value:
                ids.add(value)
    return ids


def device_frames(name: str) -> list[str]:
    """Every frame the recorder sent in a capture, in order."""
    return [
        str(e["raw"])
        for e in events(name)
        if e["kind"] == "ws_text" and e["direction"] == "device->server"
    ]


def snapshot(name: str) -> str:
    """The first frame of the capture's first connection (the connect snapshot)."""
    for event in events(name):
        if event["kind"] == "ws_text" and event["direction"] == "device->server":
            return str(event["raw"])
    raise AssertionError(f"{name} has no device frame")


def post_like_recorder(url: str, raw_body: str, token: str | None) -> tuple[int, bytes]:
    """POST exactly as axon-recorder does (header order, Host without port); status, body."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    body = raw_body.encode()
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.hostname}",
        "User-Agent: axon-recorder/1.0",
        "Content-Type: application/json",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 30) as s:
        s.sendall(request)
        return read_http_response(s)


def read_http_response(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, rest[:length]


@dataclass
class ReplayRecorder:
    """A recorder socket that answers Keystone's requests with captured frames."""

    url: str
    token: str | None
    device_id: str
    capture: str = "02_lifecycle_with_auth.jsonl"
    ws: ClientConnection | None = None
    task_id: str = CAPTURED_TASK
    user_token: str | None = None
    callback_urls: dict[str, str] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)
    callback_results: list[tuple[str, int]] = field(default_factory=list)
    skip_callbacks: bool = False
    _plays: dict[str, Iterator[list[Step]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def swap(self, raw: str, request_id: str | None = None, captured_id: str | None = None) -> str:
        out = raw.replace(CAPTURED_DEVICE, self.device_id)
        for captured in sorted(captured_task_ids(self.capture), key=len, reverse=True):
            out = out.replace(f'"{captured}"', f'"{self.task_id}"')
        if request_id and captured_id:
            out = out.replace(captured_id, request_id)
        return out

    async def connect(self, *, send_snapshot: bool = True) -> None:
        headers = [("Authorization", f"Bearer {self.token}")] if self.token else []
        self.ws = await connect(
            self.url,
            additional_headers=headers,
            user_agent_header=None,
            compression=None,
            max_size=16 * 1024 * 1024,
            ping_interval=None,
        )
        if send_snapshot:
            await self.ws.send(snapshot(self.capture))

    def script(self, action: str) -> list[Step] | None:
        """The next captured answer to ``action`` (the capture's answers, cycled)."""
        if action not in self._plays:
            self._plays[action] = itertools.cycle(exchanges(self.capture).get(action, []))
        return next(self._plays[action], None)

    def play_next(self, action: str, steps: list[Step]) -> None:
        """Answer the next ``action`` with ``steps``, then go back to the capture."""
        rest = self._plays.get(action) or itertools.cycle(exchanges(self.capture).get(action, []))
        self._plays[action] = itertools.chain([steps], rest)

    def use_capture(self, name: str) -> None:
        self.capture = name
        self._plays = {}

    async def serve(self) -> None:
        """Answer requests until the socket closes."""
        assert self.ws is not None
        async for message in self.ws:
            request = json.loads(message)
            self.received.append(request)
            await self.answer(request)

    def start(self) -> None:
        self._task = asyncio.create_task(self.serve())

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def answer(self, request: dict[str, Any]) -> None:
        assert self.ws is not None
        action = request.get("action")
        if action == "config":
            config = request["params"]["task_config"]
            self.task_id = config["task_id"]
            self.user_token = config.get("user_token")
            self.callback_urls = {
                "start": config.get("start_callback_url", ""),
                "finish": config.get("finish_callback_url", ""),
            }
        steps = self.script(str(action))
        if steps is None:
            return
        captured_id = None
        for step in steps:
            if step.kind == "frame":
                body = json.loads(step.raw)
                if body.get("type") == "rpc_response":
                    captured_id = body["request_id"]
        for step in steps:
            if step.kind == "frame":
                await self.ws.send(self.swap(step.raw, request.get("request_id"), captured_id))
            elif not self.skip_callbacks:
                kind = "finish" if "finish" in step.path else "start"
                url = self.callback_urls.get(kind)
                if url:
                    status, _ = await asyncio.to_thread(
                        post_like_recorder, url, self.swap(step.raw), self.user_token
                    )
                    self.callback_results.append((kind, status))
