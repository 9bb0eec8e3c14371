"""``keystone``: run the API, migrate, manage users, start the embedded dev stack, score
episodes (``keystone qa``) and generate or simulate recordings."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from keystone_core.errors import KeystoneError
from keystone_core.simulation.episodes import FAULTS

if TYPE_CHECKING:
    from keystone_core.settings import Settings

app = typer.Typer(
    name="keystone",
    help="Keystone — edge data platform for robot data collection.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
user_app = typer.Typer(help="Manage login accounts.", no_args_is_help=True)
app.add_typer(user_app, name="user")
err = Console(stderr=True)

# uvicorn's WebSocket limits are server-wide; the device channels need large frames and
# long (device-driven) keepalive, so every launcher sets them.
WS_MAX_SIZE = 64 * 1024 * 1024
WS_PING_INTERVAL_S = 300.0
WS_PING_TIMEOUT_S = 300.0


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default from settings).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from settings).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve the HTTP API (runs migrations on start unless KEYSTONE_MIGRATE_ON_START=false)."""
    import uvicorn

    from keystone_core.db import create_db_engine
    from keystone_core.services.bootstrap import prepare_database
    from keystone_core.settings import get_settings

    settings = get_settings()
    _configure_logging(settings)
    # Fail here with one clear line (bad settings, database down) rather than inside the
    # server's start-up; each worker repeats this cheaply (no pending migrations).
    engine = create_db_engine(settings)
    try:
        prepare_database(engine, settings)
    finally:
        engine.dispose()
    with _metrics_dir_for(workers, settings.prometheus_multiproc_dir):
        _serve_api(uvicorn, settings, host, port, workers)


@contextmanager
def _metrics_dir_for(workers: int, configured: Path | None) -> Iterator[None]:
    """Several workers share metrics through prometheus-client's multiprocess mode: give
    them a fresh directory unless PROMETHEUS_MULTIPROC_DIR names one (then it is the
    operator's, shared with other processes of the host, and left as it is)."""
    if workers == 1 or configured is not None:
        yield
        return
    import os
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="keystone-metrics-")
    # Workers are spawned after this and read the variable when prometheus-client loads.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _configure_logging(settings: Settings) -> None:
    """Log as KEYSTONE_LOG_FORMAT / KEYSTONE_LOG_LEVEL say (docs/observability.md)."""
    from keystone_core.logs import configure_logging

    configure_logging(settings)


def _serve_api(
    uvicorn: Any, settings: Settings, host: str | None, port: int | None, workers: int
) -> None:
    from keystone_core.logs import logging_config

    uvicorn.run(
        "keystone_api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        ws="websockets",
        ws_max_size=WS_MAX_SIZE,
        ws_ping_interval=WS_PING_INTERVAL_S,
        ws_ping_timeout=WS_PING_TIMEOUT_S,
        log_level=settings.log_level.lower(),
        # The same formatter for uvicorn's own lines (in every worker); its access log is
        # off because the middleware writes one line per request with the request id.
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,
        proxy_headers=True,
    )


@app.command("metrics-exporter")
def metrics_exporter(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 9464,
) -> None:
    """Serve /metrics for every process sharing PROMETHEUS_MULTIPROC_DIR on this host
    (the Dagster daemon's runs, where no API runs to export them)."""
    import threading

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from keystone_core.settings import get_settings

    settings = get_settings()
    _configure_logging(settings)
    directory = settings.prometheus_multiproc_dir
    if directory is None or not directory.is_dir():
        err.print(
            "[bold red]error:[/] set PROMETHEUS_MULTIPROC_DIR to the directory the "
            "processes of this host write their metrics to",
            highlight=False,
        )
        raise typer.Exit(2)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)
    err.print(f"metrics of {directory} at http://{host}:{port}/metrics", highlight=False)
    threading.Event().wait()


