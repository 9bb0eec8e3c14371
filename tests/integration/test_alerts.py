"""Keystone's alert rules on MariaDB: the alerts sensor raises and clears every rule as the
factory's state crosses its threshold (time moved by the test clock), writes
``alert.raised`` / ``alert.resolved`` outbox events, and GET /api/v1/alerts shows them
to the factory's people only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, SkipReason, build_sensor_context
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import (
    Alert,
    AlertState,
    Episode,
    EpisodeStatus,
    Factory,
    OrderStatus,
    OutboxEvent,
    QAResult,
    QATier,
    Role,
    SyncJob,
    SyncStatus,
    Task,
    TaskStatus,
    User,
    UserFactory,
)
from keystone_core.security import hash_password, issue_access_token
from keystone_core.settings import Settings
from keystone_pipelines.defs.alerts import alerts_sensor
from keystone_pipelines.resources import KeystoneDatabase
from tests.factories import make_episode, make_factory, make_order, make_sync_job, make_task
from tests.integration.test_rbac_matrix import app_settings  # noqa: F401

pytestmark = pytest.mark.integration

# A Wednesday, 10:00 in Shanghai (UTC+8): inside the default 08:00-20:00 production hours.
NOON = dt.datetime(2026, 11, 18, 2, 0, tzinfo=dt.UTC)


class Site:
    """One factory in Shanghai with an order in production, and the sensor's view of it."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.database = KeystoneDatabase(database_url=url)
        self.instance = DagsterInstance.ephemeral()
        with Session(engine, expire_on_commit=False) as session:
            self.factory = make_factory(
                session, timezone="Asia/Shanghai", production_days=[1, 2, 3, 4, 5]
            )
            self.order = make_order(
                session, factory_id=self.factory.id, status=OrderStatus.IN_PROGRESS
            )
            make_episode(session, order_id=self.order.id)  # an upload just now
            session.commit()
        assert self.factory.id is not None
        self.factory_id: int = self.factory.id

    def evaluate(self) -> str:
        """One sensor tick (no cursor: always evaluates); its skip message."""
        context = build_sensor_context(
            instance=self.instance, resources={"database": self.database}
        )
        result = alerts_sensor(context)
        assert isinstance(result, SkipReason)
        return result.skip_message or ""

    def firing(self) -> dict[str, Alert]:
        with Session(self.engine) as session:
            rows = session.exec(
                select(Alert).where(
                    col(Alert.state) == AlertState.FIRING,
                    col(Alert.factory_id) == self.factory_id,
                )
            ).all()
            return {a.rule: a for a in rows}

    def events(self, kind: str) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            rows = session.exec(
                select(OutboxEvent)
                .where(col(OutboxEvent.event_type) == kind)
                .order_by(col(OutboxEvent.id))
            ).all()
            return [e.payload for e in rows]

    def tasks(self, count: int, status: TaskStatus) -> list[int]:
        with Session(self.engine) as session:
            ids: list[int] = []
            for _ in range(count):
                task = make_task(session, order_id=self.order.id, status=status)
                assert task.id is not None
                ids.append(task.id)
            session.commit()
            return ids

    def episodes(self, count: int, **values: Any) -> list[int]:
        with Session(self.engine) as session:
            ids = [make_episode(session, order_id=self.order.id, **values).id for _ in range(count)]
            session.commit()
            return [i for i in ids if i is not None]


@pytest.fixture
def site(mariadb_engine: Engine, mariadb_migrated: str) -> Iterator[Site]:
    with clock.frozen(NOON):
        yield Site(mariadb_engine, mariadb_migrated)


def _set_tasks(engine: Engine, ids: list[int], status: TaskStatus) -> None:
    with Session(engine) as session:
        session.execute(update(Task).where(col(Task.id).in_(ids)).values(status=status))
        session.commit()


