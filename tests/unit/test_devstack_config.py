"""`keystone dev` runs Dagster with the production instance config minus its storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from keystone_cli.devstack import PROJECT_ROOT, dagster_dev_config
from keystone_cli.main import app


def test_dev_config_is_production_without_mysql_storage() -> None:
    production = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text(encoding="utf-8"))
    dev = yaml.safe_load(dagster_dev_config())
    assert "storage" in production
    production.pop("storage")
    assert dev == production
    assert dev["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_dev_config_follows_edits_of_the_production_file(tmp_path: Path) -> None:
    edited = tmp_path / "dagster.yaml"
    edited.write_text(
        "storage: {mysql: {}}\nrun_retries: {enabled: true, max_retries: 5}\n", encoding="utf-8"
    )
    assert yaml.safe_load(dagster_dev_config(edited)) == {
        "run_retries": {"enabled": True, "max_retries": 5}
    }


def test_simulate_without_a_password_outside_the_dev_directory_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTONE_ADMIN_PASSWORD", raising=False)
    result = CliRunner().invoke(
        app, ["simulate", "--factory", "1", "--robot-type", "x", "--api", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 2
    assert "no admin password" in result.output
