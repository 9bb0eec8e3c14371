"""Dashboards and data-production statistics on MariaDB: every number of every route equals
what this test computes itself, in plain Python, from the rows it created — plus scoping
(factories, a collector's own numbers, roles) and every bad input (422/404/403, never 500).

The data set: two factories (UTC and Asia/Shanghai) with robots of two types, stations,
collectors, scenes, skills, SOPs, orders and batches; ~90 episodes spread over 26 days in
every QA status with scores, durations and sizes (some missing), some without a reported
recording start, some synced; QA results whose JSON checks fail (an older result per
episode that must not count), decisions by two inspectors and a live claim; tasks in every
status; live and stale recorder sockets; unverified uploads.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlmodel import Session

from keystone_api.app import create_app
from keystone_core import clock
from keystone_core.models import (
    BatchStatus,
    DeviceConnection,
    DeviceUpload,
    EpisodeStatus,
    Factory,
    Inspection,
    InspectionDecision,
    QAResult,
    QATier,
    Role,
    SyncStatus,
    TaskStatus,
    User,
    UserFactory,
)
from keystone_core.security import hash_password, issue_access_token
from keystone_core.services import statistics as svc
from keystone_core.storage import EmbeddedS3Server
from tests.conftest import make_settings
from tests.factories import (
    make_batch,
    make_data_collector,
    make_episode,
    make_factory,
    make_inspector,
    make_order,
    make_robot,
    make_robot_type,
    make_scene,
    make_skill,
    make_sop,
    make_subscene,
    make_sync_job,
    make_task,
    make_workstation,
)

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 5, 20, 6, 30, tzinfo=dt.UTC)  # a Wednesday
UTC = dt.UTC
V1 = "/api/v1"
ADMIN_STATS = f"{V1}/admin/statistics/data-production"
OPERATOR_STATS = f"{V1}/operator/statistics/data-production"
CHECKS = ("structure", "topics", "duration", "gaps", "images", "sidecar")
SUCCESS = {EpisodeStatus.AUTO_APPROVED, EpisodeStatus.INSPECTOR_APPROVED}
FAILED = {EpisodeStatus.QA_FAILED, EpisodeStatus.REJECTED}
PROCESSING = {EpisodeStatus.PENDING_QA, EpisodeStatus.QA_RUNNING, EpisodeStatus.NEEDS_INSPECTION}


def half_up(value: float) -> int:
    return math.floor(value + 0.5)


def pct(part: int, total: int) -> float:
    """Percent with one decimal, halves up (the dashboards' rates)."""
    return half_up(part * 1000 / total) / 10


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the data set ----------------------------------------------------------------------------


@dataclass
class Ep:
    """One episode as the test created it (the expectation's only source)."""

    pk: int
    public: str
    factory_id: int
    order_id: int
    batch_id: int
    task_pk: int
    task_public: str
    workstation_id: int
    station_name: str
    skill_id: int | None
    scene_id: int | None
    scene_name: str
    sop_id: int | None
    sop_label: str
    robot_id: int
    device_id: str
    robot_name: str
    robot_type_id: int
    robot_type_name: str
    collector_id: int
    operator_id: str
    collector_name: str
    status: EpisodeStatus
    score: float | None
    duration: float | None
    size: int | None
    started: dt.datetime | None
    recording_date: dt.date
    synced: bool
    sync_status: SyncStatus | None
    latest_checks: list[dict[str, Any]] | None
    flag: str

    @property
    def at(self) -> dt.datetime:
        return self.started or dt.datetime.combine(self.recording_date, dt.time(), tzinfo=UTC)


@dataclass
class Tk:
    pk: int
    public: str
    factory_id: int
    batch_id: int
    status: TaskStatus
    collector_id: int | None
    workstation_id: int | None
    scene_id: int | None
    sop_id: int | None
    assigned_at: dt.datetime | None
    completed_at: dt.datetime | None
    updated_at: dt.datetime
    created_at: dt.datetime
    started_at: dt.datetime | None
    deleted: bool = False


@dataclass
class Site:
    """What one factory has, by name."""

    factory_id: int
    timezone: str
    stations: list[Any] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)
    scenes: list[Any] = field(default_factory=list)


@dataclass
class World:
    a: Site
    b: Site
    episodes: list[Ep]
    tasks: list[Tk]
    robots: dict[int, dict[str, Any]]
    stations: dict[int, dict[str, Any]]
    batches: dict[int, dict[str, Any]]
    scenes: dict[int, str]
    sops: dict[int, str]
    collectors: dict[int, dict[str, Any]]
    inspections: list[dict[str, Any]]
    live_claims: set[int]
    live_robots: set[int]
    unverified_uploads: dict[int, int]  # robot id → reported uploads not yet verified
    users: dict[str, int]
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


def _scene_full(scene: str, subscene: str) -> str:
    return "@".join(p for p in (scene, subscene) if p) or "-"