def test_upload_queue_fires_above_five_and_clears(site: Site) -> None:
    ids = site.tasks(5, TaskStatus.UPLOADING)
    site.evaluate()
    assert "upload_queue_high" not in site.firing()  # 5 is not more than 5
    ids += site.tasks(1, TaskStatus.UPLOADING)
    assert "1 raised" in site.evaluate()
    alert = site.firing()["upload_queue_high"]
    assert (alert.value, alert.threshold, alert.severity) == (6, 5, "warning")
    raised = site.events("alert.raised")
    assert [e["rule"] for e in raised] == ["upload_queue_high"]
    assert raised[0]["factory"] == site.factory.slug
    assert raised[0]["state"] == "firing"

    site.evaluate()  # still firing: the same alert, no second event
    assert site.firing()["upload_queue_high"].id == alert.id
    assert len(site.events("alert.raised")) == 1

    _set_tasks(site.engine, ids[:2], TaskStatus.COMPLETED)
    site.evaluate()
    assert "upload_queue_high" not in site.firing()
    resolved = site.events("alert.resolved")
    assert [(e["rule"], e["state"]) for e in resolved] == [("upload_queue_high", "resolved")]
    with Session(site.engine) as session:
        kept = session.get(Alert, alert.id)
        assert kept is not None
        assert kept.state == AlertState.RESOLVED
        assert kept.resolved_at is not None
        assert kept.open_key is None

    site.tasks(2, TaskStatus.UPLOADING)  # back above: a new alert, history kept
    site.evaluate()
    assert site.firing()["upload_queue_high"].id != alert.id


def _qa_results(site: Site, verdicts: list[EpisodeStatus]) -> None:
    with Session(site.engine) as session:
        for verdict in verdicts:
            episode = make_episode(session, order_id=site.order.id, status=verdict)
            now = clock.now()
            session.add(
                QAResult(
                    episode_id=episode.id,  # type: ignore[arg-type]
                    tier=QATier.FAST,
                    score=0.1 if verdict == EpisodeStatus.QA_FAILED else 0.95,
                    verdict=verdict,
                    started_at=now,
                    finished_at=now,
                )
            )
        session.commit()


def test_qa_failure_rate_fires_above_ten_percent_of_the_hour_and_clears(site: Site) -> None:
    failed, approved = EpisodeStatus.QA_FAILED, EpisodeStatus.AUTO_APPROVED
    _qa_results(site, [failed] * 9)  # 100 % of 9 results: too few to judge
    site.evaluate()
    assert "qa_failure_rate_high" not in site.firing()

    with clock.frozen(NOON + dt.timedelta(minutes=61)) as move:
        site.evaluate()  # the nine left the window
        _qa_results(site, [failed] + [approved] * 9)  # 10 %: not above
        site.evaluate()
        assert "qa_failure_rate_high" not in site.firing()
        _qa_results(site, [failed] * 2)  # 3 of 12 = 25 %
        site.evaluate()
        alert = site.firing()["qa_failure_rate_high"]
        assert alert.value == pytest.approx(0.25)
        assert alert.threshold == pytest.approx(0.1)
        assert "25%" in alert.summary

        move(NOON + dt.timedelta(minutes=61 + 61))  # the hour moves on
        site.evaluate()
        assert "qa_failure_rate_high" not in site.firing()
    resolved = [e["rule"] for e in site.events("alert.resolved")]
    assert resolved.count("qa_failure_rate_high") == 1


def test_no_uploads_is_critical_after_30_minutes_in_production_hours_only(site: Site) -> None:
    # The site's first upload arrived at 10:00 local.
    with clock.frozen(NOON + dt.timedelta(minutes=30)) as move:
        site.evaluate()
        assert "no_uploads" not in site.firing()  # 30 min is not more than 30

        move(NOON + dt.timedelta(minutes=31))
        site.evaluate()
        alert = site.firing()["no_uploads"]
        assert alert.severity == "critical"
        assert alert.value == pytest.approx(31 * 60)
        assert alert.threshold == 1800

        site.episodes(1)  # uploads resume
        site.evaluate()
        assert "no_uploads" not in site.firing()

        # 20:31 local: after production hours, silence is no incident.
        move(NOON + dt.timedelta(hours=10, minutes=31))
        site.evaluate()
        assert "no_uploads" not in site.firing()

        # Next morning 08:20: counted from the shift start, not from yesterday's upload.
        move(NOON + dt.timedelta(hours=22, minutes=20))
        site.evaluate()
        assert "no_uploads" not in site.firing()
        move(NOON + dt.timedelta(hours=22, minutes=31))
        site.evaluate()
        assert site.firing()["no_uploads"].value == pytest.approx(31 * 60)

        # Saturday is not a production day.
        move(NOON + dt.timedelta(days=3))
        site.evaluate()
        assert "no_uploads" not in site.firing()


