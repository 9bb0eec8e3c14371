"""No N+1: every list route runs the same number of queries for a page of 1 and of 2 rows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, update
from sqlmodel import Session, col, select

from keystone_api.access import ROUTE_ACCESS, Device, Public
from keystone_core.models import Episode, EpisodeStatus, Role, SyncJob, Task, User, UserFactory
from keystone_core.security import hash_password, issue_access_token
from keystone_core.settings import Settings
from tests.factories import make_episode
from tests.integration.test_rbac_matrix import app_settings, build_world, client  # noqa: F401

pytestmark = pytest.mark.integration


@contextmanager
def counting(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def list_routes() -> list[str]:
    return sorted(
        path
        for (method, path), rule in ROUTE_ACCESS.items()
        if method == "GET"
        and "{" not in path
        and not isinstance(rule, Public | Device)
        and Role.ADMIN in rule
        # Dashboards and statistics are aggregates: counted by their own test below.
        and not path.startswith(STATISTICS_PREFIXES)
        # Not pages: the caller itself, an event stream, the live recorder list, counts,
        # the sync configuration, the webhook event catalogue, the alert rules.
        and path
        not in {
            "/api/v1/auth/me",
            "/api/v1/inspections/stats",
            "/api/v1/device-state/stream",
            "/api/v1/recorder/devices",
            "/api/v1/transfer/devices",
            "/api/v1/sync/config",
            "/api/v1/webhooks/event-types",
            "/api/v1/alerts/rules",
        }
    )


def test_list_routes_query_count_does_not_grow_with_the_page(
    client: TestClient,  # noqa: F811
    mariadb_engine: Engine,
) -> None:
    with Session(mariadb_engine) as session:
        build_world(session, "a")
        build_world(session, "b")
        session.commit()
        # Their episodes wait for a person, so the inspection queue has rows to page.
        session.execute(update(Episode).values(status=EpisodeStatus.NEEDS_INSPECTION.value))
        # …and each has a sync job, so the sync summary has rows to page.
        for episode in session.exec(select(Episode)).all():
            session.add(SyncJob(episode_id=episode.id, factory_id=episode.factory_id))  # type: ignore[arg-type]
        session.commit()
    token = client.post(
        "/api/v1/auth/login", json={"account": "admin", "password": "test-admin-password"}
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    growing: list[str] = []
    compared: list[str] = []
    for path in list_routes():
        counts = []
        for limit in (1, 2):
            with counting(engine) as statements:
                response = client.get(path, params={"limit": limit}, headers=headers)
            assert response.status_code == 200, f"{path}: {response.text}"
            counts.append(len(statements))
        if len(client.get(path, params={"limit": 2}, headers=headers).json()["items"]) < 2:
            continue  # fewer than two rows: nothing to compare (audit has many, users have 3)
        compared.append(path)
        if counts[1] != counts[0]:
            growing.append(f"{path}: {counts[0]} queries for 1 row, {counts[1]} for 2")
    assert not growing, "\n".join(growing)
    # Two worlds give every family at least two rows; a list left out would hide an N+1.
    assert len(compared) >= len(list_routes()) - 1, sorted(set(list_routes()) - set(compared))


def test_list_routes_refuse_offsets_beyond_the_database_range(
    client: TestClient,  # noqa: F811
    mariadb_engine: Engine,
) -> None:
    token = client.post(
        "/api/v1/auth/login", json={"account": "admin", "password": "test-admin-password"}
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    for path in list_routes():
        response = client.get(path, params={"offset": 2**64}, headers=headers)
        assert response.status_code == 422, f"{path}: {response.status_code} {response.text}"


# --- dashboards and statistics ---------------------------------------------------------------

STATISTICS_PREFIXES = (
    "/api/v1/production/dashboard/",
    "/api/v1/quality/dashboard",
    "/api/v1/admin/statistics/",
    "/api/v1/operator/statistics/",
)


def test_dashboard_and_statistics_query_counts_do_not_grow_with_rows(
    client: TestClient,  # noqa: F811
    mariadb_engine: Engine,
    app_settings: Settings,  # noqa: F811
) -> None:
    """Aggregates in SQL: one world's rows and three worlds' rows cost the same queries."""
    routes = sorted(
        path
        for (method, path), _rule in ROUTE_ACCESS.items()
        if method == "GET" and path.startswith(STATISTICS_PREFIXES)
    )
    assert len(routes) == 11
    with Session(mariadb_engine) as session:
        world = build_world(session, "a")
        collector = User(
            account="counting-dc",
            password_hash=hash_password("pw-12345678"),
            role=Role.DATA_COLLECTOR,
            data_collector_id=world.data_collector_id,
        )
        session.add(collector)
        session.flush()
        session.add(UserFactory(user_id=collector.id, factory_id=world.factory_id))  # type: ignore[arg-type]
        session.commit()
        collector_token, _ = issue_access_token(
            app_settings,
            subject=str(collector.id),
            role=Role.DATA_COLLECTOR,
            factory_ids=[world.factory_id],
        )
    admin = client.post(
        "/api/v1/auth/login", json={"account": "admin", "password": "test-admin-password"}
    ).json()["access_token"]
    # A window around the worlds' recording date (build_world records on 2026-11-01).
    params = {"start_time": "2026-10-01T00:00:00Z", "end_time": "2026-12-01T00:00:00Z"}
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]

    def counts() -> dict[str, int]:
        out = {}
        for path in routes:
            token = collector_token if path.startswith("/api/v1/operator/") else admin
            with counting(engine) as statements:
                response = client.get(
                    path, params=params, headers={"Authorization": f"Bearer {token}"}
                )
            assert response.status_code == 200, f"{path}: {response.text}"
            out[path] = len(statements)
        return out

    def collected_episodes() -> int:
        response = client.get(
            "/api/v1/operator/statistics/data-production/summary",
            params=params,
            headers={"Authorization": f"Bearer {collector_token}"},
        )
        return int(response.json()["count"]["total"])

    with Session(mariadb_engine) as session:
        # The collector's: world a's task (so each route has a row to read at first).
        session.execute(update(Task).values(data_collector_id=world.data_collector_id))
        session.commit()
    few = counts()
    assert collected_episodes() == 1
    with Session(mariadb_engine) as session:
        build_world(session, "b")
        build_world(session, "c")
        for _ in range(3):
            make_episode(
                session,
                factory_id=world.factory_id,
                recording_date=dt.date(2026, 11, 2),
                duration_sec=5.0,
            )
        session.execute(
            update(Task)
            .where(col(Task.factory_id) == world.factory_id)
            .values(data_collector_id=world.data_collector_id)
        )
        session.commit()
    assert collected_episodes() == 4
    many = counts()
    assert many == few
