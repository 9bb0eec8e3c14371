"""A live reference cloud receiver (uvicorn in a thread, real sockets) for integration tests.

    settings = receiver_settings(s3_server, database_url)      # a fresh random token
    with running_receiver(settings) as receiver:
        httpx.post(f"{receiver.base_url}/api/v1/sync/episode", headers=receiver.headers, ...)
        receiver.state("ep-1").complete_count                   # exactly-once proof

``receiver_database_url("sqlite", tmp_path)`` / ``("mariadb", …)`` give a fresh database.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import uvicorn

from keystone_core.storage import EmbeddedS3Server
from keystone_receiver.app import Backends, create_app
from keystone_receiver.errors import UnknownEpisode
from keystone_receiver.protocol import EpisodeState
from keystone_receiver.settings import ReceiverSettings
from tests.conftest import mariadb_url, recreate_mariadb_database

RECEIVER_MARIADB_DATABASE = "keystone_receiver_test"
START_TIMEOUT_S = 30.0

Backend = Literal["sqlite", "mariadb"]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def receiver_settings(
    s3: EmbeddedS3Server, database_url: str, **overrides: object
) -> ReceiverSettings:
    """Settings for a receiver on ``s3`` and ``database_url`` with a fresh random token.

    ``overrides`` are ReceiverSettings fields (``public_s3_endpoint_url=proxy.url``,
    ``part_size=5 * MIB``, ``bucket=…``, ``token=None, allow_anonymous=True``, …).
    """
    values: dict[str, object] = {
        "database_url": database_url,
        "s3_endpoint_url": s3.endpoint_url,
        "s3_access_key": s3.access_key,
        "s3_secret_key": s3.secret_key,
        "token": new_token(),
    }
    values.update(overrides)
    # Keyword construction still reads KEYSTONE_RECEIVER_* for fields not given here.
    return ReceiverSettings(**values)  # type: ignore[arg-type]


def receiver_database_url(
    backend: Backend, tmp_dir: Path, *, mariadb_database: str = RECEIVER_MARIADB_DATABASE
) -> str:
    """A fresh, empty database for a receiver: a SQLite file under ``tmp_dir`` or a MariaDB
    database (dropped and created again: give each test module its own name).

    MariaDB: raises ``pymysql.err.OperationalError`` when the server is unreachable (callers
    decide to skip or fail, e.g. through ``tests.conftest.unavailable``).
    """
    if backend == "sqlite":
        return f"sqlite:///{tmp_dir / 'receiver.db'}"
    recreate_mariadb_database(mariadb_database)
    return mariadb_url(mariadb_database)


@dataclass
class LiveReceiver:
    """A receiver serving on ``base_url``; ``state()`` reads its counters directly."""

    base_url: str
    settings: ReceiverSettings
    server: uvicorn.Server
    thread: threading.Thread
    backends: Backends

    @property
    def token(self) -> str | None:
        return self.settings.token.get_secret_value() if self.settings.token else None

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <token>`` (empty for an anonymous receiver)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """An httpx client on ``base_url`` that sends the token."""
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def state(self, episode_id: str) -> EpisodeState | None:
        """What ``GET /api/v1/sync/episode/{id}`` says (None if unknown), without HTTP."""
        try:
            return self.backends.sessions.state(episode_id)
        except UnknownEpisode:
            return None

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_receiver(settings: ReceiverSettings, *, timeout: float = START_TIMEOUT_S) -> LiveReceiver:
    """Serve ``create_app(settings)`` with uvicorn on a free 127.0.0.1 port in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"receiver-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            sock.close()
            raise RuntimeError("the cloud receiver did not start (its log says why)")
        time.sleep(0.02)
    return LiveReceiver(
        base_url=f"http://127.0.0.1:{port}",
        settings=settings,
        server=server,
        thread=thread,
        backends=app.state.backends,
    )


@contextmanager
def running_receiver(settings: ReceiverSettings) -> Iterator[LiveReceiver]:
    receiver = start_receiver(settings)
    try:
        yield receiver
    finally:
        receiver.stop()