def test_no_uploads_needs_an_order_in_production(site: Site) -> None:
    with Session(site.engine) as session:
        order = session.get(type(site.order), site.order.id)
        assert order is not None
        order.status = OrderStatus.PAUSED
        session.add(order)
        session.commit()
    with clock.frozen(NOON + dt.timedelta(hours=2)):
        site.evaluate()
    assert "no_uploads" not in site.firing()


def test_sync_queue_and_sync_failures_fire_and_clear(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYSTONE_ALERT_SYNC_QUEUE_MAX", "3")
    site.database = KeystoneDatabase(database_url=site.database.database_url)  # new settings
    with Session(site.engine) as session:
        jobs = [
            make_sync_job(session, factory_id=site.factory_id, status=status).id
            for status in (
                SyncStatus.QUEUED,
                SyncStatus.QUEUED,
                SyncStatus.RETRY_WAIT,
                SyncStatus.IN_PROGRESS,
                SyncStatus.FAILED,
            )
        ]
        session.commit()
    site.evaluate()
    firing = site.firing()
    assert firing["sync_queue_high"].value == 4
    assert firing["sync_queue_high"].threshold == 3
    assert firing["sync_failures"].value == 1

    with Session(site.engine) as session:  # one pushed, the failed one resynced and pushed
        session.execute(
            update(SyncJob)
            .where(col(SyncJob.id).in_([jobs[0], jobs[4]]))
            .values(status=SyncStatus.SYNCED)
        )
        session.commit()
    site.evaluate()
    assert set(site.firing()) == set()
    assert sorted(e["rule"] for e in site.events("alert.resolved")) == [
        "sync_failures",
        "sync_queue_high",
    ]


def test_stuck_leases_fire_ten_minutes_after_expiry_and_clear_on_recovery(site: Site) -> None:
    expired = NOON - dt.timedelta(minutes=1)
    with Session(site.engine) as session:
        job = make_sync_job(
            session,
            factory_id=site.factory_id,
            status=SyncStatus.IN_PROGRESS,
            lease_owner="run-1",
            lease_expires_at=expired,
        )
        episode = make_episode(
            session,
            order_id=site.order.id,
            status=EpisodeStatus.QA_RUNNING,
            qa_lease_owner="run-2",
            qa_lease_expires_at=expired,
        )
        session.commit()
        job_id, episode_id = job.id, episode.id
    site.evaluate()
    assert "stuck_leases" not in site.firing()  # recovery runs every 5 minutes: not yet stuck
    with clock.frozen(NOON + dt.timedelta(minutes=10)):
        site.evaluate()
        assert site.firing()["stuck_leases"].value == 2
        with Session(site.engine) as session:
            session.execute(
                update(SyncJob)
                .where(col(SyncJob.id) == job_id)
                .values(status=SyncStatus.RETRY_WAIT, lease_owner=None, lease_expires_at=None)
            )
            session.commit()
        site.evaluate()
        assert site.firing()["stuck_leases"].value == 1
        with Session(site.engine) as session:
            session.execute(
                update(Episode)
                .where(col(Episode.id) == episode_id)
                .values(status=EpisodeStatus.PENDING_QA, qa_lease_expires_at=None)
            )
            session.commit()
        site.evaluate()
    assert "stuck_leases" not in site.firing()


def test_a_deleted_factory_resolves_its_alerts(site: Site) -> None:
    site.tasks(6, TaskStatus.UPLOADING)
    site.evaluate()
    assert "upload_queue_high" in site.firing()
    with Session(site.engine) as session:
        factory = session.get(Factory, site.factory_id)
        assert factory is not None
        factory.deleted_at = clock.now()
        session.add(factory)
        session.commit()
    site.evaluate()
    assert site.firing() == {}


def test_the_sensor_keeps_to_the_configured_interval(site: Site) -> None:
    site.tasks(6, TaskStatus.UPLOADING)
    context = build_sensor_context(instance=site.instance, resources={"database": site.database})
    first = alerts_sensor(context)
    assert isinstance(first, SkipReason)
    assert "1 raised" in (first.skip_message or "")
    cursor = context.cursor
    assert cursor is not None
    again = build_sensor_context(
        instance=site.instance, resources={"database": site.database}, cursor=cursor
    )
    with clock.frozen(NOON + dt.timedelta(seconds=59)):
        skipped = alerts_sensor(again)
    assert isinstance(skipped, SkipReason)
    assert "KEYSTONE_ALERTS_INTERVAL_S" in (skipped.skip_message or "")
    with clock.frozen(NOON + dt.timedelta(seconds=60)):
        later = alerts_sensor(again)
    assert isinstance(later, SkipReason)
    assert "1 firing" in (later.skip_message or "")


# --- GET /api/v1/alerts --------------------------------------------------------------------


def _user(session: Session, settings: Settings, role: Role, factory_ids: list[int]) -> str:
    user = User(
        account=f"{role.value}-{len(factory_ids)}-{factory_ids[:1]}",
        password_hash=hash_password("pw-12345678"),
        role=role,
    )
    session.add(user)
    session.flush()
    for factory_id in factory_ids:
        session.add(UserFactory(user_id=user.id, factory_id=factory_id))  # type: ignore[arg-type]
    session.commit()
    token, _ = issue_access_token(
        settings, subject=str(user.id), role=role, factory_ids=factory_ids
    )
    return token


def test_alerts_api_lists_filters_and_scopes(
    site: Site,
    app_settings: Settings,  # noqa: F811
) -> None:
    site.tasks(6, TaskStatus.UPLOADING)
    with Session(site.engine) as session:
        other = make_factory(session)
        session.commit()
        assert other.id is not None
        mine = _user(session, app_settings, Role.PRODUCTION_MANAGER, [site.factory_id])
        theirs = _user(session, app_settings, Role.PRODUCTION_MANAGER, [other.id])
        collector = _user(session, app_settings, Role.DATA_COLLECTOR, [site.factory_id])
    site.evaluate()
    alert = site.firing()["upload_queue_high"]

    with TestClient(create_app(app_settings)) as client:
        auth = {"Authorization": f"Bearer {mine}"}
        page = client.get("/api/v1/alerts", params={"state": "firing"}, headers=auth).json()
        assert page["total"] == 1
        item = page["items"][0]
        assert item["id"] == str(alert.id)
        assert item["rule"] == "upload_queue_high"
        assert item["factory_id"] == str(site.factory_id)
        assert item["value"] == 6
        assert client.get(f"/api/v1/alerts/{alert.id}", headers=auth).json()["state"] == "firing"
        none = client.get("/api/v1/alerts", params={"state": "resolved"}, headers=auth).json()
        assert none["total"] == 0
        rules = client.get("/api/v1/alerts/rules", headers=auth).json()
        assert {r["name"]: r["threshold"] for r in rules["rules"]}["no_uploads"] == 1800

        other_auth = {"Authorization": f"Bearer {theirs}"}
        assert client.get("/api/v1/alerts", headers=other_auth).json()["total"] == 0
        hidden = client.get(f"/api/v1/alerts/{alert.id}", headers=other_auth)
        assert hidden.status_code == 404
        assert hidden.json()["code"] == "not_found"

        denied = client.get("/api/v1/alerts", headers={"Authorization": f"Bearer {collector}"})
        assert denied.status_code == 403
        assert client.get("/api/v1/alerts").status_code == 401
        bad = client.get("/api/v1/alerts", params={"state": "burning"}, headers=auth)
        assert bad.status_code == 422
        assert client.get("/api/v1/alerts/99999999", headers=auth).status_code == 404
        assert client.get("/api/v1/alerts/0", headers=auth).status_code == 422
