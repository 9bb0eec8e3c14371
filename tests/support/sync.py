"""A factory with approved episodes in a real edge bucket, and ways to run sync over it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from keystone_core import clock
from keystone_core.models import Episode, EpisodeStatus, SyncAttempt, SyncJob, SyncStatus
from keystone_core.services import sync as sync_service
from keystone_core.services.production import record_approval
from keystone_core.settings import Settings, load_settings
from keystone_core.states import transition_episode
from keystone_core.storage import create_s3_client
from keystone_core.storage.client import ensure_bucket
from keystone_core.storage.embedded import EmbeddedS3Server
from keystone_core.sync.targets import build_target
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore
from tests.factories import make_batch, make_factory, make_robot, make_robot_type, make_task

DAY = dt.date(2026, 11, 20)
MIB = 1024 * 1024


class SyncSite:
    """One factory on MariaDB + SeaweedFS. ``env`` holds the ``KEYSTONE_SYNC_*`` settings of
    the target under test; they are exported (monkeypatch) so Dagster's resources, which
    read settings from the environment, see the same configuration."""

    def __init__(
        self,
        engine: Engine,
        url: str,
        s3: EmbeddedS3Server,
        monkeypatch: pytest.MonkeyPatch,
        env: dict[str, str],
    ) -> None:
        self.engine = engine
        self.url = url
        self.s3_server = s3
        self.env = {
            "KEYSTONE_DATABASE_URL": url,
            "KEYSTONE_S3_ENDPOINT_URL": s3.endpoint_url,
            "KEYSTONE_S3_ACCESS_KEY": s3.access_key,
            "KEYSTONE_S3_SECRET_KEY": s3.secret_key,
            "KEYSTONE_SYNC_BACKOFF_BASE_S": "0.01",
            "KEYSTONE_SYNC_PART_SIZE_MIB": "5",
            **env,
        }
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        self.settings: Settings = load_settings(env="test")
        with Session(engine, expire_on_commit=False) as session:
            self.factory = make_factory(session)
            robot_type = make_robot_type(session)
            self.robot = make_robot(
                session, factory_id=self.factory.id, robot_type_id=robot_type.id
            )
            self.batch = make_batch(session, factory_id=self.factory.id)
            session.commit()
        self.s3 = create_s3_client(self.settings)
        self.bucket = self.settings.bucket_for_factory(str(self.factory.id))
        ensure_bucket(self.s3, self.bucket)
        self.resources: dict[str, Any] = {
            "database": KeystoneDatabase(),
            "object_store": KeystoneObjectStore(),
        }
        self.content: dict[str, bytes] = {}  # episode public id → MCAP bytes

    def subprocess_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    # --- episodes ------------------------------------------------------------------------

    def approved(self, count: int, *, size: int = 64 * 1024, large: int = 0) -> list[int]:
        """``count`` approved episodes (the first ``large`` of 12 MiB: multipart), each
        approved the way an inspector's decision does it (transition + record_approval in
        the approving transaction), so their sync jobs come from the outbox."""
        device = self.robot.device_id
        with Session(self.engine, expire_on_commit=False) as session:
            tasks = [
                make_task(session, batch_id=self.batch.id, robot_id=self.robot.id)
                for _ in range(count)
            ]
            session.commit()
        uploads: list[tuple[str, bytes]] = []
        rows: list[Episode] = []
        for i, task in enumerate(tasks):
            n = 12 * MIB + 12345 if i < large else size + i
            data = hashlib.shake_256(f"{task.task_id}".encode()).digest(n)
            key = f"{self.factory.id}/{device}/{DAY.isoformat()}/{task.task_id}.mcap"
            sidecar = json.dumps({"task_id": task.task_id, "device_id": device}).encode()
            uploads += [(key, data), (key[:-5] + ".json", sidecar)]
            public = f"episode_{task.task_id}"
            self.content[public] = data
            rows.append(
                Episode(
                    episode_id=public,
                    task_id=task.id,
                    factory_id=task.factory_id,
                    order_id=task.order_id,
                    batch_id=task.batch_id,
                    robot_id=self.robot.id,
                    device_id=device,
                    recording_date=DAY,
                    bucket=self.bucket,
                    mcap_path=key,
                    sidecar_path=key[:-5] + ".json",
                    file_size_bytes=n,
                    checksum=hashlib.sha256(data).hexdigest(),
                    verified_at=clock.now(),
                    status=EpisodeStatus.NEEDS_INSPECTION,
                    qa_score=0.8,
                )
            )
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda item: self.s3.put_object(Bucket=self.bucket, Key=item[0], Body=item[1]),
                    uploads,
                )
            )
        ids = []
        target = sync_service.target_of(self.settings)
        with Session(self.engine) as session:
            session.add_all(rows)
            session.flush()
            for row in rows:
                assert row.id is not None
                transition_episode(
                    session,
                    row.id,
                    EpisodeStatus.INSPECTOR_APPROVED,
                    values={"approved_at": clock.now()},
                )
                record_approval(session, row.id, sync_target=target)
                ids.append(row.id)
            session.commit()
        return ids

    # --- running sync --------------------------------------------------------------------

    def push_once(self, owner: str = "test-run", *, limit: int = 1000) -> sync_service.SyncOutcome:
        """One claim + push pass through the service (what one sync_batch op does)."""
        with Session(self.engine) as session:
            works = sync_service.claim(session, self.settings, owner=owner, limit=limit)
            session.commit()
        target = build_target(self.settings)
        try:
            return sync_service.push_batch(
                works,
                settings=self.settings,
                target=target,
                source=self.s3,
                session_scope=self.session_scope,
                owner=owner,
                workers=self.settings.sync_workers,
            )
        finally:
            target.close()

    def push_until_done(self, *, passes: int = 30) -> int:
        """Passes until no job is due or waiting; returns the passes used."""
        for n in range(1, passes + 1):
            self.push_once(owner=f"pass-{n}")
            with Session(self.engine) as session:
                waiting = session.exec(
                    select(SyncJob.id).where(
                        col(SyncJob.status).in_(
                            [SyncStatus.QUEUED, SyncStatus.RETRY_WAIT, SyncStatus.IN_PROGRESS]
                        )
                    )
                ).all()
            if not waiting:
                return n
            soonest = self.soonest_retry()
            if soonest is not None and soonest > clock.now():
                import time

                time.sleep(min(1.0, (soonest - clock.now()).total_seconds()))
        return passes

    def soonest_retry(self) -> dt.datetime | None:
        with Session(self.engine) as session:
            value = session.exec(
                select(SyncJob.next_attempt_at)
                .where(SyncJob.status == SyncStatus.RETRY_WAIT)
                .order_by(col(SyncJob.next_attempt_at))
            ).first()
        return None if value is None else clock.as_utc(value)

    def session_scope(self) -> Any:
        from keystone_core.db import session_scope

        return session_scope(self.engine)

    # --- reading state -------------------------------------------------------------------

    def jobs(self) -> list[SyncJob]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.exec(select(SyncJob).order_by(col(SyncJob.id))).all())

    def statuses(self) -> Counter[str]:
        return Counter(str(j.status) for j in self.jobs())

    def attempts(self) -> list[SyncAttempt]:
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.exec(select(SyncAttempt).order_by(col(SyncAttempt.id))).all())

    def instance(self) -> DagsterInstance:
        return DagsterInstance.ephemeral()