def build_world(session: Session, rng: random.Random) -> World:
    type_one = make_robot_type(session, name="UR5e")
    type_two = make_robot_type(session, name="Franka")
    skills = [make_skill(session, slug="pick"), make_skill(session, slug="place")]
    sops = [make_sop(session, slug="sop-pick", version="1.0.0"), make_sop(session, slug="sop-bag")]
    sop_labels = {int(s.id): f"{s.slug} @ {s.version}" for s in sops}  # type: ignore[arg-type]
    robots: dict[int, dict[str, Any]] = {}
    stations: dict[int, dict[str, Any]] = {}
    batches: dict[int, dict[str, Any]] = {}
    scenes: dict[int, str] = {}
    collectors: dict[int, dict[str, Any]] = {}
    sites = []
    for tag, zone, n_stations in (("a", "UTC", 3), ("b", "Asia/Shanghai", 2)):
        factory = make_factory(session, slug=f"stat-{tag}", timezone=zone)
        assert factory.id is not None
        site = Site(factory.id, zone)
        for i in range(n_stations):
            rtype = type_one if i % 2 == 0 else type_two
            robot = make_robot(
                session,
                factory_id=factory.id,
                robot_type_id=rtype.id,
                device_id=f"{tag}-dev-{i}",
                name=f"{tag.upper()} robot {i}" if i != 1 else "",
            )
            collector = make_data_collector(
                session, factory_id=factory.id, operator_id=f"{tag}-op-{i}", name=f"Op {tag}{i}"
            )
            station = make_workstation(
                session,
                factory_id=factory.id,
                name=f"{tag}-station-{i}",
                robot_id=robot.id,
                data_collector_id=collector.id,
                status=("active", "break", "offline")[i % 3],
            )
            robots[int(robot.id)] = {  # type: ignore[arg-type]
                "device_id": robot.device_id,
                "name": robot.name,
                "type_id": int(rtype.id),  # type: ignore[arg-type]
                "type_name": rtype.name,
                "model": rtype.model,
                "factory_id": factory.id,
            }
            collectors[int(collector.id)] = {  # type: ignore[arg-type]
                "operator_id": collector.operator_id,
                "name": collector.name,
            }
            stations[int(station.id)] = {  # type: ignore[arg-type]
                "name": station.name,
                "status": station.status,
                "robot_id": robot.id,
                "collector_id": collector.id,
                "factory_id": factory.id,
            }
            site.stations.append(station)
        for j in range(2):
            scene = make_scene(session, factory_id=factory.id, name=f"{tag} scene {j}")
            scenes[int(scene.id)] = scene.name  # type: ignore[arg-type]
            site.scenes.append(scene)
        for j in range(2):
            order = make_order(
                session, factory_id=factory.id, name=f"{tag} order {j}", scene_id=site.scenes[j].id
            )
            for k in range(2):
                station = site.stations[(j + k) % len(site.stations)]
                batch_status = BatchStatus.ACTIVE if k == 0 else BatchStatus.COMPLETED
                batch = make_batch(
                    session,
                    order_id=order.id,
                    workstation_id=station.id,
                    status=batch_status,
                    started_at=NOW - dt.timedelta(days=10 - 3 * j - k),
                )
                batches[int(batch.id)] = {  # type: ignore[arg-type]
                    "batch_id": batch.batch_id,
                    "order_id": order.id,
                    "order_name": order.name,
                    "scene_name": site.scenes[j].name,
                    "workstation_id": station.id,
                    "status": batch_status,
                    "started_at": batch.started_at,
                    "factory_id": factory.id,
                }
                site.batches.append(batch)
        sites.append(site)
    a, b = sites
    subscene = make_subscene(session, scene_id=a.scenes[0].id, name="left")

    episodes: list[Ep] = []
    tasks: list[Tk] = []
    inspections: list[dict[str, Any]] = []
    inspector_users = []
    for name in ("qa-one", "qa-two"):
        person = make_inspector(session, factory_id=a.factory_id, name=name.title())
        user = User(
            account=name,
            password_hash=hash_password("pw-12345678"),
            role=Role.DATA_INSPECTOR,
            display_name=name.upper(),
            inspector_id=person.id,
        )
        session.add(user)
        session.flush()
        inspector_users.append((user, person))
    statuses = list(EpisodeStatus)
    scores = [0.0, 0.1, 0.3, 0.9, 1.0]
    for n in range(92):
        site = a if n % 3 else b
        station = rng.choice(site.stations)
        meta = stations[int(station.id)]
        robot_id = int(meta["robot_id"])
        collector_id = int(meta["collector_id"])
        batch = rng.choice(site.batches)
        scene = rng.choice([*site.scenes, None])
        sop = rng.choice([*sops, None])
        skill = rng.choice([*skills, None])
        status = statuses[n % len(statuses)] if n < 40 else rng.choice(statuses)
        day = NOW.date() - dt.timedelta(days=rng.randrange(0, 26))
        started: dt.datetime | None = None
        if rng.random() > 0.15:
            latest_hour = NOW.hour if day == NOW.date() else 24
            started = dt.datetime.combine(day, dt.time(), tzinfo=UTC) + dt.timedelta(
                hours=rng.randrange(0, latest_hour), minutes=rng.randrange(60)
            )
        duration = None if rng.random() < 0.1 else rng.randrange(4, 2400) / 4
        size = None if rng.random() < 0.1 else rng.randrange(1_000, 5_000_000_000)
        score: float | None = None
        if status not in (EpisodeStatus.PENDING_QA, EpisodeStatus.QA_RUNNING):
            score = scores[n] if n < len(scores) else round(rng.random(), 3)
        moment = started or dt.datetime.combine(day, dt.time(), tzinfo=UTC)
        task = make_task(
            session,
            batch_id=batch.id,
            workstation_id=station.id,
            robot_id=robot_id,
            data_collector_id=collector_id,
            scene_id=scene.id if scene else None,
            subscene_id=subscene.id if scene is a.scenes[0] and n % 2 else None,
            skill_id=skill.id if skill else None,
            sop_id=sop.id if sop else None,
            status=TaskStatus.COMPLETED,
            assigned_at=moment - dt.timedelta(minutes=30),
            started_at=moment,
            completed_at=moment + dt.timedelta(seconds=duration or 60),
            created_at=moment - dt.timedelta(hours=2),
            updated_at=moment + dt.timedelta(seconds=duration or 60),
        )
        flag = "gaps; images" if status in FAILED else ""
        episode = make_episode(
            session,
            task_id=task.id,
            robot_id=robot_id,
            device_id=robots[robot_id]["device_id"],
            status=status,
            qa_score=score,
            duration_sec=duration,
            file_size_bytes=size,
            recording_date=day,
            recording_started_at=started,
            quality_flag=flag,
        )
        assert episode.id is not None
        assert task.id is not None
        synced = False
        job_status: SyncStatus | None = None
        if status in SUCCESS:
            roll = rng.random()
            if roll < 0.5:
                job_status = SyncStatus.SYNCED
                make_sync_job(session, episode_id=episode.id, status=job_status)
                synced = True
            else:
                job_status = rng.choice(
                    [SyncStatus.QUEUED, SyncStatus.RETRY_WAIT, SyncStatus.FAILED]
                )
                make_sync_job(session, episode_id=episode.id, status=job_status)
        latest: list[dict[str, Any]] | None = None
        if status != EpisodeStatus.QA_RUNNING and (status != EpisodeStatus.PENDING_QA or n % 2):
            if rng.random() < 0.4:  # an older run that failed everything: must not count
                old = [{"name": c, "passed": False, "value": 0, "reason": "old"} for c in CHECKS]
                session.add(_result(episode.id, old, 0.1, moment))
            latest = [
                {"name": c, "passed": None if c == "images" and n % 5 == 0 else rng.random() > 0.3}
                for c in CHECKS
            ]
            session.add(_result(episode.id, latest, score or 0.5, moment + dt.timedelta(hours=1)))
        if status in (EpisodeStatus.INSPECTOR_APPROVED, EpisodeStatus.REJECTED):
            user, person = inspector_users[n % 2]
            decided = min(moment + dt.timedelta(hours=rng.randrange(1, 40)), NOW)
            decision = (
                InspectionDecision.APPROVED
                if status == EpisodeStatus.INSPECTOR_APPROVED
                else InspectionDecision.REJECTED
            )
            session.add(
                Inspection(
                    episode_id=episode.id,
                    inspector_id=person.id,
                    user_id=user.id,
                    claimed_at=decided - dt.timedelta(minutes=5),
                    decision=decision,
                    decided_at=decided,
                )
            )
            inspections.append(
                {
                    "user_id": user.id,
                    "decided_at": decided,
                    "decision": decision,
                    "factory_id": site.factory_id,
                }
            )
        episodes.append(
            Ep(
                pk=episode.id,
                public=episode.episode_id,
                factory_id=site.factory_id,
                order_id=episode.order_id,
                batch_id=episode.batch_id,
                task_pk=task.id,
                task_public=task.task_id,
                workstation_id=int(station.id),  # type: ignore[arg-type]
                station_name=station.name,
                skill_id=skill.id if skill else None,
                scene_id=scene.id if scene else None,
                scene_name=scene.name if scene else "",
                sop_id=sop.id if sop else None,
                sop_label=sop_labels[int(sop.id)] if sop else "",  # type: ignore[arg-type]
                robot_id=robot_id,
                device_id=robots[robot_id]["device_id"],
                robot_name=robots[robot_id]["name"],
                robot_type_id=robots[robot_id]["type_id"],
                robot_type_name=robots[robot_id]["type_name"],
                collector_id=collector_id,
                operator_id=collectors[collector_id]["operator_id"],
                collector_name=collectors[collector_id]["name"],
                status=status,
                score=score,
                duration=duration,
                size=size,
                started=started,
                recording_date=day,
                synced=synced,
                sync_status=job_status,
                latest_checks=latest,
                flag=flag,
            )
        )
        tasks.append(
            Tk(
                task.id,
                task.task_id,
                site.factory_id,
                int(batch.id),  # type: ignore[arg-type]
                TaskStatus.COMPLETED,
                collector_id,
                int(station.id),  # type: ignore[arg-type]
                scene.id if scene else None,
                sop.id if sop else None,
                task.assigned_at,
                task.completed_at,
                task.updated_at,
                task.created_at,
                task.started_at,
            )
        )
    # Tasks without an episode, in every other status, assigned over the last days.
    for n, status in enumerate(
        [TaskStatus.PENDING, TaskStatus.READY, TaskStatus.IN_PROGRESS, TaskStatus.UPLOADING] * 3
        + [TaskStatus.FAILED, TaskStatus.CANCELLED] * 3
    ):
        site = a if n % 4 else b
        station = site.stations[n % len(site.stations)]
        meta = stations[int(station.id)]
        batch = site.batches[n % len(site.batches)]
        assigned = (
            None
            if status == TaskStatus.PENDING and n % 2
            else NOW - dt.timedelta(days=n % 9, hours=n)
        )
        changed = NOW - dt.timedelta(hours=n * 5)
        task = make_task(
            session,
            batch_id=batch.id,
            workstation_id=station.id,
            robot_id=meta["robot_id"],
            data_collector_id=meta["collector_id"],
            scene_id=site.scenes[n % 2].id,
            sop_id=sops[n % 2].id,
            status=status,
            assigned_at=assigned,
            started_at=assigned if status == TaskStatus.IN_PROGRESS else None,
            created_at=NOW - dt.timedelta(days=40 + n) if n == 5 else NOW - dt.timedelta(days=30),
            updated_at=changed,
        )
        assert task.id is not None
        tasks.append(
            Tk(
                task.id,
                task.task_id,
                site.factory_id,
                int(batch.id),  # type: ignore[arg-type]
                status,
                int(meta["collector_id"]),
                int(station.id),  # type: ignore[arg-type]
                site.scenes[n % 2].id,
                sops[n % 2].id,
                assigned,
                None,
                changed,
                task.created_at,
                task.started_at,
            )
        )
    # A deleted task never counts.
    gone = make_task(
        session,
        batch_id=a.batches[0].id,
        workstation_id=a.stations[0].id,
        data_collector_id=stations[int(a.stations[0].id)]["collector_id"],  # type: ignore[arg-type]
        status=TaskStatus.IN_PROGRESS,
        assigned_at=NOW - dt.timedelta(hours=1),
        deleted_at=NOW,
    )
    assert gone.id is not None
    # A live claim and an expired one on episodes waiting for a person.
    waiting = [e for e in episodes if e.status == EpisodeStatus.NEEDS_INSPECTION]
    user, person = inspector_users[0]
    live_claims = set()
    for i, claimed in enumerate(waiting[:2]):
        expires = NOW + dt.timedelta(minutes=10) if i == 0 else NOW - dt.timedelta(minutes=1)
        session.add(
            Inspection(
                episode_id=claimed.pk,
                inspector_id=person.id,
                user_id=user.id,
                claimed_at=NOW - dt.timedelta(minutes=20),
                lease_expires_at=expires,
            )
        )
        if i == 0:
            live_claims.add(claimed.pk)
    # Recorder sockets: a live one, a stale one; a live transfer socket does not count.
    robot_ids = list(robots)
    for robot_id, channel, seen in (
        (robot_ids[0], "recorder", NOW - dt.timedelta(seconds=2)),
        (robot_ids[1], "recorder", NOW - dt.timedelta(minutes=5)),
        (robot_ids[3], "transfer", NOW),
    ):
        session.add(
            DeviceConnection(
                robot_id=robot_id,
                factory_id=robots[robot_id]["factory_id"],
                device_id=robots[robot_id]["device_id"],
                channel=channel,
                connection_id=f"conn-{robot_id}-{channel}",
                worker_id="w1",
                connected_at=NOW - dt.timedelta(hours=1),
                last_seen_at=seen,
            )
        )
    # Uploads the devices reported: unverified ones wait; failed, orphan, verified do not.
    unverified: Counter[int] = Counter()
    for i, (status_text, verified, orphan) in enumerate(
        [
            ("active", False, False),
            ("uploaded_wait_ack", False, False),
            ("failed", False, False),
            ("completed", True, False),
            ("active", False, True),
            ("pending", False, False),
        ]
    ):
        robot_id = robot_ids[0] if i < 5 else robot_ids[3]
        factory_id = robots[robot_id]["factory_id"]
        session.add(
            DeviceUpload(
                robot_id=robot_id,
                factory_id=factory_id,
                device_id=robots[robot_id]["device_id"],
                task_id=f"upload-{i}",
                status=status_text,
                verified_at=NOW if verified else None,
                orphan=orphan,
            )
        )
        if not verified and not orphan and status_text != "failed":
            unverified[robot_id] += 1
    session.flush()
    return World(
        a=a,
        b=b,
        episodes=episodes,
        tasks=tasks,
        robots=robots,
        stations=stations,
        batches=batches,
        scenes=scenes,
        sops=sop_labels,
        collectors=collectors,
        inspections=inspections,
        live_claims=live_claims,
        live_robots={robot_ids[0]},
        unverified_uploads=dict(unverified),
        users={u.account: int(u.id) for u, _p in inspector_users},  # type: ignore[arg-type]
    )