@app.command("cloud-receiver")
def cloud_receiver(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8100,
    log_format: Annotated[str, typer.Option(help="Log lines: json or text.")] = "json",
) -> None:
    """Serve the reference cloud receiver (docs/sync.md); settings: KEYSTONE_RECEIVER_*."""
    import uvicorn

    from keystone_core.logs import logging_config

    if log_format not in ("json", "text"):
        raise typer.BadParameter("use json or text", param_hint="--log-format")

    from keystone_receiver.app import create_app, open_backends
    from keystone_receiver.errors import ReceiverError
    from keystone_receiver.settings import ReceiverSettingsError, load_receiver_settings

    try:
        settings = load_receiver_settings()
        # Fail here with one clear line (no token, database or store down) rather than
        # inside the server's start-up; the app's own start repeats this cheaply.
        open_backends(settings).close()
    except ReceiverSettingsError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ReceiverError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        log_config=logging_config(
            settings.log_level, "text" if log_format == "text" else "json", access_log=True
        ),
        proxy_headers=True,
    )


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (to head by default)."""
    from keystone_core import migrate as migrations
    from keystone_core.db import create_db_engine
    from keystone_core.settings import get_settings

    settings = get_settings()
    _configure_logging(settings)
    engine = create_db_engine(settings)
    try:
        migrations.upgrade(engine, lock_dir=settings.data_dir, revision=revision)
        status = migrations.migration_status(engine)
    finally:
        engine.dispose()
    typer.echo(f"database at revision {status.current} (head {status.head})")


@app.command()
def retention(
    apply: Annotated[
        bool, typer.Option("--apply", help="Delete for real (default: dry run, a report).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Episodes at most.")] = 1000,
) -> None:
    """Edge retention: which edge copies a verified sync lets go (KEYSTONE_EDGE_RETENTION_DAYS).

    Prints a JSON report; exit 1 when deletions failed, 2 when retention is off and
    --apply was asked for.
    """
    import json

    from keystone_core.db import create_db_engine, session_scope
    from keystone_core.errors import ConflictError
    from keystone_core.services import retention as retention_service
    from keystone_core.services.audit import Actor
    from keystone_core.settings import get_settings
    from keystone_core.storage import create_s3_client

    settings = get_settings()
    _configure_logging(settings)
    engine = create_db_engine(settings)
    try:
        report = retention_service.expire(
            lambda: session_scope(engine),
            create_s3_client(settings),
            settings,
            dry_run=not apply,
            actor=Actor.system("cli"),
            limit=limit,
        )
    except ConflictError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    typer.echo(json.dumps(report.as_dict(), indent=2))
    if report.errors:
        raise typer.Exit(1)


@user_app.command("create")
def user_create(
    account: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[
        str, typer.Option(help="admin, production_manager, data_collector or data_inspector.")
    ],
    factory: Annotated[
        list[int] | None,
        typer.Option("--factory", "-f", help="Factory id in scope (repeat). None = all (admin)."),
    ] = None,
    display_name: Annotated[str, typer.Option(help="Name shown in the UI.")] = "",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a login account with a role and factory scope."""
    from keystone_core.db import create_db_engine, session_scope
    from keystone_core.models import Role
    from keystone_core.services.accounts import create_user
    from keystone_core.services.audit import Actor
    from keystone_core.settings import get_settings

    try:
        parsed_role = Role(role)
    except ValueError:
        raise typer.BadParameter(
            f"unknown role {role!r}; use one of {', '.join(r.value for r in Role)}",
            param_hint="--role",
        ) from None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    engine = create_db_engine(get_settings())
    try:
        with session_scope(engine) as session:
            user = create_user(
                session,
                account=account,
                password=password,
                role=parsed_role,
                factory_ids=factory or [],
                display_name=display_name,
                actor=Actor(type="cli", id="keystone-cli", account="cli"),
            )
            user_id = user.id
    finally:
        engine.dispose()
    typer.echo(f"created {parsed_role.value} account {account!r} (id {user_id})")


