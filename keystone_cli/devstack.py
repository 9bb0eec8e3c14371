"""``keystone dev``: the embedded stack — SeaweedFS, API and Dagster — as one process group each."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
import yaml
from rich.console import Console

from keystone_core.db import create_db_engine, session_scope
from keystone_core.errors import KeystoneError
from keystone_core.local_secrets import load_or_create_secrets
from keystone_core.logs import configure_logging
from keystone_core.services.bootstrap import prepare_database
from keystone_core.services.demo import DEMO_ROBOT_TYPE_MODEL, seed_demo
from keystone_core.settings import Settings, load_settings
from keystone_core.storage import EmbeddedS3Server, create_s3_client, ensure_bucket

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECEIVER_BUCKET = "keystone-cloud"
DAGSTER_DEV_HEADER = """\
# Written by `keystone dev`: the repository's dagster.yaml without its MySQL storage, so
# runs, events and schedules live in SQLite under this directory. Same run queue, pools,
# retries, telemetry and retention as production.
"""


def dagster_dev_config(production: Path = PROJECT_ROOT / "dagster.yaml") -> str:
    """The production instance config with Dagster's default (SQLite) storage."""
    config = yaml.safe_load(production.read_text(encoding="utf-8"))
    config.pop("storage", None)
    return DAGSTER_DEV_HEADER + yaml.safe_dump(config, sort_keys=False)