def _result(
    episode_id: int, checks: list[dict[str, Any]], score: float, at: dt.datetime
) -> QAResult:
    return QAResult(
        episode_id=episode_id,
        tier=QATier.FAST,
        score=score,
        verdict=EpisodeStatus.NEEDS_INSPECTION,
        checks=checks,
        started_at=at,
        finished_at=at,
    )


def add_accounts(session: Session, world: World, settings: Any) -> None:
    def account(name: str, role: Role, factories: list[int], **links: Any) -> None:
        user = User(account=name, password_hash=hash_password("pw-12345678"), role=role, **links)
        session.add(user)
        session.flush()
        for factory_id in factories:
            session.add(UserFactory(user_id=user.id, factory_id=factory_id))  # type: ignore[arg-type]
        token, _ = issue_access_token(
            settings, subject=str(user.id), role=role, factory_ids=factories
        )
        world.tokens[name] = token

    a = world.a.factory_id
    collector_ids = [int(world.stations[int(s.id)]["collector_id"]) for s in world.a.stations]
    account("admin-all", Role.ADMIN, [])
    account("pm-a", Role.PRODUCTION_MANAGER, [a])
    account("inspector-a", Role.DATA_INSPECTOR, [a])
    account("collector-0", Role.DATA_COLLECTOR, [a], data_collector_id=collector_ids[0])
    account("collector-1", Role.DATA_COLLECTOR, [a], data_collector_id=collector_ids[1])
    account("collector-unlinked", Role.DATA_COLLECTOR, [a])
    session.commit()


