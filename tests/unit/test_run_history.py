"""Dagster run history retention: finished runs past the period go, with events and logs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, instance_for_test, job, op

from keystone_core import clock
from keystone_pipelines.defs.run_history import purge_finished_runs, purge_run_history
from keystone_pipelines.resources import KeystoneDatabase


@op
def say_hello() -> None:
    print("hello from a run")


@job
def tiny() -> None:
    say_hello()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield instance


def run_ids(instance: DagsterInstance) -> set[str]:
    return {run.run_id for run in instance.get_runs()}


def days_after(moment: datetime, days: float) -> datetime:
    return moment + timedelta(days=days)


def test_only_finished_runs_past_the_period_are_deleted(
    instance: DagsterInstance, tmp_path: Path
) -> None:
    old = [tiny.execute_in_process(instance=instance).run_id for _ in range(3)]
    failed = instance.get_run_by_id(old[0])
    assert failed is not None
    instance.report_run_failed(failed)  # a failed run is finished as well
    queued = instance.create_run_for_job(tiny, run_id=None)  # never finishes
    logs = [*(tmp_path / "storage").rglob("*.out"), *(tmp_path / "storage").rglob("*.err")]
    assert logs, "the runs captured no logs to delete"
    boundary = datetime.now(UTC)
    recent = tiny.execute_in_process(instance=instance).run_id

    # Thirty days after the boundary: the three old runs are past the period.
    with clock.frozen(days_after(boundary, 30)):
        assert purge_finished_runs(instance, older_than_days=31) == (0, False)
        assert purge_finished_runs(instance, older_than_days=30, dry_run=True) == (3, False)
        assert run_ids(instance) >= set(old)
        assert purge_finished_runs(instance, older_than_days=30) == (3, False)

    assert run_ids(instance) == {recent, queued.run_id}
    for run_id in old:
        assert not instance.all_logs(run_id)
        assert not (tmp_path / "storage" / run_id).exists()
    assert instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.NOT_STARTED])) == 1


def test_the_time_budget_stops_a_long_purge(instance: DagsterInstance) -> None:
    for _ in range(3):
        tiny.execute_in_process(instance=instance)
    with clock.frozen(days_after(datetime.now(UTC), 40)):
        assert purge_finished_runs(instance, older_than_days=30, time_budget_s=0) == (1, True)
        assert purge_finished_runs(instance, older_than_days=30) == (2, False)


def test_the_job_reads_the_retention_setting(
    instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tiny.execute_in_process(instance=instance).run_id

    def purge(retention: str) -> tuple[int, str]:
        monkeypatch.setenv("KEYSTONE_DAGSTER_RUN_RETENTION_DAYS", retention)
        database = KeystoneDatabase(database_url=f"sqlite:///{tmp_path / 'k.db'}")
        result = purge_run_history.execute_in_process(
            instance=instance, resources={"database": database}
        )
        return result.output_for_node("purge_run_history_op"), result.run_id

    with clock.frozen(days_after(datetime.now(UTC), 100)):
        assert purge("120")[0] == 0  # not old enough
        assert first in run_ids(instance)
        kept, run_id = purge("")  # empty: keep forever, whatever the age
        assert kept == 0
        assert first in run_ids(instance)
        deleted, _ = purge("90")
        # The first run and the two purge runs before this one.
        assert deleted == 3
        assert first not in run_ids(instance)
        assert run_id not in run_ids(instance)