DEV_SECRETS = {
    "secret_key": lambda: secrets.token_urlsafe(48),
    "admin_password": lambda: secrets.token_urlsafe(12),
    "s3_access_key": lambda: "KS" + secrets.token_hex(9).upper(),
    "s3_secret_key": lambda: secrets.token_urlsafe(30),
}


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class DevStack:
    """Start, supervise and stop the embedded stack; Ctrl-C stops every child group."""

    api_port: int = 8000
    dagster_port: int = 3000
    s3_port: int = 8333
    receiver_port: int = 8100
    with_dagster: bool = True
    root: Path = field(default_factory=Path.cwd)
    console: Console = field(default_factory=Console)
    children: list[Child] = field(default_factory=list)
    _stopping: bool = False

    @property
    def data_dir(self) -> Path:
        return (self.root / ".keystone").resolve()

    def run(self) -> int:
        # Explicit handlers: a shell may start us with SIGINT ignored (background jobs).
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        s3: EmbeddedS3Server | None = None
        try:
            secrets_ = load_or_create_secrets(self.data_dir / "dev-secrets.json", DEV_SECRETS)
            s3 = EmbeddedS3Server(
                data_dir=self.data_dir / "s3",
                s3_port=self.s3_port,
                access_key=secrets_["s3_access_key"],
                secret_key=secrets_["s3_secret_key"],
            )
            self.console.print(f"starting embedded S3 (SeaweedFS) on port {self.s3_port} …")
            s3.start()
            env = self._child_env(secrets_, s3.endpoint_url)
            settings = load_settings(
                **{
                    k.removeprefix("KEYSTONE_").lower(): v
                    for k, v in env.items()
                    if k.startswith("KEYSTONE_")
                }
            )
            configure_logging(settings)
            factory_ids = self._prepare(settings)
            self._start_children(env)
            self._wait_ready()
            self._print_banner(settings, factory_ids)
            return self._supervise()
        except KeyboardInterrupt:
            return 0
        except (RuntimeError, KeystoneError) as exc:
            self.console.print(f"[red]keystone dev failed:[/] {exc}", highlight=False)
            return 1
        finally:
            self._stop_children()
            if s3 is not None:
                s3.stop()
            self.console.print("stopped.")

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def _child_env(self, secrets_: dict[str, str], s3_endpoint: str) -> dict[str, str]:
        dagster_home = self.data_dir / "dagster"
        dagster_home.mkdir(parents=True, exist_ok=True)
        (dagster_home / "dagster.yaml").write_text(dagster_dev_config(), encoding="utf-8")
        # One host, one metrics directory: the API's /metrics also shows what Dagster's
        # runs counted (QA verdicts, sync attempts, webhook deliveries). Fresh per start.
        metrics_dir = self.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        # Derived, not stored: data directories made before the receiver existed still load.
        receiver_token = hmac.new(
            secrets_["secret_key"].encode(), b"keystone dev cloud receiver", hashlib.sha256
        ).hexdigest()
        return {
            "KEYSTONE_ENV": "dev",
            "KEYSTONE_DATA_DIR": str(self.data_dir),
            "KEYSTONE_DATABASE_URL": f"sqlite:///{self.data_dir / 'keystone.db'}",
            "KEYSTONE_SECRET_KEY": secrets_["secret_key"],
            "KEYSTONE_ADMIN_PASSWORD": secrets_["admin_password"],
            "KEYSTONE_S3_ENDPOINT_URL": s3_endpoint,
            "KEYSTONE_S3_ACCESS_KEY": secrets_["s3_access_key"],
            "KEYSTONE_S3_SECRET_KEY": secrets_["s3_secret_key"],
            "KEYSTONE_API_PORT": str(self.api_port),
            "DAGSTER_HOME": str(dagster_home),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            # Approved episodes sync to the reference cloud receiver started alongside.
            "KEYSTONE_SYNC_TARGET": "http",
            "KEYSTONE_SYNC_HTTP_URL": f"http://127.0.0.1:{self.receiver_port}",
            "KEYSTONE_SYNC_HTTP_TOKEN": receiver_token,
            "KEYSTONE_RECEIVER_DATABASE_URL": f"sqlite:///{self.data_dir / 'receiver.db'}",
            "KEYSTONE_RECEIVER_S3_ENDPOINT_URL": s3_endpoint,
            "KEYSTONE_RECEIVER_S3_ACCESS_KEY": secrets_["s3_access_key"],
            "KEYSTONE_RECEIVER_S3_SECRET_KEY": secrets_["s3_secret_key"],
            "KEYSTONE_RECEIVER_BUCKET": RECEIVER_BUCKET,
            "KEYSTONE_RECEIVER_TOKEN": receiver_token,
            # Readable lines in .keystone/logs/ unless KEYSTONE_LOG_FORMAT says otherwise.
            "KEYSTONE_LOG_FORMAT": _explicit_log_format() or "text",
            # Without the daemon there is no heartbeat for /health to wait for.
            "KEYSTONE_HEALTH_REQUIRE_DAGSTER": "true" if self.with_dagster else "false",
        }

    def _prepare(self, settings: Settings) -> list[int]:
        self.console.print("migrating the database and seeding demo data …")
        engine = create_db_engine(settings)
        try:
            prepare_database(engine, settings)
            with session_scope(engine) as session:
                demo = seed_demo(session)
        finally:
            engine.dispose()
        client = create_s3_client(settings)
        for factory_id in demo.factory_ids:
            ensure_bucket(client, settings.bucket_for_factory(str(factory_id)))
        return demo.factory_ids

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log_path = self.data_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 (our own executables)
                argv,
                cwd=PROJECT_ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        self.children.append(Child(name, process, log_path))

    def _start_children(self, env: dict[str, str]) -> None:
        bin_dir = Path(sys.executable).parent
        workspace = str(PROJECT_ROOT / "workspace.yaml")
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "keystone_cli",
                "api",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
            ],
            env,
        )
        self._spawn(
            "cloud-receiver",
            [
                sys.executable,
                "-m",
                "keystone_cli",
                "cloud-receiver",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.receiver_port),
                "--log-format",
                env["KEYSTONE_LOG_FORMAT"],
            ],
            env,
        )
        if self.with_dagster:
            # Create Dagster's storage once, before its two processes start: both would
            # otherwise initialise the same SQLite files at once and can stamp two heads.
            self.console.print("preparing Dagster storage …")
            migrated = subprocess.run(  # noqa: S603 (our own executable)
                [str(bin_dir / "dagster"), "instance", "migrate"],
                cwd=PROJECT_ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=False,
            )
            if migrated.returncode != 0:
                tail = "\n".join(migrated.stderr.splitlines()[-10:])
                raise RuntimeError(f"dagster instance migrate failed:\n{tail}")
            self._spawn(
                "dagster-webserver",
                [
                    str(bin_dir / "dagster-webserver"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.dagster_port),
                    "-w",
                    workspace,
                ],
                env,
            )
            self._spawn(
                "dagster-daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace], env
            )

    def _wait_ready(self, timeout_s: float = 180.0) -> None:
        checks = {
            "api": f"http://127.0.0.1:{self.api_port}/api/v1/health",
            "cloud-receiver": f"http://127.0.0.1:{self.receiver_port}/health",
        }
        if self.with_dagster:
            checks["dagster-webserver"] = f"http://127.0.0.1:{self.dagster_port}/server_info"
        deadline = time.monotonic() + timeout_s
        pending = dict(checks)
        while pending:
            self._raise_if_child_died()
            for name, url in list(pending.items()):
                try:
                    if httpx.get(url, timeout=2.0).status_code == 200:
                        self.console.print(f"  {name} is up")
                        del pending[name]
                except httpx.HTTPError:
                    continue  # not listening yet
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s:.0f}s: {', '.join(pending)}")
            if pending:
                time.sleep(0.5)

    def _raise_if_child_died(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None and not self._stopping:
                tail = child.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"{child.name} exited with code {code}; log {child.log_path}:\n"
                    + "\n".join(tail)
                )

    def _print_banner(self, settings: Settings, factory_ids: list[int]) -> None:
        c = self.console
        c.rule("[bold]Keystone dev stack is up")
        c.print(
            f"API        http://127.0.0.1:{self.api_port}/api/v1  "
            f"(docs: http://127.0.0.1:{self.api_port}/api/v1/docs)"
        )
        c.print(f"Health     http://127.0.0.1:{self.api_port}/api/v1/health")
        if self.with_dagster:
            c.print(f"Dagster    http://127.0.0.1:{self.dagster_port}")
        c.print(
            f"S3         {settings.s3_endpoint_url}  buckets: "
            + ", ".join(settings.bucket_for_factory(str(f)) for f in factory_ids)
        )
        c.print(
            f"Cloud      http://127.0.0.1:{self.receiver_port}  (reference cloud receiver; "
            f"synced copies in bucket {RECEIVER_BUCKET})"
        )
        c.print(
            f"Admin      account [bold]{settings.admin_account}[/]  password "
            f"[bold]{settings.admin_password.get_secret_value()}[/]"
        )
        c.print(f"Data       {self.data_dir}  (logs in {self.data_dir / 'logs'})")
        if factory_ids:
            # The password comes from .keystone/dev-secrets.json when run from this directory.
            command = shlex.join(
                [
                    "keystone",
                    "simulate",
                    "--factory",
                    str(factory_ids[0]),
                    "--robot-type",
                    DEMO_ROBOT_TYPE_MODEL,
                    "--robots",
                    "5",
                    "--api",
                    f"http://127.0.0.1:{self.api_port}",
                ]
            )
            c.print(f"Simulate   .tools/bin/uv run {command}", soft_wrap=True, highlight=False)
        c.print("Press Ctrl-C to stop.")

    def _supervise(self) -> int:
        while True:
            try:
                self._raise_if_child_died()
            except RuntimeError as exc:
                self.console.print(f"[red]{exc}[/]")
                return 1
            time.sleep(1.0)

    def _stop_children(self) -> None:
        self._stopping = True
        for child in self.children:
            if child.process.poll() is None:
                try:
                    os.killpg(child.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 15
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
            # Grandchildren (Dagster's code server) may outlive their parent: end the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)


def _explicit_log_format() -> str | None:
    """KEYSTONE_LOG_FORMAT when the environment sets it (a default does not count)."""
    settings = load_settings()
    return settings.log_format if "log_format" in settings.model_fields_set else None
