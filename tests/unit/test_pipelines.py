"""Dagster definitions load, and lease recovery runs as a real job over a real database."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from dagster import DagsterInstance
from sqlmodel import Session, select

from keystone_core import clock
from keystone_core.db import create_db_engine
from keystone_core.models import Episode, EpisodeStatus
from keystone_core.settings import Settings
from keystone_pipelines.definitions import defs
from keystone_pipelines.resources import KeystoneDatabase
from tests.factories import make_episode


def test_definitions_load_with_the_lease_recovery_job_and_schedule() -> None:
    job = defs.resolve_job_def("release_expired_leases")
    assert job.name == "release_expired_leases"
    schedule = defs.resolve_schedule_def("release_expired_leases_schedule")
    assert schedule.cron_schedule == "*/5 * * * *"


def test_lease_recovery_job_returns_only_expired_leases_to_the_queue(
    settings: Settings, sqlite_engine: object, tmp_path: Path
) -> None:
    engine = create_db_engine(settings)
    now = clock.now()
    with Session(engine) as session:
        stuck = make_episode(
            session,
            status=EpisodeStatus.QA_RUNNING,
            qa_lease_owner="run-dead",
            qa_lease_expires_at=now - timedelta(minutes=1),
        )
        alive = make_episode(
            session,
            status=EpisodeStatus.QA_RUNNING,
            qa_lease_owner="run-alive",
            qa_lease_expires_at=now + timedelta(minutes=5),
        )
        session.commit()
        stuck_id, alive_id = stuck.id, alive.id

    job = defs.resolve_job_def("release_expired_leases")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            instance=instance,
            resources={"database": KeystoneDatabase(database_url=settings.database_url)},
        )
    assert result.success
    assert result.output_for_node("release_expired_qa_leases_op") == 1

    with Session(engine) as session:
        released = session.get(Episode, stuck_id)
        kept = session.get(Episode, alive_id)
        assert released is not None
        assert kept is not None
        assert released.status == EpisodeStatus.PENDING_QA
        assert released.qa_lease_owner is None
        assert kept.status == EpisodeStatus.QA_RUNNING
    engine.dispose()


def test_the_device_feed_is_pruned_by_age(settings: Settings, sqlite_engine: object) -> None:
    from keystone_core.models import DeviceEvent

    engine = create_db_engine(settings)
    now = clock.now()
    with Session(engine) as session:
        session.add(DeviceEvent(kind="old", created_at=now - timedelta(days=31)))
        session.add(DeviceEvent(kind="new", created_at=now - timedelta(days=1)))
        session.commit()
    job = defs.resolve_job_def("prune_device_feed")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            instance=instance,
            resources={"database": KeystoneDatabase(database_url=settings.database_url)},
        )
    assert result.output_for_node("prune_device_feed_op") == 1
    with Session(engine) as session:
        kinds = [e.kind for e in session.exec(select(DeviceEvent)).all()]
    assert kinds == ["new"]