@app.command()
def dev(
    api_port: Annotated[int, typer.Option(help="API port.")] = 8000,
    dagster_port: Annotated[int, typer.Option(help="Dagster UI port.")] = 3000,
    s3_port: Annotated[int, typer.Option(help="Embedded S3 port.")] = 8333,
    receiver_port: Annotated[int, typer.Option(help="Reference cloud receiver port.")] = 8100,
    no_dagster: Annotated[bool, typer.Option("--no-dagster", help="Skip Dagster.")] = False,
) -> None:
    """Run everything on this machine: embedded S3, API, Dagster and the reference cloud
    receiver approved episodes sync to; SQLite under ./.keystone/."""
    from keystone_cli.devstack import DevStack

    code = DevStack(
        api_port=api_port,
        dagster_port=dagster_port,
        s3_port=s3_port,
        receiver_port=receiver_port,
        with_dagster=not no_dagster,
    ).run()
    raise typer.Exit(code)


@app.command()
def backup(
    out: Annotated[Path, typer.Option("--out", help="New directory to write the backup to.")],
    no_objects: Annotated[
        bool, typer.Option("--no-objects", help="Database only, not the buckets.")
    ] = False,
) -> None:
    """Back up the database (one consistent snapshot) and the factory buckets."""
    from keystone_core.db import create_db_engine
    from keystone_core.services import backup as backups
    from keystone_core.settings import get_settings
    from keystone_core.storage import create_s3_client

    settings = get_settings()
    engine = create_db_engine(settings)
    try:
        client = None if no_objects else create_s3_client(settings)
        report = backups.backup(engine, client, settings, out, progress=err.print)
    except backups.BackupError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    typer.echo(f"backup of revision {report.revision} written to {report.path}")


@app.command()
def restore(
    source: Annotated[Path, typer.Option("--from", help="A directory `keystone backup` wrote.")],
    force: Annotated[
        bool, typer.Option("--force", help="Empty a database that holds Keystone data first.")
    ] = False,
    no_objects: Annotated[
        bool, typer.Option("--no-objects", help="Database only, not the buckets.")
    ] = False,
    objects_only: Annotated[
        bool, typer.Option("--objects-only", help="Upload the objects again, not the database.")
    ] = False,
) -> None:
    """Restore a backup: verify it, recreate the database at its revision, migrate, upload."""
    from keystone_core.db import create_db_engine
    from keystone_core.services import backup as backups
    from keystone_core.settings import get_settings
    from keystone_core.storage import create_s3_client

    if no_objects and objects_only:
        err.print("[bold red]error:[/] --no-objects and --objects-only exclude each other")
        raise typer.Exit(2)
    settings = get_settings()
    engine = create_db_engine(settings)
    try:
        client = None if no_objects else create_s3_client(settings)
        report = backups.restore(
            engine,
            client,
            settings,
            source,
            force=force,
            database=not objects_only,
            progress=err.print,
        )
    except backups.BackupError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    typer.echo(
        f"restored revision {report.revision}: {sum(report.tables.values())} rows, "
        f"{report.objects} objects"
    )


@app.command("config-reference")
def config_reference(
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if docs/configuration.md is out of date.")
    ] = False,
) -> None:
    """Print the configuration reference (docs/configuration.md) generated from the settings."""
    from keystone_cli.config_reference import DOC_PATH, render

    text = render()
    if not check:
        print(text, end="")
        return
    if not DOC_PATH.is_file() or DOC_PATH.read_text(encoding="utf-8") != text:
        err.print(
            f"{DOC_PATH} is out of date: run `keystone config-reference > docs/configuration.md`"
        )
        raise typer.Exit(1)


