"""Human inspection on MariaDB: the queue, claims under a lease (two inspectors racing for
one episode: exactly one wins), decisions through the state machine with the approval
counted and audited, and the bad-input paths (409, 422, 404)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import (
    AuditLog,
    Episode,
    EpisodeStatus,
    Inspection,
    Order,
    QAResult,
    QATier,
    Role,
    User,
    UserFactory,
)
from keystone_core.security import hash_password, issue_access_token
from keystone_core.settings import Settings
from tests.factories import make_episode, make_factory, make_inspector
from tests.integration.test_rbac_matrix import app_settings  # noqa: F401

V1 = "/api/v1/inspections"


class World:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        with Session(engine, expire_on_commit=False) as session:
            self.factory = make_factory(session)
            self.other_factory = make_factory(session)
            self.headers: dict[str, dict[str, str]] = {}
            self.user_ids: dict[str, int] = {}
            for name in ("alice", "bob"):
                inspector = make_inspector(session, factory_id=self.factory.id)
                user = User(
                    account=f"inspector-{name}",
                    password_hash=hash_password("pw-12345678"),
                    role=Role.DATA_INSPECTOR,
                    inspector_id=inspector.id,
                )
                session.add(user)
                session.flush()
                assert user.id is not None
                session.add(UserFactory(user_id=user.id, factory_id=self.factory.id))  # type: ignore[arg-type]
                token, _ = issue_access_token(
                    settings,
                    subject=str(user.id),
                    role=Role.DATA_INSPECTOR,
                    factory_ids=[self.factory.id],  # type: ignore[list-item]
                )
                self.headers[name] = {"Authorization": f"Bearer {token}"}
                self.user_ids[name] = user.id
            session.commit()

    def episode(self, status: EpisodeStatus = EpisodeStatus.NEEDS_INSPECTION, **kw: Any) -> int:
        with Session(self.engine) as session:
            kw.setdefault("factory_id", self.factory.id)
            episode = make_episode(session, status=status, qa_score=0.7, **kw)
            now = clock.now()
            session.add(
                QAResult(
                    episode_id=episode.id,  # type: ignore[arg-type]
                    tier=QATier.FAST,
                    score=0.7,
                    verdict=EpisodeStatus.NEEDS_INSPECTION,
                    checks=[
                        {"name": "message_gaps", "passed": False, "reason": "silent 2 s"},
                        {"name": "structure", "passed": True, "reason": "ok"},
                    ],
                    started_at=now,
                    finished_at=now,
                )
            )
            session.commit()
            assert episode.id is not None
            return episode.id

    def status(self, episode_id: int) -> EpisodeStatus:
        with Session(self.engine) as session:
            row = session.get(Episode, episode_id)
            assert row is not None
            return row.status


@pytest.fixture
def world(mariadb_engine: Engine, app_settings: Settings) -> World:  # noqa: F811
    return World(mariadb_engine, app_settings)


@pytest.fixture
def client(app_settings: Settings, world: World) -> Iterator[TestClient]:  # noqa: F811
    with TestClient(create_app(app_settings)) as c:
        yield c


def test_queue_lists_waiting_episodes_oldest_first_with_their_failing_checks(
    client: TestClient, world: World
) -> None:
    first, second = world.episode(), world.episode()
    world.episode(status=EpisodeStatus.PENDING_QA)
    world.episode(factory_id=world.other_factory.id)
    body = client.get(f"{V1}/queue", headers=world.headers["alice"]).json()
    assert body["total"] == 2
    assert [i["episode_id"] for i in body["items"]] == [str(first), str(second)]
    assert body["items"][0]["failing_checks"] == [{"name": "message_gaps", "reason": "silent 2 s"}]
    assert body["items"][0]["checks_url"] == f"/api/v1/qa/episodes/{first}/checks"


def test_a_claim_hides_the_episode_from_others_until_decided_or_expired(
    client: TestClient, world: World
) -> None:
    episode = world.episode()
    claimed = client.post(f"{V1}/{episode}/claim", headers=world.headers["alice"])
    assert claimed.status_code == 200, claimed.text
    assert client.get(f"{V1}/queue", headers=world.headers["bob"]).json()["total"] == 0
    mine = client.get(f"{V1}/queue", headers=world.headers["alice"]).json()["items"]
    assert mine[0]["claimed_by"] == str(world.user_ids["alice"])
    for action, body in (("claim", None), ("approve", {}), ("reject", {"reason": "bad"})):
        refused = client.post(f"{V1}/{episode}/{action}", json=body, headers=world.headers["bob"])
        assert refused.status_code == 409, action
        assert refused.json()["code"] == "claimed"
    # The lease runs out: the episode is back in everyone's queue and Bob can take it.
    with Session(world.engine) as session:
        session.execute(
            update(Inspection).values(lease_expires_at=clock.now() - dt.timedelta(seconds=1))
        )
        session.commit()
    assert client.get(f"{V1}/queue", headers=world.headers["bob"]).json()["total"] == 1
    assert client.post(f"{V1}/{episode}/claim", headers=world.headers["bob"]).status_code == 200


def test_two_inspectors_racing_for_one_episode_exactly_one_wins(
    app_settings: Settings,  # noqa: F811
    world: World,
) -> None:
    episodes = [world.episode() for _ in range(5)]
    results: dict[str, list[int]] = {"alice": [], "bob": []}
    barrier = threading.Barrier(2, timeout=60)
    # Two app instances (as two API workers would be), each with its own pool.
    with (
        TestClient(create_app(app_settings)) as first,
        TestClient(create_app(app_settings)) as second,
    ):
        clients = {"alice": first, "bob": second}

        def race(name: str) -> None:
            barrier.wait()
            for episode in episodes:
                response = clients[name].post(f"{V1}/{episode}/claim", headers=world.headers[name])
                results[name].append(response.status_code)

        threads = [threading.Thread(target=race, args=(name,)) for name in results]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    for i in range(len(episodes)):
        assert sorted([results["alice"][i], results["bob"][i]]) == [200, 409]
    with Session(world.engine) as session:
        assert len(session.exec(select(Inspection)).all()) == len(episodes)


def test_decisions_move_the_episode_count_the_approval_and_are_audited(
    client: TestClient, world: World
) -> None:
    good, bad = world.episode(), world.episode()
    with Session(world.engine) as session:
        order_id = session.get(Episode, good).order_id  # type: ignore[union-attr]
    approved = client.post(
        f"{V1}/{good}/approve", json={"failed_tags": ["blurry"]}, headers=world.headers["alice"]
    )
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "inspector_approved"
    missing_reason = client.post(f"{V1}/{bad}/reject", json={}, headers=world.headers["alice"])
    assert missing_reason.status_code == 422
    blank_reason = client.post(
        f"{V1}/{bad}/reject", json={"reason": ""}, headers=world.headers["alice"]
    )
    assert blank_reason.status_code == 422
    rejected = client.post(
        f"{V1}/{bad}/reject", json={"reason": "camera covered"}, headers=world.headers["bob"]
    )
    assert rejected.status_code == 200
    assert world.status(good) == EpisodeStatus.INSPECTOR_APPROVED
    assert world.status(bad) == EpisodeStatus.REJECTED
    again = client.post(f"{V1}/{good}/approve", json={}, headers=world.headers["alice"])
    assert again.status_code == 409
    assert again.json()["detail"]["current_status"] == "inspector_approved"
    with Session(world.engine) as session:
        order = session.get(Order, order_id)
        assert order is not None
        assert order.approved_count == 1
        actions = session.exec(
            select(AuditLog.action, AuditLog.actor_id).where(
                col(AuditLog.action).startswith("episode.inspection")
            )
        ).all()
        assert sorted(actions) == sorted(
            [
                ("episode.inspection.approved", str(world.user_ids["alice"])),
                ("episode.inspection.rejected", str(world.user_ids["bob"])),
            ]
        )
        decided = session.exec(select(Inspection).where(Inspection.episode_id == bad)).one()
        assert decided.reason == "camera covered"
        assert decided.decided_at is not None
    stats = client.get(f"{V1}/stats", headers=world.headers["alice"]).json()
    assert stats["waiting"] == 0
    per_user = {i["user_id"]: (i["approved"], i["rejected"]) for i in stats["inspectors"]}
    assert per_user == {str(world.user_ids["alice"]): (1, 0), str(world.user_ids["bob"]): (0, 1)}


def test_wrong_state_and_other_factory_are_refused(client: TestClient, world: World) -> None:
    waiting_qa = world.episode(status=EpisodeStatus.PENDING_QA)
    response = client.post(f"{V1}/{waiting_qa}/claim", headers=world.headers["alice"])
    assert response.status_code == 409
    assert response.json()["detail"]["current_status"] == "pending_qa"
    elsewhere = world.episode(factory_id=world.other_factory.id)
    for action in ("claim", "approve"):
        hidden = client.post(f"{V1}/{elsewhere}/{action}", json={}, headers=world.headers["alice"])
        assert hidden.status_code == 404
    assert client.post(f"{V1}/99999999/claim", headers=world.headers["alice"]).status_code == 404
