"""Sensors size their runs by the instance's run queue: pools are resized in dagster.yaml."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance, instance_for_test

from keystone_pipelines.defs.qa import MAX_QA_RUNS
from keystone_pipelines.defs.runs import pool_limit
from keystone_pipelines.defs.sync import MAX_SYNC_RUNS

ROOT = Path(__file__).resolve().parents[2]


def production_overrides() -> dict[str, Any]:
    """The repository's dagster.yaml without its MySQL storage (tests use a temp dir)."""
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text(encoding="utf-8"))
    config.pop("storage")
    assert isinstance(config, dict)
    return config


@pytest.fixture
def production() -> Iterator[DagsterInstance]:
    with instance_for_test(overrides=production_overrides()) as instance:
        yield instance


def test_the_shipped_pools(production: DagsterInstance) -> None:
    assert pool_limit(production, "qa", 99) == 2
    assert pool_limit(production, "sync", 99) == 2


def test_a_resized_pool_is_what_the_sensors_launch() -> None:
    config = production_overrides()
    coordinator = config["run_coordinator"]["config"]
    coordinator["max_concurrent_runs"] = 12
    for limit in coordinator["tag_concurrency_limits"]:
        limit["limit"] = 6 if limit["value"] == "qa" else 3
    with instance_for_test(overrides=config) as instance:
        assert pool_limit(instance, "qa", MAX_QA_RUNS) == 6
        assert pool_limit(instance, "sync", MAX_SYNC_RUNS) == 3


def test_max_concurrent_runs_caps_a_pool() -> None:
    config = production_overrides()
    config["run_coordinator"]["config"]["max_concurrent_runs"] = 1
    with instance_for_test(overrides=config) as instance:
        assert pool_limit(instance, "qa", MAX_QA_RUNS) == 1


def test_a_pool_without_a_limit_or_a_queue_uses_the_default(
    production: DagsterInstance,
) -> None:
    assert pool_limit(production, "unknown", 3) == 3
    with DagsterInstance.ephemeral() as ephemeral:
        assert pool_limit(ephemeral, "qa", MAX_QA_RUNS) == MAX_QA_RUNS
