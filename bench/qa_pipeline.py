"""Benchmark: QA pipeline throughput — N small episodes pending → all scored.

Starts its own stack: a MariaDB database ``keystone_bench_qa``, a private SeaweedFS and a
Dagster instance in a temporary ``DAGSTER_HOME``. Generates N small Axon episodes (each
with its own task, so they are consistent), uploads them where devices put them and
registers them ``pending_qa``. Then, on the same data:

1. **plain loop** — the library called directly: claim, ``assess``, record, one episode
   after another (``--workers 1``), and again through ``score_batch`` with the same
   parallelism a run uses (``KEYSTONE_QA_WORKERS``);
2. **Dagster** — ``pending_qa_sensor`` ticks and every run it requests is executed as a
   real run in its own process (``dagster job execute``, what the run launcher does),
   at most 2 at once (the ``qa`` pool limit).

Prints episodes/min of each and the overhead ratio Dagster / plain loop (same workers).

    uv run python bench/qa.py pipeline [--episodes 1000] [--mariadb 127.0.0.1:3306]
    (or bench/qa_pipeline.py with the same options)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import recreate_database  # bench/ is on sys.path when run as a script
from dagster import DagsterInstance, SensorResult, build_sensor_context
from sqlalchemy import delete, update
from sqlmodel import Session, col, func, select

from keystone_core import clock
from keystone_core.db import create_db_engine, session_scope
from keystone_core.migrate import upgrade
from keystone_core.models import (
    Batch,
    Episode,
    EpisodeStatus,
    Factory,
    Order,
    OrderStatus,
    Organization,
    QAResult,
    Robot,
    RobotType,
    Task,
)
from keystone_core.services import qa as qa_service
from keystone_core.settings import load_settings
from keystone_core.simulation.episodes import DEFAULT_TOPICS, EpisodeSpec, generate
from keystone_core.storage import EmbeddedS3Server, create_s3_client
from keystone_core.storage.client import ensure_bucket
from keystone_pipelines.defs.qa import pending_qa_sensor
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

DATABASE = "keystone_bench_qa"
DAY = dt.date(2026, 11, 20)


def seed(url: str, env: dict[str, str], count: int, work: Path) -> None:
    settings = load_settings(env="test", database_url=url)
    engine = create_db_engine(settings)
    s3 = create_s3_client(load_settings(**_s3(env)))
    with Session(engine, expire_on_commit=False) as session:
        org = Organization(name="Bench", slug="bench")
        session.add(org)
        session.flush()
        factory = Factory(organization_id=org.id, name="Bench factory", slug="bench-f1")
        robot_type = RobotType(
            name="Bench arm", model="bench-arm", ros_topics=[t.name for t in DEFAULT_TOPICS]
        )
        session.add_all([factory, robot_type])
        session.flush()
        robot = Robot(
            factory_id=factory.id,
            robot_type_id=robot_type.id,
            device_id="AB-F0001-T0001-000001",
            name="r1",
        )
        order = Order(factory_id=factory.id, name="bench order", target_count=count)
        session.add_all([robot, order])
        session.flush()
        batch = Batch(
            batch_id="batch_bench", order_id=order.id, factory_id=factory.id, name="bench"
        )
        session.add(batch)
        session.flush()
        tasks = [
            Task(
                task_id=f"task_bench_{i:06d}",
                factory_id=factory.id,
                order_id=order.id,
                batch_id=batch.id,
                robot_id=robot.id,
            )
            for i in range(count)
        ]
        session.add_all(tasks)
        session.commit()
    bucket = settings.bucket_for_factory(str(factory.id))
    ensure_bucket(s3, bucket)
    started = time.monotonic()
    rows = []
    for i, task in enumerate(tasks):
        made = generate(
            EpisodeSpec(
                task_id=task.task_id,
                device_id=robot.device_id,
                duration_s=3.0,
                seed=i,
                started_at=dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.UTC),
            ),
            work / "episodes",
        )
        key = f"{factory.id}/{robot.device_id}/{DAY.isoformat()}/{task.task_id}.mcap"
        s3.upload_file(str(made.mcap_path), bucket, key)
        s3.upload_file(str(made.sidecar_path), bucket, key[:-5] + ".json")
        for suffix in (".mcap", ".json", ".mcap.done"):
            (work / "episodes" / f"{task.task_id}{suffix}").unlink()
        rows.append(
            Episode(
                episode_id=f"episode_{task.task_id}",
                task_id=task.id,
                factory_id=factory.id,
                order_id=order.id,
                batch_id=batch.id,
                robot_id=robot.id,
                device_id=robot.device_id,
                recording_date=DAY,
                bucket=bucket,
                mcap_path=key,
                sidecar_path=key[:-5] + ".json",
                file_size_bytes=made.size,
                checksum=made.sha256,
                verified_at=clock.now(),
            )
        )
        if (i + 1) % 100 == 0:
            print(
                f"  generated and uploaded {i + 1}/{count} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()
    engine.dispose()


def _s3(env: dict[str, str]) -> dict[str, Any]:
    return {
        "s3_endpoint_url": env["KEYSTONE_S3_ENDPOINT_URL"],
        "s3_access_key": env["KEYSTONE_S3_ACCESS_KEY"],
        "s3_secret_key": env["KEYSTONE_S3_SECRET_KEY"],
    }


def reset(url: str) -> None:
    engine = create_db_engine(load_settings(env="test", database_url=url))
    with Session(engine) as session:
        session.execute(delete(QAResult))
        session.execute(
            update(Episode).values(
                status=EpisodeStatus.PENDING_QA.value,
                qa_lease_owner=None,
                qa_lease_expires_at=None,
                qa_score=None,
                approved_at=None,
            )
        )
        session.execute(update(Order).values(approved_count=0, status=OrderStatus.CREATED.value))
        session.commit()
    engine.dispose()


def scored(url: str) -> dict[str, int]:
    engine = create_db_engine(load_settings(env="test", database_url=url))
    with Session(engine) as session:
        rows = session.exec(
            select(Episode.status, func.count()).group_by(col(Episode.status))
        ).all()
    engine.dispose()
    return {str(status): int(n) for status, n in rows}


def plain_loop(url: str, env: dict[str, str], workers: int) -> float:
    settings = load_settings(env="test", database_url=url, qa_workers=workers, **_s3(env))
    engine = create_db_engine(settings)
    s3 = create_s3_client(settings)
    started = time.monotonic()
    while True:
        with session_scope(engine) as session:
            jobs = qa_service.claim(
                session,
                settings,
                owner="loop",
                limit=settings.qa_batch_max,
                lease=dt.timedelta(minutes=15),
            )
        if not jobs:
            break
        qa_service.score_batch(
            jobs,
            settings=settings,
            s3=s3,
            session_scope=lambda: session_scope(engine),
            owner="loop",
            workers=workers,
        )
    seconds = time.monotonic() - started
    engine.dispose()
    return seconds


def dagster_pipeline(url: str, env: dict[str, str], home: Path, log: Path) -> tuple[float, int]:
    """Sensor ticks + real runs in their own processes, 2 at a time; (seconds, runs)."""
    run_env = {**env, "DAGSTER_HOME": str(home)}
    resources = {
        "database": KeystoneDatabase(database_url=url, **_s3(env)),
        "object_store": KeystoneObjectStore(
            endpoint_url=env["KEYSTONE_S3_ENDPOINT_URL"],
            access_key=env["KEYSTONE_S3_ACCESS_KEY"],
            secret_key=env["KEYSTONE_S3_SECRET_KEY"],
        ),
    }
    os.environ["DAGSTER_HOME"] = str(home)
    running: list[subprocess.Popen[bytes]] = []
    runs = 0
    started = time.monotonic()
    with DagsterInstance.get() as instance:
        while True:
            running = [p for p in running if p.poll() is None]
            context = build_sensor_context(instance=instance, resources=resources)
            result = pending_qa_sensor(context)
            requests = result.run_requests or [] if isinstance(result, SensorResult) else []
            for request in requests[: max(0, 2 - len(running))]:
                config = home / f"run-{runs}.json"
                config.write_text(json.dumps(request.run_config))
                running.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "dagster",
                            "job",
                            "execute",
                            "-m",
                            "keystone_pipelines.definitions",
                            "-j",
                            "qa_batch",
                            "-c",
                            str(config),
                            "--tags",
                            json.dumps(dict(request.tags)),
                        ],
                        env=run_env,
                        stdout=log.open("ab"),
                        stderr=subprocess.STDOUT,
                    )
                )
                runs += 1
            if not requests and not running:
                break
            time.sleep(0.5)  # the sensor's interval, shortened: the bench measures runs
    return time.monotonic() - started, runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--mariadb", default="127.0.0.1:3306")
    args = parser.parse_args()
    run(args.episodes, args.mariadb)


def run(episodes: int, mariadb: str, work: Path | None = None) -> None:
    """The whole benchmark (``bench/qa.py pipeline`` calls this too)."""
    host, port = mariadb.split(":")
    work = Path(tempfile.mkdtemp(prefix="keystone-bench-qa-", dir=work))
    s3 = EmbeddedS3Server(data_dir=work / "s3", access_key="BENCHKEY", secret_key="bench-secret")
    s3.start()
    try:
        url = recreate_database(host, int(port), DATABASE)
        upgrade(create_db_engine(load_settings(env="test", database_url=url)), lock_dir=work)
        env = {
            **os.environ,
            "KEYSTONE_ENV": "test",
            "KEYSTONE_DATABASE_URL": url,
            "KEYSTONE_S3_ENDPOINT_URL": s3.endpoint_url,
            "KEYSTONE_S3_ACCESS_KEY": s3.access_key,
            "KEYSTONE_S3_SECRET_KEY": s3.secret_key,
        }
        workers = load_settings(env="test").qa_workers
        print(f"seeding {episodes} episodes …", flush=True)
        seed(url, env, episodes, work)
        print("plain loop, 1 worker …", flush=True)
        loop_1 = plain_loop(url, env, 1)
        verdicts = scored(url)
        reset(url)
        print(f"plain loop, {workers} workers …", flush=True)
        loop_n = plain_loop(url, env, workers)
        reset(url)
        home = work / "dagster"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        print(
            "Dagster: pending_qa_sensor + qa_batch runs (own processes, 2 at a time) …", flush=True
        )
        pipeline, runs = dagster_pipeline(url, env, home, work / "runs.log")
        after = scored(url)
    finally:
        s3.stop()
    n = episodes
    print()
    print(f"QA pipeline throughput — {n} episodes of 3 s (2 topics), fast tier via S3 ranged reads")
    rows = [
        ("plain loop, 1 worker", loop_1),
        (f"plain loop, {workers} workers", loop_n),
        (f"Dagster, {runs} qa_batch runs", pipeline),
    ]
    for label, seconds in rows:
        print(f"  {label:28}: {seconds:7.1f} s  {n / seconds * 60:8.0f} episodes/min")
    ratio = pipeline / loop_n
    print(f"  overhead Dagster / plain loop ({workers} workers): {ratio:.2f}x (target <= 2x)")
    print(f"  verdicts (loop): {verdicts}")
    print(f"  verdicts (Dagster): {after}")
    if after != verdicts:
        print("  MISMATCH between the loop's and the pipeline's verdicts", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