@pytest.fixture
def app_client(
    tmp_path: Path, mariadb_migrated: str, mariadb_engine: Engine, s3_server: EmbeddedS3Server
) -> Iterator[tuple[TestClient, World]]:
    settings = make_settings(
        tmp_path,
        database_url=mariadb_migrated,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    with clock.frozen(NOW):
        with Session(mariadb_engine, expire_on_commit=False) as session:
            world = build_world(session, random.Random(20260520))
            session.commit()
            add_accounts(session, world, settings)
        with TestClient(create_app(settings)) as client:
            yield client, world


def get(client: TestClient, world: World, who: str, path: str, **params: Any) -> Any:
    response = client.get(path, params=params, headers=world.headers(who))
    assert response.status_code == 200, f"{path} {params}: {response.text}"
    return response.json()


# --- expectations, computed from the created rows ----------------------------------------------


def metrics(rows: list[Ep]) -> dict[str, dict[str, Any]]:
    total = len(rows)
    success = sum(1 for e in rows if e.status in SUCCESS)
    failed = sum(1 for e in rows if e.status in FAILED)
    durations = sorted(e.duration for e in rows if e.duration is not None)
    sizes = [e.size for e in rows if e.size is not None]
    rank = (95 * len(durations) + 99) // 100  # nearest rank: ceil(0.95 n)
    return {
        "count": {
            "total": total,
            "success": success,
            "failed": failed,
            "processing": sum(1 for e in rows if e.status in PROCESSING),
            "success_rate": pytest.approx(success / total if total else 0.0),
        },
        "duration": {
            "total_ms": half_up(sum(durations) * 1000),
            "avg_ms": half_up(sum(durations) / len(durations) * 1000) if durations else 0,
            "p95_ms": half_up(durations[rank - 1] * 1000) if durations else 0,
            "max_ms": half_up(max(durations) * 1000) if durations else 0,
        },
        "size": {
            "total_bytes": sum(sizes),
            "success_bytes": sum(e.size or 0 for e in rows if e.status in SUCCESS),
            "failed_bytes": sum(e.size or 0 for e in rows if e.status in FAILED),
            "avg_bytes": half_up(sum(sizes) / len(sizes)) if sizes else 0,
            "max_bytes": max(sizes, default=0),
        },
    }


def within(rows: Iterable[Ep], start: dt.datetime, end: dt.datetime) -> list[Ep]:
    return [e for e in rows if start <= e.at < end]


def local_key(moment: dt.datetime, granularity: str, offset: int) -> str:
    local = (moment + dt.timedelta(minutes=offset)).replace(tzinfo=None)
    if granularity == "hour":
        return local.strftime("%Y-%m-%d %H:00")
    day = local.date()
    if granularity == "week":
        day -= dt.timedelta(days=day.weekday())
    if granularity == "month":
        day = day.replace(day=1)
    return day.isoformat()


def bucket_starts(
    start: dt.datetime, end: dt.datetime, granularity: str, offset: int
) -> list[tuple[str, str]]:
    """Every bucket overlapping the range: (key, its start as a UTC RFC 3339 instant)."""
    shift = dt.timedelta(minutes=offset)
    out = []
    moment = start
    seen: set[str] = set()
    step = dt.timedelta(hours=1) if granularity == "hour" else dt.timedelta(days=1)
    while moment < end:
        key = local_key(moment, granularity, offset)
        if key not in seen:
            seen.add(key)
            local = dt.datetime.fromisoformat(key.replace(" ", "T"))
            out.append((key, iso(local.replace(tzinfo=UTC) - shift)))
        moment += step
    # the last partial step
    key = local_key(end - dt.timedelta(microseconds=1), granularity, offset)
    if key not in seen:
        local = dt.datetime.fromisoformat(key.replace(" ", "T"))
        out.append((key, iso(local.replace(tzinfo=UTC) - shift)))
    return out


# --- data production: admin ---------------------------------------------------------------------


def test_summary_trend_and_compare_equal_the_rows(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    start, end = dt.datetime(2026, 5, 6, tzinfo=UTC), NOW
    params = {"start_time": start.isoformat(), "end_time": end.isoformat()}
    body = get(client, world, "admin-all", f"{ADMIN_STATS}/summary", **params)
    rows = within(world.episodes, start, end)
    assert 40 < len(rows) < len(world.episodes)  # the range cuts the data set
    want = metrics(rows)
    assert body["count"] == want["count"]
    assert body["duration"] == want["duration"]
    assert body["size"] == want["size"]
    success, failed = want["count"]["success"], want["count"]["failed"]
    assert body["qa"] == {
        "approved": success,
        "pass_rate": pytest.approx(success / (success + failed)),
    }
    synced = sum(1 for e in rows if e.synced)
    assert body["cloud_sync"] == {
        "synced": synced,
        "unsynced": len(rows) - synced,
        "sync_rate": pytest.approx(synced / len(rows)),
    }
    previous = within(world.episodes, start - (end - start), start)
    assert body["compare"] == {
        "previous_total_count": len(previous),
        "count_change_rate": pytest.approx((len(rows) - len(previous)) / len(previous)),
    }
    # Filters: one factory, statuses, a robot type, a collector, synced only.
    a = world.a.factory_id
    some_type = next(iter(world.robots.values()))["type_id"]
    operator = world.episodes[0].operator_id
    for extra, keep in (
        ({"factory_id": a}, lambda e: e.factory_id == a),
        (
            {"qa_status": "qa_failed,rejected"},
            lambda e: e.status in {EpisodeStatus.QA_FAILED, EpisodeStatus.REJECTED},
        ),
        ({"robot_type_id": str(some_type)}, lambda e: e.robot_type_id == some_type),
        ({"collector_operator_id": operator}, lambda e: e.operator_id == operator),
        ({"cloud_synced": "true"}, lambda e: e.synced),
        ({"cloud_synced": "false", "factory_id": a}, lambda e: not e.synced and e.factory_id == a),
        (
            {"robot_device_id": ["a-dev-0", "b-dev-1"]},
            lambda e: e.device_id in {"a-dev-0", "b-dev-1"},
        ),
    ):
        filtered = get(client, world, "admin-all", f"{ADMIN_STATS}/summary", **params, **extra)
        assert filtered["count"] == metrics([e for e in rows if keep(e)])["count"], extra
    # A production manager sees factory A only, with or without asking for it.
    scoped = get(client, world, "pm-a", f"{ADMIN_STATS}/summary", **params)
    assert scoped["count"] == metrics([e for e in rows if e.factory_id == a])["count"]


@pytest.mark.parametrize(
    ("granularity", "offset_text", "offset", "days"),
    [
        ("day", None, 0, 20),
        ("day", "+08:00", 480, 20),
        ("hour", "-05:30", -330, 3),
        ("week", "+08:00", 480, 26),
        ("month", None, 0, 26),
    ],
)
def test_trend_buckets_equal_the_rows(
    app_client: tuple[TestClient, World],
    granularity: str,
    offset_text: str | None,
    offset: int,
    days: int,
) -> None:
    client, world = app_client
    start, end = NOW - dt.timedelta(days=days), NOW
    params: dict[str, Any] = {
        "start_time": start.isoformat(),
        "end_time": end.isoformat(),
        "granularity": granularity,
    }
    if offset_text:
        params["timezone_offset"] = offset_text
    body = get(client, world, "admin-all", f"{ADMIN_STATS}/trend", **params)
    assert body["granularity"] == granularity
    assert body["timezone_offset"] == (offset_text or "+00:00")
    rows = within(world.episodes, start, end)
    grouped: dict[str, list[Ep]] = defaultdict(list)
    for e in rows:
        grouped[local_key(e.at, granularity, offset)].append(e)
    expected = bucket_starts(start, end, granularity, offset)
    assert [item["time"] for item in body["items"]] == [t for _k, t in expected]
    for item, (key, _t) in zip(body["items"], expected, strict=True):
        want = metrics(grouped.get(key, []))
        assert {k: item[k] for k in ("count", "duration", "size")} == want, key
    assert sum(i["count"]["total"] for i in body["items"]) == len(rows)


def test_factory_time_zone_is_the_default_offset(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    b = world.b.factory_id
    start, end = NOW - dt.timedelta(days=10), NOW
    body = get(
        client,
        world,
        "admin-all",
        f"{ADMIN_STATS}/trend",
        factory_id=b,
        start_time=start.isoformat(),
        end_time=end.isoformat(),
    )
    assert body["timezone_offset"] == "+08:00"  # Asia/Shanghai
    grouped = Counter(
        local_key(e.at, "day", 480) for e in within(world.episodes, start, end) if e.factory_id == b
    )
    expected = bucket_starts(start, end, "day", 480)
    assert [(i["time"], i["count"]["total"]) for i in body["items"]] == [
        (t, grouped.get(k, 0)) for k, t in expected
    ]


DIMENSIONS: dict[str, Callable[[Ep], tuple[str, str]]] = {
    "source": lambda e: (e.device_id, e.robot_name or e.device_id),
    "robot_device": lambda e: (e.device_id, e.robot_name or e.device_id),
    "robot_type": lambda e: (str(e.robot_type_id), e.robot_type_name),
    "collector": lambda e: (e.operator_id, e.collector_name),
    "scene": lambda e: (str(e.scene_id or ""), e.scene_name),
    "sop": lambda e: (str(e.sop_id or ""), e.sop_label),
    "skill": lambda e: (str(e.skill_id or ""), ""),
    "qa_status": lambda e: (e.status.value, e.status.value),
    "cloud_synced": lambda e: ("true", "synced") if e.synced else ("false", "not synced"),
    "factory": lambda e: (str(e.factory_id), ""),
    "order": lambda e: (str(e.order_id), ""),
    "batch": lambda e: (str(e.batch_id), ""),
    "workstation": lambda e: (str(e.workstation_id), e.station_name),
}


@pytest.mark.parametrize("dimension", sorted(DIMENSIONS))
def test_breakdown_per_dimension_equals_the_rows(
    app_client: tuple[TestClient, World], dimension: str
) -> None:
    client, world = app_client
    start, end = NOW - dt.timedelta(days=30), NOW
    groups: dict[str, list[Ep]] = defaultdict(list)
    names: dict[str, str] = {}
    for e in within(world.episodes, start, end):
        key, name = DIMENSIONS[dimension](e)
        groups[key].append(e)
        names[key] = name
    ordered = sorted(
        groups,
        key=lambda k: (-len(groups[k]), -sum(1 for e in groups[k] if e.status in FAILED), k),
    )
    seen = []
    offset = 0
    while True:
        body = get(
            client,
            world,
            "admin-all",
            f"{ADMIN_STATS}/breakdown",
            dimension=dimension,
            start_time=start.isoformat(),
            end_time=end.isoformat(),
            limit=3,
            offset=offset,
        )
        assert body["dimension"] == dimension
        assert body["total"] == len(groups)
        assert body["hasPrev"] is (offset > 0)
        assert body["hasNext"] is (offset + 3 < len(groups))
        for item in body["items"]:
            want = metrics(groups[item["id"]])
            assert {k: item[k] for k in ("count", "duration", "size")} == want, item["id"]
            if dimension not in ("skill", "factory", "order", "batch"):
                assert item["name"] == names[item["id"]]
            seen.append(item["id"])
        offset += 3
        if not body["hasNext"]:
            break
    assert seen == ordered


def test_details_pages_sorting_and_fields(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    start, end = NOW - dt.timedelta(days=30), NOW
    rows = within(world.episodes, start, end)
    params = {"start_time": start.isoformat(), "end_time": end.isoformat()}
    newest = sorted(rows, key=lambda e: (e.at, e.pk), reverse=True)
    page = get(client, world, "admin-all", f"{ADMIN_STATS}/details", **params, limit=7, offset=7)
    assert page["total"] == len(rows)
    assert (page["limit"], page["offset"], page["hasNext"], page["hasPrev"]) == (7, 7, True, True)
    assert [i["id"] for i in page["items"]] == [str(e.pk) for e in newest[7:14]]
    by_pk = {e.pk: e for e in rows}
    for item in page["items"]:
        e = by_pk[int(item["id"])]
        assert item["episode_id"] == e.public
        assert item["time"] == iso(e.at)
        assert item["robot_device_id"] == item["source_id"] == e.device_id
        assert item["source_name"] == (e.robot_name or e.device_id)
        assert item["robot_type_id"] == str(e.robot_type_id)
        assert item["robot_type_name"] == e.robot_type_name
        assert item["collector_operator_id"] == e.operator_id
        assert item["collector_name"] == e.collector_name
        assert item["task_id"] == e.task_public
        assert item["scene_name"] == e.scene_name
        assert item["sop"] == e.sop_label
        assert item["workstation_name"] == e.station_name
        assert item["qa_status"] == e.status.value
        assert item["status"] == (
            "success" if e.status in SUCCESS else "failed" if e.status in FAILED else "processing"
        )
        assert item["error_code"] == (e.status.value if e.status in FAILED else "")
        assert item["error_message"] == e.flag
        assert item["cloud_synced"] is e.synced
        assert item["duration_ms"] == (None if e.duration is None else half_up(e.duration * 1000))
        assert item["size_bytes"] == e.size
        assert item["count"] == 1
    # Sorted by size, largest first (episodes without a size last).
    by_size = get(
        client,
        world,
        "admin-all",
        f"{ADMIN_STATS}/details",
        **params,
        sort_by="size_bytes",
        limit=100,
    )
    sized = sorted(
        (e for e in rows if e.size is not None), key=lambda e: (e.size, e.pk), reverse=True
    )
    assert [i["id"] for i in by_size["items"][: len(sized)]] == [str(e.pk) for e in sized]
    # Oldest first.
    oldest = get(
        client, world, "admin-all", f"{ADMIN_STATS}/details", **params, sort_order="asc", limit=5
    )
    assert [i["id"] for i in oldest["items"]] == [
        str(e.pk) for e in sorted(rows, key=lambda e: (e.at, e.pk))[:5]
    ]


@contextmanager
def selects(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_export_streams_every_row_page_by_page_as_csv(
    app_client: tuple[TestClient, World], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, world = app_client
    monkeypatch.setattr(svc, "EXPORT_PAGE_ROWS", 7)
    start, end = NOW - dt.timedelta(days=30), NOW
    rows = within(world.episodes, start, end)
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    with selects(engine) as statements:
        response = client.get(
            f"{ADMIN_STATS}/export",
            params={
                "start_time": start.isoformat(),
                "end_time": end.isoformat(),
                "timezone_offset": "+08:00",
            },
            headers=world.headers("pm-a"),
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert (
        response.headers["content-disposition"]
        == 'attachment; filename="data-production-statistics.csv"'
    )
    table = list(csv.reader(io.StringIO(response.text)))
    assert table[0] == list(svc.EXPORT_COLUMNS)
    mine = sorted(
        (e for e in rows if e.factory_id == world.a.factory_id),
        key=lambda e: (e.at, e.pk),
        reverse=True,
    )
    assert [r[0] for r in table[1:]] == [e.public for e in mine]
    for line, e in zip(table[1:], mine, strict=True):
        record = dict(zip(table[0], line, strict=True))
        local = (e.at + dt.timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
        assert record["time"] == local
        assert record["robot_device_id"] == e.device_id
        assert record["collector_operator_id"] == e.operator_id
        assert record["task_id"] == e.task_public
        assert record["duration_sec"] == ("" if e.duration is None else f"{e.duration:.3f}")
        assert record["size_bytes"] == ("" if e.size is None else str(e.size))
        assert record["qa_status"] == e.status.value
        assert record["cloud_synced"] == ("true" if e.synced else "false")
    # Streamed in pages of 7: one episode query per page (and one to find the end).
    pages = [s for s in statements if "FROM episodes" in s and "LIMIT" in s]
    assert len(pages) == len(mine) // 7 + 1


# --- data production: operator (a data collector's own numbers) --------------------------------


def test_a_collector_sees_only_its_own_numbers(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    start, end = NOW - dt.timedelta(days=30), NOW
    params = {"start_time": start.isoformat(), "end_time": end.isoformat()}
    rows = within(world.episodes, start, end)
    own_id = int(world.stations[int(world.a.stations[0].id)]["collector_id"])  # type: ignore[arg-type]
    other_id = int(world.stations[int(world.a.stations[1].id)]["collector_id"])  # type: ignore[arg-type]
    own = [e for e in rows if e.collector_id == own_id]
    other = world.collectors[other_id]["operator_id"]
    assert own
    assert len(own) < len(rows)
    for extra in ({}, {"collector_operator_id": other}):
        body = get(client, world, "collector-0", f"{OPERATOR_STATS}/summary", **params, **extra)
        want = metrics(own)
        assert (body["count"], body["duration"], body["size"]) == (
            want["count"],
            want["duration"],
            want["size"],
        )
    trend = get(client, world, "collector-0", f"{OPERATOR_STATS}/trend", **params)
    assert sum(i["count"]["total"] for i in trend["items"]) == len(own)
    breakdown = get(
        client, world, "collector-0", f"{OPERATOR_STATS}/breakdown", **params, dimension="collector"
    )
    assert [(i["id"], i["count"]["total"]) for i in breakdown["items"]] == [
        (world.collectors[own_id]["operator_id"], len(own))
    ]
    second = get(client, world, "collector-1", f"{OPERATOR_STATS}/summary", **params)
    assert second["count"]["total"] == sum(1 for e in rows if e.collector_id == other_id)
    unlinked = client.get(f"{OPERATOR_STATS}/summary", headers=world.headers("collector-unlinked"))
    assert unlinked.status_code == 403
    assert unlinked.json()["code"] == "collector_identity_missing"


# --- quality dashboard ----------------------------------------------------------------------


def test_quality_dashboard_equals_the_rows(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    start, end = NOW - dt.timedelta(days=21), NOW
    for who, factory in (("admin-all", None), ("inspector-a", world.a.factory_id)):
        params: dict[str, Any] = {
            "start_time": start.isoformat(),
            "end_time": end.isoformat(),
            "timezone_offset": "+02:00",
        }
        body = get(client, world, who, f"{V1}/quality/dashboard", **params)
        rows = [
            e
            for e in within(world.episodes, start, end)
            if factory is None or e.factory_id == factory
        ]
        by = Counter(e.status for e in rows)
        approved = by[EpisodeStatus.AUTO_APPROVED] + by[EpisodeStatus.INSPECTOR_APPROVED]
        thrown = by[EpisodeStatus.QA_FAILED] + by[EpisodeStatus.REJECTED]
        qa_done = len(rows) - by[EpisodeStatus.PENDING_QA]
        scores = [e.score for e in rows if e.score is not None]
        assert body["summary"] == {
            "total": len(rows),
            "pending_qa": by[EpisodeStatus.PENDING_QA] + by[EpisodeStatus.QA_RUNNING],
            "auto_approved": by[EpisodeStatus.AUTO_APPROVED],
            "needs_inspection": by[EpisodeStatus.NEEDS_INSPECTION],
            "qa_failed": by[EpisodeStatus.QA_FAILED],
            "inspector_approved": by[EpisodeStatus.INSPECTOR_APPROVED],
            "rejected": by[EpisodeStatus.REJECTED],
            "approved": approved,
            "qa_done": qa_done,
            "pass_rate": pytest.approx(approved / (approved + thrown)),
            "auto_approve_rate": pytest.approx(by[EpisodeStatus.AUTO_APPROVED] / qa_done),
            "avg_score": pytest.approx(sum(scores) / len(scores)),
        }
        checked = [e for e in rows if e.latest_checks is not None]
        assert body["checked_episodes"] == len(checked)
        failing = Counter(
            c["name"] for e in checked for c in e.latest_checks or [] if c["passed"] is False
        )
        assert failing  # the older all-failing results must not be what is counted
        assert body["failing_checks"] == [
            {"name": name, "failed": n, "rate": pytest.approx(n / len(checked))}
            for name, n in sorted(failing.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        decided = [
            i
            for i in world.inspections
            if start <= i["decided_at"] < end and (factory is None or i["factory_id"] == factory)
        ]
        people: dict[int, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        for i in decided:
            day = (i["decided_at"] + dt.timedelta(hours=2)).date().isoformat()
            people[i["user_id"]][day][i["decision"].value] += 1
        want = []
        for user_id, days in people.items():
            total = sum(sum(c.values()) for c in days.values())
            want.append(
                {
                    "user_id": str(user_id),
                    "decided": total,
                    "approved": sum(c["approved"] for c in days.values()),
                    "rejected": sum(c["rejected"] for c in days.values()),
                    "days": [
                        {
                            "date": day,
                            "decided": sum(c.values()),
                            "approved": c["approved"],
                            "rejected": c["rejected"],
                        }
                        for day, c in sorted(days.items())
                    ],
                }
            )
        want.sort(key=lambda p: (-p["decided"], int(p["user_id"])))
        got = [
            {k: p[k] for k in ("user_id", "decided", "approved", "rejected", "days")}
            for p in body["inspectors"]
        ]
        assert got == want
        assert len(want) == 2
        names = {p["user_id"]: (p["account"], p["inspector_name"]) for p in body["inspectors"]}
        assert names[str(world.users["qa-one"])] == ("qa-one", "Qa-One")
        buckets = [0] * 10
        for score in scores:  # [i/10, (i+1)/10), the last one closed at 1.0
            buckets[max(i for i in range(10) if score >= i / 10)] += 1
        assert [b["count"] for b in body["score_distribution"]] == buckets
        assert [b["lower"] for b in body["score_distribution"]] == pytest.approx(
            [i / 10 for i in range(10)]
        )


# --- production dashboard -------------------------------------------------------------------

RANK = {"active": 0, "inactive": 1, "break": 2, "offline": 3}


def _tasks_of(world: World, keep: Callable[[Tk], bool]) -> list[Tk]:
    return [t for t in world.tasks if keep(t)]


def _day_window(day: dt.date, offset: int) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=UTC) - dt.timedelta(minutes=offset)
    return start, start + dt.timedelta(days=1)


def expected_snapshot(
    world: World,
    tasks: list[Tk],
    episodes: list[Ep],
    station_ids: list[int],
    robot_ids: list[int],
    batch_ids: list[int],
    factories: set[int],
    offset: int,
) -> dict[str, Any]:
    today = (NOW + dt.timedelta(minutes=offset)).date()
    start, end = _day_window(today, offset)
    by_task = Counter(t.status for t in tasks)
    by_episode = Counter(e.status for e in episodes)
    days = [today - dt.timedelta(days=6 - i) for i in range(7)]
    trend = []
    for day in days:
        lo, hi = _day_window(day, offset)
        c = Counter(t.status for t in tasks if t.assigned_at and lo <= t.assigned_at < hi)
        item = {
            "date": day.strftime("%m-%d"),
            "day": day.isoformat(),
            "completed": c[TaskStatus.COMPLETED],
            "in_progress": c[TaskStatus.IN_PROGRESS],
            "uploading": c[TaskStatus.UPLOADING],
            "pending": c[TaskStatus.PENDING] + c[TaskStatus.READY],
            "failed": c[TaskStatus.FAILED],
        }
        item["total"] = sum(v for k, v in item.items() if k not in ("date", "day"))
        trend.append(item)

    def distribution(key: Callable[[Tk], int | None], names: dict[int, str]) -> list[Any]:
        counts = Counter(key(t) for t in tasks)
        ordered = sorted(counts, key=lambda k: (-counts[k], (0, 0) if k is None else (1, k)))
        return [
            {
                "id": "" if k is None else str(k),
                "name": names.get(k, "Unclassified") if k else "Unclassified",
                "value": counts[k],
            }
            for k in ordered
        ]

    passed = by_episode[EpisodeStatus.AUTO_APPROVED] + by_episode[EpisodeStatus.INSPECTOR_APPROVED]
    failed = by_episode[EpisodeStatus.QA_FAILED] + by_episode[EpisodeStatus.REJECTED]
    inspecting = by_episode[EpisodeStatus.NEEDS_INSPECTION]
    inspected = passed + failed + inspecting
    sync = Counter(e.sync_status for e in episodes if e.sync_status is not None)
    online = len(set(robot_ids) & world.live_robots)
    stations = sorted(station_ids, key=lambda s: (RANK[world.stations[s]["status"]], s))
    today_rows = [e for e in episodes if start <= e.at < end]
    first = min((t.assigned_at for t in tasks if t.assigned_at), default=None)
    active = [b for b in batch_ids if world.batches[b]["status"] == BatchStatus.ACTIVE]
    active.sort(key=lambda b: (world.batches[b]["started_at"], b), reverse=True)
    in_progress = sorted(
        (t for t in tasks if t.status == TaskStatus.IN_PROGRESS),
        key=lambda t: (t.started_at or t.assigned_at or t.created_at, t.pk),
        reverse=True,
    )
    return {
        "timezone_offset": "+08:00" if offset == 480 else "+00:00",
        "tasks": {"total": len(tasks), **{s.value: by_task[s] for s in TaskStatus}},
        "episodes": {"total": len(episodes), **{s.value: by_episode[s] for s in EpisodeStatus}},
        "trend": trend,
        "distributions": {
            "scene": distribution(lambda t: t.scene_id, world.scenes),
            "sop": distribution(lambda t: t.sop_id, world.sops),
        },
        "quality": {
            "pass_rate": pct(passed, inspected) if inspected else 0.0,
            "total_inspected": inspected,
            "passed": passed,
            "failed": failed,
            "inspecting": inspecting,
            "pending_qa": by_episode[EpisodeStatus.PENDING_QA]
            + by_episode[EpisodeStatus.QA_RUNNING],
        },
        "queues": {
            "uploading": by_task[TaskStatus.UPLOADING],
            "awaiting_verification": sum(world.unverified_uploads.get(r, 0) for r in robot_ids),
            "qa_backlog": by_episode[EpisodeStatus.PENDING_QA]
            + by_episode[EpisodeStatus.QA_RUNNING],
            "inspection_waiting": inspecting,
            "inspection_claimed": len({e.pk for e in episodes} & world.live_claims),
            "sync_queued": sync[SyncStatus.QUEUED],
            "sync_in_progress": sync[SyncStatus.IN_PROGRESS],
            "sync_retry_wait": sync[SyncStatus.RETRY_WAIT],
            "sync_failed": sync[SyncStatus.FAILED],
        },
        "devices": {
            "total": len(robot_ids),
            "online": online,
            "offline": len(robot_ids) - online,
            "online_rate": pct(online, len(robot_ids)) if robot_ids else 0.0,
        },
        "system": {
            "operating_days": 0
            if first is None
            else (today - (first + dt.timedelta(minutes=offset)).date()).days + 1,
            "total_data_duration_sec": pytest.approx(sum(e.duration or 0 for e in episodes)),
            "online_stations": sum(
                1 for s in station_ids if world.stations[s]["status"] == "active"
            ),
        },
        "today": {
            "date": today.isoformat(),
            "tasks_completed": sum(
                1
                for t in tasks
                if t.status == TaskStatus.COMPLETED
                and t.completed_at
                and start <= t.completed_at < end
            ),
            "episodes": len(today_rows),
            "duration_sec": pytest.approx(sum(e.duration or 0 for e in today_rows)),
            "size_bytes": sum(e.size or 0 for e in today_rows),
            "approved": sum(1 for e in today_rows if e.status in SUCCESS),
        },
        "stations": [
            {
                "id": str(s),
                "name": world.stations[s]["name"],
                "status": world.stations[s]["status"],
                "collector_operator_id": world.collectors[int(world.stations[s]["collector_id"])][
                    "operator_id"
                ],
                "device_id": world.robots[int(world.stations[s]["robot_id"])]["device_id"],
                "device_model": world.robots[int(world.stations[s]["robot_id"])]["model"],
            }
            for s in stations
        ],
        "active_batches": [
            {
                "id": str(b),
                "batch_id": world.batches[b]["batch_id"],
                "order_name": world.batches[b]["order_name"],
                "scene_name": world.batches[b]["scene_name"],
                "task_count": sum(1 for t in world.tasks if t.batch_id == b),
                "completed_count": sum(
                    1 for t in world.tasks if t.batch_id == b and t.status == TaskStatus.COMPLETED
                ),
                "failed_count": sum(
                    1 for t in world.tasks if t.batch_id == b and t.status == TaskStatus.FAILED
                ),
                "cancelled_count": sum(
                    1 for t in world.tasks if t.batch_id == b and t.status == TaskStatus.CANCELLED
                ),
            }
            for b in active
        ],
        "active_tasks": [t.public for t in in_progress],
    }


def check_snapshot(body: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("timezone_offset", "tasks", "episodes", "trend", "distributions", "quality"):
        assert body[key] == want[key], key
    for key in ("queues", "devices", "system", "today"):
        assert body[key] == want[key], key
    stations = [
        {
            k: s[k]
            for k in ("id", "name", "status", "collector_operator_id", "device_id", "device_model")
        }
        for s in body["stations"]
    ]
    assert stations == want["stations"]
    batches = (
        [{k: b[k] for k in want["active_batches"][0]} for b in body["active_batches"]]
        if want["active_batches"]
        else body["active_batches"]
    )
    assert batches == want["active_batches"]
    assert [t["id"] for t in body["active_tasks"]] == want["active_tasks"]


def test_snapshot_equals_the_rows_per_factory(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    for site, offset in ((world.a, 0), (world.b, 480)):
        f = site.factory_id
        body = get(client, world, "admin-all", f"{V1}/production/dashboard/snapshot", factory_id=f)
        assert body["scope"] == {
            "role": "admin",
            "factory_id": str(f),
            "workstation_id": "",
            "organization_id": "",
            "warning": "",
        }
        want = expected_snapshot(
            world,
            _tasks_of(world, lambda t, f=f: t.factory_id == f),
            [e for e in world.episodes if e.factory_id == f],
            [s for s, m in world.stations.items() if m["factory_id"] == f],
            [r for r, m in world.robots.items() if m["factory_id"] == f],
            [b for b, m in world.batches.items() if m["factory_id"] == f],
            {f},
            offset,
        )
        check_snapshot(body, want)
    # A production manager of A sees A's numbers without asking for the factory.
    scoped = get(client, world, "pm-a", f"{V1}/production/dashboard/snapshot")
    mine = get(
        client,
        world,
        "admin-all",
        f"{V1}/production/dashboard/snapshot",
        factory_id=world.a.factory_id,
    )
    assert {k: scoped[k] for k in ("tasks", "episodes", "quality", "queues", "today")} == {
        k: mine[k] for k in ("tasks", "episodes", "quality", "queues", "today")
    }
    # One station of A (Go's workstation_id), and B by its organization.
    station = int(world.a.stations[1].id)  # type: ignore[arg-type]
    body = get(
        client, world, "admin-all", f"{V1}/production/dashboard/snapshot", workstation_id=station
    )
    assert body["scope"]["workstation_id"] == str(station)
    want = expected_snapshot(
        world,
        _tasks_of(world, lambda t: t.workstation_id == station),
        [e for e in world.episodes if e.workstation_id == station],
        [station],
        [int(world.stations[station]["robot_id"])],
        [b for b, m in world.batches.items() if m["workstation_id"] == station],
        {world.a.factory_id},
        0,
    )
    want["timezone_offset"] = "+00:00"  # no single factory asked for: UTC for the admin
    check_snapshot(body, want)
    with Session(client.app.state.engine) as session:  # type: ignore[attr-defined]
        organization = session.get(Factory, world.b.factory_id).organization_id  # type: ignore[union-attr]
    by_org = get(
        client,
        world,
        "admin-all",
        f"{V1}/production/dashboard/snapshot",
        organization_id=organization,
        timezone_offset="+08:00",
    )
    b_only = get(
        client,
        world,
        "admin-all",
        f"{V1}/production/dashboard/snapshot",
        factory_id=world.b.factory_id,
    )
    for key in ("tasks", "episodes", "trend", "quality", "queues", "devices", "today", "stations"):
        assert by_org[key] == b_only[key], key


def test_a_collectors_dashboard_shows_its_own_work(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    station = int(world.a.stations[0].id)  # type: ignore[arg-type]
    collector = int(world.stations[station]["collector_id"])
    body = get(client, world, "collector-0", f"{V1}/production/dashboard/snapshot")
    assert body["scope"]["role"] == "data_collector"
    want = expected_snapshot(
        world,
        _tasks_of(world, lambda t: t.collector_id == collector),
        [e for e in world.episodes if e.collector_id == collector],
        [station],
        [int(world.stations[station]["robot_id"])],
        [b for b, m in world.batches.items() if m["workstation_id"] == station],
        {world.a.factory_id},
        0,
    )
    check_snapshot(body, want)
    assert body["queues"]["awaiting_verification"] > 0  # its robot's reported uploads
    empty = get(client, world, "collector-unlinked", f"{V1}/production/dashboard/snapshot")
    assert empty["scope"]["warning"] == "account not linked to a data collector"
    assert empty["tasks"]["total"] == empty["episodes"]["total"] == 0
    assert empty["stations"] == empty["active_batches"] == empty["active_tasks"] == []


def test_overview_equals_the_rows(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    b = world.b.factory_id
    offset = 480
    body = get(
        client,
        world,
        "admin-all",
        f"{V1}/production/dashboard/overview",
        factory_id=b,
        trend_days=10,
        recent_limit=4,
        preview_limit=3,
    )
    tasks = _tasks_of(world, lambda t: t.factory_id == b)
    episodes = [e for e in world.episodes if e.factory_id == b]
    today = (NOW + dt.timedelta(minutes=offset)).date()
    start, end = _day_window(today, offset)
    days = [today - dt.timedelta(days=9 - i) for i in range(10)]
    period_start = _day_window(days[0], offset)[0]
    period = [e for e in episodes if period_start <= e.at < end]
    today_rows = [e for e in episodes if start <= e.at < end]
    by_task = Counter(t.status for t in tasks)
    by_episode = Counter(e.status for e in episodes)
    passed = by_episode[EpisodeStatus.AUTO_APPROVED] + by_episode[EpisodeStatus.INSPECTOR_APPROVED]
    failed = by_episode[EpisodeStatus.QA_FAILED] + by_episode[EpisodeStatus.REJECTED]
    inspected = passed + failed + by_episode[EpisodeStatus.NEEDS_INSPECTION]
    robots = [r for r, m in world.robots.items() if m["factory_id"] == b]
    stations = [s for s, m in world.stations.items() if m["factory_id"] == b]
    status_of = Counter(world.stations[s]["status"] for s in stations)
    online_robots = len(set(robots) & world.live_robots)
    assert body["summary"] == {
        "total_tasks": len(tasks),
        "total_episodes": len(episodes),
        "today_tasks": sum(1 for t in tasks if t.assigned_at and start <= t.assigned_at < end),
        "today_episodes": len(today_rows),
        "completed_tasks": sum(
            1
            for t in tasks
            if t.status == TaskStatus.COMPLETED and t.completed_at and start <= t.completed_at < end
        ),
        "in_progress_tasks": by_task[TaskStatus.IN_PROGRESS],
        "uploading_tasks": by_task[TaskStatus.UPLOADING],
        "pending_tasks": by_task[TaskStatus.PENDING],
        "failed_tasks": sum(
            1 for t in tasks if t.status == TaskStatus.FAILED and start <= t.updated_at < end
        ),
        "cancelled_tasks": by_task[TaskStatus.CANCELLED],
        "active_batches": sum(
            1
            for m in world.batches.values()
            if m["factory_id"] == b and m["status"] == BatchStatus.ACTIVE
        ),
        "active_stations": status_of["active"],
        "total_stations": len(stations),
        "robot_online_rate": pct(online_robots, len(robots)),
        "quality_pass_rate": pct(passed, inspected),
        "total_data_duration_sec": pytest.approx(sum(e.duration or 0 for e in episodes)),
        "total_data_size_bytes": sum(e.size or 0 for e in episodes),
        "today_data_duration_sec": pytest.approx(sum(e.duration or 0 for e in today_rows)),
        "today_data_size_bytes": sum(e.size or 0 for e in today_rows),
    }
    p = Counter(e.status for e in period)
    approved = p[EpisodeStatus.AUTO_APPROVED] + p[EpisodeStatus.INSPECTOR_APPROVED]
    thrown = p[EpisodeStatus.QA_FAILED] + p[EpisodeStatus.REJECTED]
    assert body["period"] == {
        "start_date": days[0].isoformat(),
        "end_date": today.isoformat(),
        "days": 10,
        "episodes": len(period),
        "duration_hours": pytest.approx(sum(e.duration or 0 for e in period) / 3600),
        "size_bytes": sum(e.size or 0 for e in period),
        "approved": approved,
        "rejected": p[EpisodeStatus.REJECTED],
        "qa_failed": p[EpisodeStatus.QA_FAILED],
        "pass_rate": pct(approved, (approved + thrown)),
    }
    trend = []
    for day in days:
        lo, hi = _day_window(day, offset)
        rows = [e for e in episodes if lo <= e.at < hi]
        trend.append(
            {
                "date": day.strftime("%m-%d"),
                "day": day.isoformat(),
                "total": len(rows),
                "approved": sum(1 for e in rows if e.status in SUCCESS),
                "rejected": sum(1 for e in rows if e.status in FAILED),
                "duration_sec": pytest.approx(sum(e.duration or 0 for e in rows)),
                "size_bytes": sum(e.size or 0 for e in rows),
            }
        )
    assert body["trend"] == trend
    assert body["task_status_distribution"] == [
        {"status": s.value, "label": svc.TASK_STATUS_LABELS[s], "value": by_task[s]}
        for s in TaskStatus
        if by_task[s]
    ]
    failures = sorted((e for e in episodes if e.status in FAILED), key=lambda e: -e.pk)[:4]
    assert [(f["id"], f["title"], f["reason"]) for f in body["quality"]["recent_failures"]] == [
        (str(e.pk), e.public, e.flag) for e in failures
    ]
    assert body["devices"]["summary"]["online"] == online_robots
    assert body["stations"]["summary"] == {
        "total": len(stations),
        "online": status_of["active"] + status_of["inactive"] + status_of["break"],
        "active": status_of["active"],
        "inactive": status_of["inactive"],
        "break": status_of["break"],
        "offline": status_of["offline"],
        "online_rate": pct(
            status_of["active"] + status_of["inactive"] + status_of["break"], len(stations)
        ),
    }
    recent = sorted(tasks, key=lambda t: (t.updated_at, t.pk), reverse=True)[:4]
    assert [t["task_id"] for t in body["recent_tasks"]] == [t.public for t in recent]
    newest = sorted(episodes, key=lambda e: -e.pk)[:3]
    assert [(p["episode_id"], p["preview_url"]) for p in body["previews"]] == [
        (e.public, f"/api/v1/episodes/{e.pk}/presign?kind=mcap") for e in newest
    ]


# --- bad input, scope and roles -----------------------------------------------------------------


def test_bad_input_is_422_with_a_stable_code(app_client: tuple[TestClient, World]) -> None:
    client, world = app_client
    pm = world.headers("pm-a")
    long_ago = (NOW - dt.timedelta(days=400)).isoformat()
    cases: list[tuple[str, dict[str, Any], str]] = [
        (f"{ADMIN_STATS}/summary", {"start_time": "yesterday"}, "validation_error"),
        (f"{ADMIN_STATS}/summary", {"end_time": "2026-13-01T00:00:00Z"}, "validation_error"),
        (
            f"{ADMIN_STATS}/summary",
            {"start_time": NOW.isoformat(), "end_time": (NOW - dt.timedelta(hours=1)).isoformat()},
            "invalid_time_range",
        ),
        (
            f"{ADMIN_STATS}/summary",
            {"start_time": NOW.isoformat(), "end_time": NOW.isoformat()},
            "invalid_time_range",
        ),
        (f"{ADMIN_STATS}/trend", {"start_time": long_ago}, "time_range_too_long"),
        (
            f"{ADMIN_STATS}/trend",
            {"granularity": "hour", "start_time": (NOW - dt.timedelta(days=40)).isoformat()},
            "time_range_too_long",
        ),
        (f"{ADMIN_STATS}/trend", {"granularity": "year"}, "validation_error"),
        (f"{ADMIN_STATS}/trend", {"timezone_offset": "+8"}, "invalid_timezone_offset"),
        (f"{ADMIN_STATS}/trend", {"timezone_offset": "+15:00"}, "invalid_timezone_offset"),
        (f"{ADMIN_STATS}/trend", {"timezone_offset": "+05:75"}, "invalid_timezone_offset"),
        (f"{ADMIN_STATS}/breakdown", {"dimension": "planet"}, "validation_error"),
        (f"{ADMIN_STATS}/breakdown", {"limit": 0}, "validation_error"),
        (f"{ADMIN_STATS}/breakdown", {"offset": -1}, "validation_error"),
        (f"{ADMIN_STATS}/details", {"sort_by": "colour"}, "validation_error"),
        (f"{ADMIN_STATS}/details", {"sort_order": "sideways"}, "validation_error"),
        (f"{ADMIN_STATS}/details", {"offset": 2**64}, "validation_error"),
        (f"{ADMIN_STATS}/summary", {"qa_status": "approved"}, "invalid_filter"),
        (f"{ADMIN_STATS}/summary", {"scene_id": "abc"}, "invalid_filter"),
        (f"{ADMIN_STATS}/summary", {"sop_id": "0"}, "invalid_filter"),
        (f"{ADMIN_STATS}/summary", {"factory_id": 0}, "validation_error"),
        (f"{ADMIN_STATS}/summary", {"cloud_synced": "maybe"}, "validation_error"),
        (f"{ADMIN_STATS}/export", {"timezone_offset": "Z"}, "invalid_timezone_offset"),
        (f"{V1}/production/dashboard/snapshot", {"trend_days": 0}, "validation_error"),
        (
            f"{V1}/production/dashboard/overview",
            {"timezone_offset": "bogus"},
            "invalid_timezone_offset",
        ),
        (f"{V1}/production/dashboard/overview", {"workstation_id": -3}, "validation_error"),
        (f"{V1}/quality/dashboard", {"start_time": long_ago}, "time_range_too_long"),
    ]
    for path, params, code in cases:
        response = client.get(path, params=params, headers=pm)
        assert response.status_code == 422, (path, params, response.text)
        body = response.json()
        assert body["code"] == code, (path, params, body)
        assert body["message"]
    # Limits above the maximum are clamped, as Go does (not an error).
    clamped = get(client, world, "pm-a", f"{V1}/production/dashboard/snapshot", trend_days=500)
    assert len(clamped["trend"]) == 31
    wide = get(client, world, "pm-a", f"{ADMIN_STATS}/details", limit=1000)
    assert wide["limit"] == 100


def test_another_factory_is_404_and_roles_are_enforced(
    app_client: tuple[TestClient, World],
) -> None:
    client, world = app_client
    b = world.b.factory_id
    for who, path in (
        ("pm-a", f"{ADMIN_STATS}/summary"),
        ("pm-a", f"{ADMIN_STATS}/export"),
        ("pm-a", f"{V1}/production/dashboard/snapshot"),
        ("pm-a", f"{V1}/production/dashboard/overview"),
        ("inspector-a", f"{V1}/quality/dashboard"),
        ("collector-0", f"{OPERATOR_STATS}/summary"),
    ):
        response = client.get(path, params={"factory_id": b}, headers=world.headers(who))
        assert response.status_code == 404, (who, path, response.text)
        assert response.json()["code"] == "not_found"
    # Another factory's order or batch is simply outside the caller's numbers.
    other_batch = world.b.batches[0].id
    empty = get(client, world, "pm-a", f"{ADMIN_STATS}/summary", batch_id=other_batch)
    assert empty["count"]["total"] == 0
    for who, path in (
        ("collector-0", f"{ADMIN_STATS}/summary"),
        ("inspector-a", f"{ADMIN_STATS}/details"),
        ("inspector-a", f"{V1}/production/dashboard/snapshot"),
        ("collector-0", f"{V1}/quality/dashboard"),
        ("pm-a", f"{OPERATOR_STATS}/summary"),
        ("admin-all", f"{OPERATOR_STATS}/trend"),
    ):
        response = client.get(path, headers=world.headers(who))
        assert response.status_code == 403, (who, path, response.text)
        assert response.json()["code"] == "forbidden"
    assert client.get(f"{ADMIN_STATS}/summary").status_code == 401
