"""The ``keystone`` command line as a user runs it: a real process, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlmodel import Session, select

from keystone_core.db import create_db_engine
from keystone_core.models import AuditLog, Role, User, UserFactory
from keystone_core.settings import load_settings


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    return subprocess.run(
        [sys.executable, "-m", "keystone_cli", *args],
        env={**base, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {
        "KEYSTONE_ENV": "test",
        "KEYSTONE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "KEYSTONE_DATA_DIR": str(tmp_path / "data"),
    }


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("dev", "api", "migrate", "user"):
        assert command in result.stdout
    user_help = run_cli("user", "--help")
    assert "create" in user_help.stdout


def test_migrate_then_create_a_scoped_user_from_stdin(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    migrated = run_cli("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "database at revision" in migrated.stdout

    settings = load_settings(env="test", database_url=env["KEYSTONE_DATABASE_URL"])
    engine = create_db_engine(settings)
    with Session(engine) as session:
        from tests.factories import make_factory

        factory = make_factory(session)
        session.commit()
        factory_id = factory.id

    created = run_cli(
        "user",
        "create",
        "alice",
        "--role",
        "data_inspector",
        "--factory",
        str(factory_id),
        "--password-stdin",
        env=env,
        stdin="alice-password-1\n",
    )
    assert created.returncode == 0, created.stderr
    with Session(engine) as session:
        user = session.exec(select(User).where(User.account == "alice")).one()
        assert user.role == Role.DATA_INSPECTOR
        scope = session.exec(select(UserFactory.factory_id).where(UserFactory.user_id == user.id))
        assert list(scope) == [factory_id]
        assert session.exec(select(AuditLog).where(AuditLog.action == "user.create")).first()
    engine.dispose()

    again = run_cli(
        "user",
        "create",
        "alice",
        "--role",
        "admin",
        "--password-stdin",
        env=env,
        stdin="alice-password-1\n",
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_user_create_rejects_an_unknown_role_and_a_weak_password(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path)
    assert run_cli("migrate", env=env).returncode == 0
    bad_role = run_cli(
        "user",
        "create",
        "bob",
        "--role",
        "boss",
        "--password-stdin",
        env=env,
        stdin="long-enough-pw\n",
    )
    assert bad_role.returncode == 2
    assert "unknown role" in bad_role.stderr
    weak = run_cli(
        "user", "create", "bob", "--role", "admin", "--password-stdin", env=env, stdin="short\n"
    )
    assert weak.returncode == 1
    assert "at least 8 characters" in weak.stderr


def test_migrate_against_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    env = {
        **sqlite_env(tmp_path),
        "KEYSTONE_DATABASE_URL": "mysql+pymysql://root@127.0.0.1:1/keystone",
    }
    result = run_cli("migrate", env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "database unreachable" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_bad_setting_stops_the_process_and_names_the_variable(tmp_path: Path) -> None:
    env = {**sqlite_env(tmp_path), "KEYSTONE_QA_AUTO_APPROVE_THRESHOLD": "1.5"}
    result = run_cli("migrate", env=env)
    assert result.returncode == 2
    assert "KEYSTONE_QA_AUTO_APPROVE_THRESHOLD" in result.stderr
    assert "Traceback" not in result.stderr


def test_production_refuses_default_secrets_with_one_line(tmp_path: Path) -> None:
    env = {**sqlite_env(tmp_path), "KEYSTONE_ENV": "production"}
    result = run_cli("api", env=env)
    assert result.returncode == 2
    assert "KEYSTONE_SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_with_an_unreachable_database_exits_with_one_line(tmp_path: Path) -> None:
    env = {
        **sqlite_env(tmp_path),
        "KEYSTONE_DATABASE_URL": "mysql+pymysql://root@127.0.0.1:1/keystone",
    }
    result = run_cli("api", "--port", "1", env=env)
    assert result.returncode == 1
    assert "database unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def receiver_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    base = {"KEYSTONE_RECEIVER_DATABASE_URL": f"sqlite:///{tmp_path / 'receiver.db'}"}
    return {**base, **extra}


def test_cloud_receiver_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    assert "cloud-receiver" in run_cli("--help").stdout
    result = run_cli("cloud-receiver", "--port", "1", env=receiver_env(tmp_path))
    assert result.returncode == 2
    assert "KEYSTONE_RECEIVER_TOKEN is not set" in result.stderr
    assert "KEYSTONE_RECEIVER_ALLOW_ANONYMOUS" in result.stderr
    assert "Traceback" not in result.stderr


def test_cloud_receiver_with_an_unreachable_database_exits_with_one_line(tmp_path: Path) -> None:
    env = receiver_env(
        tmp_path,
        KEYSTONE_RECEIVER_TOKEN="a-token-long-enough-0123",
        KEYSTONE_RECEIVER_DATABASE_URL="mysql+pymysql://root@127.0.0.1:1/receiver",
    )
    result = run_cli("cloud-receiver", "--port", "1", env=env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "database unreachable" in lines[0]


def test_retention_is_a_dry_run_report_and_refuses_to_apply_when_off(tmp_path: Path) -> None:
    import json

    env = sqlite_env(tmp_path)
    assert run_cli("migrate", env=env).returncode == 0
    report = run_cli("retention", env=env)
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    assert body["dry_run"] is True
    assert body["candidates"] == 0
    applied = run_cli("retention", "--apply", env=env)
    assert applied.returncode == 2
    assert "KEYSTONE_EDGE_RETENTION_DAYS" in applied.stderr
    on = run_cli("retention", env={**env, "KEYSTONE_EDGE_RETENTION_DAYS": "7"})
    assert on.returncode == 0, on.stderr
    assert json.loads(on.stdout)["cutoff"] is not None