@app.command("gen-mcap")
def gen_mcap(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the episode files.")],
    task_id: Annotated[str, typer.Option(help="Task id (the file stem).")] = "task-generated",
    device_id: Annotated[str, typer.Option(help="Device id in the metadata.")] = "sim-device",
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds of recording.")] = 10.0,
    size_mb: Annotated[
        float | None, typer.Option(min=0.01, help="Approximate file size (MiB).")
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(help="Inject a fault (repeatable): " + ", ".join(sorted(FAULTS))),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write an Axon-format episode: MCAP, JSON sidecar and .done marker."""
    import json

    from keystone_core.simulation.episodes import EpisodeSpec, generate

    faults = frozenset(fault or [])
    unknown = sorted(faults - FAULTS)
    if unknown:
        err.print(f"[red]unknown fault(s): {', '.join(unknown)}[/red]")
        raise typer.Exit(2)
    episode = generate(
        EpisodeSpec(
            task_id=task_id,
            device_id=device_id,
            duration_s=duration,
            target_bytes=int(size_mb * 2**20) if size_mb else None,
            faults=faults,
            seed=seed,
        ),
        out_dir,
    )
    print(
        json.dumps(
            {
                "mcap": str(episode.mcap_path),
                "sidecar": str(episode.sidecar_path),
                "sha256": episode.sha256,
                "size": episode.size,
                "message_count": episode.message_count,
                "topics": episode.topic_counts,
                "faults": sorted(faults),
            },
            indent=2,
        )
    )


@app.command()
def simulate(
    factory_id: Annotated[int, typer.Option("--factory", help="Factory id to register into.")],
    robot_type: Annotated[str, typer.Option(help="Robot type model the robots register as.")],
    robots: Annotated[int, typer.Option(min=1, max=2000, help="Simulated robots.")] = 5,
    tasks: Annotated[int, typer.Option(min=1, help="Episodes each robot records.")] = 2,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds per recording.")] = 2.0,
    size_mb: Annotated[float | None, typer.Option(min=0.01, help="MiB per episode.")] = None,
    api: Annotated[str, typer.Option(help="Keystone base URL.")] = "http://127.0.0.1:8000",
    account: Annotated[str, typer.Option(help="Admin account (opens the window).")] = "admin",
    password: Annotated[
        str,
        typer.Option(
            envvar="KEYSTONE_ADMIN_PASSWORD",
            help="Admin password; default: the dev stack's (.keystone/dev-secrets.json).",
        ),
    ] = "",
    data_dir: Annotated[Path, typer.Option(help="Where robots keep recordings.")] = Path(
        ".keystone/simulate"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run simulated Axon robots against Keystone over real HTTP, WebSocket and S3."""
    import asyncio
    import json

    from keystone_core.simulation.fleet import FleetPlan, run_fleet

    if not password:
        password = _dev_admin_password()
    plan = FleetPlan(
        base_url=api.rstrip("/"),
        admin_account=account,
        admin_password=password,
        factory_id=factory_id,
        robots=robots,
        tasks_per_robot=tasks,
        data_dir=data_dir,
        duration_s=duration,
        target_bytes=int(size_mb * 2**20) if size_mb else None,
    )
    summary = asyncio.run(
        run_fleet(plan, robot_type=robot_type, progress=lambda line: err.print(line))
    )
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        from rich.table import Table

        table = Table(title="keystone simulate")
        table.add_column("measure")
        table.add_column("value")
        for key, value in summary.items():
            table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
        Console().print(table)
    if summary["errors"]:
        raise typer.Exit(1)


def _dev_admin_password() -> str:
    """The admin password `keystone dev` generated in this directory, or exit 2."""
    import json

    secrets_file = Path(".keystone") / "dev-secrets.json"
    try:
        password = json.loads(secrets_file.read_text(encoding="utf-8"))["admin_password"]
    except (OSError, ValueError, KeyError, TypeError):
        err.print(
            "[bold red]error:[/] no admin password: pass --password, set "
            f"KEYSTONE_ADMIN_PASSWORD, or run from the directory of `keystone dev` "
            f"({secrets_file} not readable)",
            highlight=False,
        )
        raise typer.Exit(2) from None
    return str(password)


@app.command()
def qa(
    target: Annotated[str, typer.Argument(help="An MCAP file path or s3://bucket/key.")],
    tier: Annotated[
        str, typer.Option(help="fast (summary + indexes + sampled frames), thorough, or auto.")
    ] = "fast",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    require: Annotated[
        list[str] | None, typer.Option(help="A topic that must have messages (repeatable).")
    ] = None,
    task_id: Annotated[str | None, typer.Option(help="Expected task id.")] = None,
    device_id: Annotated[str | None, typer.Option(help="Expected device id.")] = None,
    checksum: Annotated[
        str | None, typer.Option(help="Expected SHA-256 (S3: the object's checksum metadata).")
    ] = None,
    min_duration: Annotated[float | None, typer.Option(help="Shortest acceptable, s.")] = None,
    max_duration: Annotated[float | None, typer.Option(help="Longest acceptable, s.")] = None,
) -> None:
    """Score one episode: a table of checks, the score and the verdict (or --json).

    Exit code 0: auto-approved; 1: needs inspection or QA failed; 2: unreadable input."""
    import json

    from keystone_core.qa.checks import Expectations, QAConfig
    from keystone_core.qa.run import AUTO, FAST, THOROUGH, assess
    from keystone_core.qa.source import LocalSource, S3Source, Source, SourceError, parse_s3_url
    from keystone_core.settings import load_settings

    if tier not in (FAST, THOROUGH, AUTO):
        err.print(f"[red]--tier must be fast, thorough or auto, not {tier!r}[/red]")
        raise typer.Exit(2)
    settings = load_settings()
    _configure_logging(settings)
    source: Source
    try:
        if target.startswith("s3://"):
            from keystone_core.storage import create_s3_client

            bucket, key = parse_s3_url(target)
            client = create_s3_client(settings)
            s3_source = S3Source(client, bucket, key)
            if checksum is None:
                head = client.head_object(Bucket=bucket, Key=key)
                checksum = head.get("Metadata", {}).get("checksum-sha256") or None
            source = s3_source
        else:
            source = LocalSource(Path(target))
    except (SourceError, ValueError) as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    expect = Expectations(
        task_id=task_id,
        device_id=device_id,
        required_topics=tuple(require or ()),
        min_duration_s=min_duration,
        max_duration_s=max_duration,
        checksum_sha256=checksum.lower() if checksum else None,
    )
    config = QAConfig(
        threshold=settings.qa_auto_approve_threshold,
        thorough_band=settings.qa_thorough_band,
        min_duration_s=settings.qa_min_duration_s,
        max_gap_s=settings.qa_max_gap_s,
    )
    try:
        report = assess(source, expect, config, tier=tier)
    except SourceError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    finally:
        source.close()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        from rich.table import Table

        table = Table(title=f"keystone qa — {report.source} ({report.tier} tier)")
        for column in ("check", "result", "value", "threshold", "reason"):
            table.add_column(column, overflow="fold")
        marks = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "[dim]n/a[/dim]"}
        for check in report.checks:
            table.add_row(
                check.name,
                marks[check.passed],
                _short(check.value),
                _short(check.threshold),
                check.reason,
            )
        console = Console()
        console.print(table)
        stats = report.stats
        console.print(
            f"score [bold]{report.score:.3f}[/bold] → [bold]{report.verdict}[/bold]   "
            f"read {stats.get('bytes_read', 0):,} of {stats.get('size_bytes', 0):,} bytes "
            f"in {stats.get('seconds', 0):.3f} s"
        )
    if report.unreadable:
        raise typer.Exit(2)
    if report.verdict != "auto_approved":
        raise typer.Exit(1)


def _short(value: object, limit: int = 60) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main() -> None:
    """Entry point: Keystone errors become one line on stderr and a non-zero exit code."""
    try:
        app()
    except KeystoneError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(2 if exc.code == "configuration_error" else 1)
