"""Benchmark: cloud sync throughput vs. a plain boto3 copy, and approved → synced latency.

Starts its own stack: a MariaDB database ``keystone_bench_sync`` and a private SeaweedFS
(edge bucket and target buckets on the same server, like a factory syncing to a second
store on its LAN). Seeds N approved episodes of ``--mib`` MiB (random bytes: sync does not
parse MCAP) with a sidecar each; the approval queues their sync jobs (the outbox).

1. **throughput** — in the same run, on the same objects:
   * *plain boto3 copy*: ``get_object`` streamed into ``upload_fileobj`` (boto3's transfer
     manager, same part size and part concurrency), the same number of episodes at once;
   * *Keystone sync*: ``claim`` + ``push_batch`` through the S3 target (SHA-256 of every
     byte checked against the verified checksum, resumable multipart, checksum metadata,
     a HEAD after each object, one DB transaction per outcome);
   * *Keystone sync in a Dagster run*: the same through ``sync_batch`` (in process);
   * *Keystone sync → cloud receiver*: the ``http`` target against the reference receiver
     (``keystone cloud-receiver`` in its own process, its bucket on the same SeaweedFS),
     including the receiver's SHA-256 verification at ``complete``.
   The plain copy and Keystone's service path alternate for ``--rounds`` rounds (fresh
   buckets each time); medians are compared. Prints MB/s and episodes/min of each and the
   ratio Keystone / plain copy (target ≥ 0.8).
2. **latency** — steady state: one episode approved every ``--interval`` seconds for
   ``--seconds``, ``due_sync_sensor`` ticking every 10 s (its minimum interval) and each
   run it requests executed in process; prints approved → synced p50/p95/max.

    uv run python bench/sync.py [--episodes 16] [--mib 64] [--rounds 3] [--seconds 60]
                                [--interval 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from boto3.s3.transfer import TransferConfig
from common import recreate_database  # bench/ is on sys.path when run as a script
from dagster import DagsterInstance, SensorResult, build_sensor_context
from sqlmodel import Session, col, select

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
    SyncJob,
    SyncStatus,
    Task,
)
from keystone_core.services import sync as sync_service
from keystone_core.services.audit import Actor
from keystone_core.services.production import record_approval
from keystone_core.services.scope import Scope
from keystone_core.settings import Settings, load_settings
from keystone_core.storage import EmbeddedS3Server, create_s3_client
from keystone_core.storage.client import ensure_bucket
from keystone_core.storage.embedded import free_tcp_ports
from keystone_core.sync.targets import build_target
from keystone_pipelines.defs.sync import due_sync_sensor, sync_batch
from keystone_pipelines.resources import KeystoneDatabase, KeystoneObjectStore

DATABASE = "keystone_bench_sync"
MIB = 1024 * 1024


class Stack:
    def __init__(self, url: str, s3: EmbeddedS3Server, bucket_target: str) -> None:
        self.url = url
        env = {
            "KEYSTONE_ENV": "test",
            "KEYSTONE_DATABASE_URL": url,
            "KEYSTONE_S3_ENDPOINT_URL": s3.endpoint_url,
            "KEYSTONE_S3_ACCESS_KEY": s3.access_key,
            "KEYSTONE_S3_SECRET_KEY": s3.secret_key,
            "KEYSTONE_SYNC_TARGET": "s3",
            "KEYSTONE_SYNC_S3_BUCKET": bucket_target,
        }
        os.environ.update(env)
        self.settings: Settings = load_settings()
        self.engine = create_db_engine(self.settings)
        self.s3 = create_s3_client(self.settings)
        with Session(self.engine, expire_on_commit=False) as session:
            org = Organization(name="bench", slug="bench")
            session.add(org)
            session.flush()
            self.factory = Factory(organization_id=org.id, name="bench", slug="bench")  # type: ignore[arg-type]
            session.add(self.factory)
            session.flush()
            order = Order(
                factory_id=self.factory.id,  # type: ignore[arg-type]
                name="bench",
                target_count=1_000_000,
                status=OrderStatus.IN_PROGRESS,
            )
            session.add(order)
            session.flush()
            self.batch = Batch(
                order_id=order.id,  # type: ignore[arg-type]
                factory_id=self.factory.id,  # type: ignore[arg-type]
                batch_id="bench-batch",
                name="bench",
            )
            session.add(self.batch)
            session.commit()
        self.bucket = self.settings.bucket_for_factory(str(self.factory.id))
        ensure_bucket(self.s3, self.bucket)
        self.n = 0

    def approve(self, size: int) -> int:
        """Upload one episode where a device puts it and approve it (queues its sync)."""
        self.n += 1
        task_id = f"task-bench-{self.n}"
        data = os.urandom(size)
        key = f"{self.factory.id}/dev-1/2026-11-20/{task_id}.mcap"
        self.s3.upload_fileobj(
            _Reader(data), self.bucket, key, Config=TransferConfig(multipart_chunksize=16 * MIB)
        )
        sidecar = json.dumps({"task_id": task_id}).encode()
        self.s3.put_object(Bucket=self.bucket, Key=key[:-5] + ".json", Body=sidecar)
        with Session(self.engine) as session:
            task = Task(
                task_id=task_id,
                batch_id=self.batch.id,  # type: ignore[arg-type]
                order_id=self.batch.order_id,
                factory_id=self.factory.id,  # type: ignore[arg-type]
            )
            session.add(task)
            session.flush()
            episode = Episode(
                episode_id=f"episode-{task_id}",
                task_id=task.id,  # type: ignore[arg-type]
                factory_id=self.factory.id,  # type: ignore[arg-type]
                order_id=self.batch.order_id,
                batch_id=self.batch.id,  # type: ignore[arg-type]
                device_id="dev-1",
                recording_date=clock.now().date(),
                bucket=self.bucket,
                mcap_path=key,
                sidecar_path=key[:-5] + ".json",
                file_size_bytes=size,
                checksum=hashlib.sha256(data).hexdigest(),
                verified_at=clock.now(),
                status=EpisodeStatus.AUTO_APPROVED,
                approved_at=clock.now(),
            )
            session.add(episode)
            session.flush()
            assert episode.id is not None
            record_approval(session, episode.id, sync_target=sync_service.target_of(self.settings))
            session.commit()
            return episode.id

    def objects(self) -> list[tuple[str, int]]:
        with Session(self.engine) as session:
            rows = session.exec(select(Episode)).all()
        out = []
        for e in rows:
            out.append((e.mcap_path, e.file_size_bytes or 0))
            if e.sidecar_path:
                out.append((e.sidecar_path, 0))
        return out

    def requeue_all(self) -> None:
        with Session(self.engine) as session:
            for job in session.exec(select(SyncJob)).all():
                job.status = SyncStatus.QUEUED
                job.attempt_count = 0
                job.progress = {}
                session.add(job)
            session.commit()


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else min(len(self.data), self.pos + n)
        chunk = bytes(self.data[self.pos : end])
        self.pos = end
        return chunk


def plain_copy(stack: Stack, bucket: str) -> tuple[float, int]:
    """boto3 only: stream each object from the edge bucket into another bucket."""
    ensure_bucket(stack.s3, bucket)
    s = stack.settings
    config = TransferConfig(
        multipart_threshold=s.sync_part_size_mib * MIB,
        multipart_chunksize=s.sync_part_size_mib * MIB,
        max_concurrency=s.sync_part_workers,
    )
    objects = stack.objects()
    moved = 0

    def copy(item: tuple[str, int]) -> int:
        key, _size = item
        body = stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"]
        stack.s3.upload_fileobj(body, bucket, key, Config=config)
        return int(stack.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])

    started = time.perf_counter()
    with ThreadPoolExecutor(s.sync_workers) as pool:
        moved = sum(pool.map(copy, objects))
    return time.perf_counter() - started, moved


def keystone_sync(stack: Stack) -> tuple[float, int, int]:
    with Session(stack.engine) as session:
        works = sync_service.claim(session, stack.settings, owner="bench", limit=100_000)
        session.commit()
    target = build_target(stack.settings)
    started = time.perf_counter()
    outcome = sync_service.push_batch(
        works,
        settings=stack.settings,
        target=target,
        source=stack.s3,
        session_scope=lambda: session_scope(stack.engine),
        owner="bench",
        workers=stack.settings.sync_workers,
    )
    seconds = time.perf_counter() - started
    target.close()
    if outcome.synced != len(works):
        print(f"  sync incomplete: {outcome}", file=sys.stderr)
        raise SystemExit(1)
    return seconds, outcome.bytes_sent, outcome.synced


def dagster_sync(stack: Stack, instance: DagsterInstance) -> tuple[float, int]:
    resources = {"database": KeystoneDatabase(), "object_store": KeystoneObjectStore()}
    started = time.perf_counter()
    result = sync_batch.execute_in_process(
        run_config={"ops": {"push_due_episodes": {"config": {"batch_size": 100_000}}}},
        instance=instance,
        resources=resources,
    )
    seconds = time.perf_counter() - started
    assert result.success
    with Session(stack.engine) as session:
        synced = len(
            session.exec(select(SyncJob.id).where(SyncJob.status == SyncStatus.SYNCED)).all()
        )
    return seconds, synced


def receiver_sync(stack: Stack, s3: EmbeddedS3Server, work: Path) -> tuple[float, int]:
    """The http target against a reference receiver process."""
    (port,) = free_tcp_ports(1)
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "KEYSTONE_RECEIVER_DATABASE_URL": f"sqlite:///{work / 'receiver.db'}",
        "KEYSTONE_RECEIVER_S3_ENDPOINT_URL": s3.endpoint_url,
        "KEYSTONE_RECEIVER_S3_ACCESS_KEY": s3.access_key,
        "KEYSTONE_RECEIVER_S3_SECRET_KEY": s3.secret_key,
        "KEYSTONE_RECEIVER_BUCKET": "bench-cloud",
        "KEYSTONE_RECEIVER_TOKEN": token,
    }
    receiver = subprocess.Popen(
        [sys.executable, "-m", "keystone_cli", "cloud-receiver", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or receiver.poll() is not None:
                raise SystemExit("the cloud receiver did not start")
            time.sleep(0.2)
        os.environ.update(
            {
                "KEYSTONE_SYNC_TARGET": "http",
                "KEYSTONE_SYNC_HTTP_URL": base,
                "KEYSTONE_SYNC_HTTP_TOKEN": token,
            }
        )
        stack.settings = load_settings()
        with Session(stack.engine) as session:
            sync_service.enqueue_matching(
                session,
                Scope.everything(),
                stack.settings,
                sync_service.EnqueueFilter(limit=100_000),
                actor=Actor.system("bench"),
            )
            session.commit()
        seconds, _sent, synced = keystone_sync(stack)
        return seconds, synced
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
        for name in ("KEYSTONE_SYNC_TARGET", "KEYSTONE_SYNC_HTTP_URL", "KEYSTONE_SYNC_HTTP_TOKEN"):
            os.environ.pop(name, None)
        stack.settings = load_settings()


def steady_latency(
    stack: Stack, instance: DagsterInstance, seconds: float, interval: float, size: int
) -> list[float]:
    """Approvals at a steady rate; the sensor ticks every 10 s and its runs execute."""
    resources = {"database": KeystoneDatabase(), "object_store": KeystoneObjectStore()}
    stop = threading.Event()
    approved: list[int] = []

    def producer() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.monotonic()
            approved.append(stack.approve(size))
            time.sleep(max(0.0, interval - (time.monotonic() - began)))
        stop.set()

    thread = threading.Thread(target=producer)
    thread.start()
    while True:
        tick = time.monotonic()
        context = build_sensor_context(instance=instance, resources=resources)
        result = due_sync_sensor(context)
        if isinstance(result, SensorResult):
            for request in result.run_requests or []:
                sync_batch.execute_in_process(
                    run_config=request.run_config, instance=instance, resources=resources
                )
        if stop.is_set() and sync_service.due_count(Session(stack.engine)) == 0:
            break
        time.sleep(max(0.0, 10.0 - (time.monotonic() - tick)))
    thread.join()
    with Session(stack.engine) as session:
        rows = session.exec(
            select(Episode.approved_at, SyncJob.synced_at)
            .join(SyncJob, col(SyncJob.episode_id) == col(Episode.id))
            .where(col(Episode.id).in_(approved))
        ).all()
    return sorted(
        (clock.as_utc(synced) - clock.as_utc(approved)).total_seconds()
        for approved, synced in rows
        if approved is not None and synced is not None
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--latency-mib", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    parser.add_argument("--mariadb", default="127.0.0.1:3306")
    args = parser.parse_args()
    host, port = args.mariadb.split(":")
    work = Path(tempfile.mkdtemp(prefix="keystone-bench-sync-"))
    s3 = EmbeddedS3Server(data_dir=work / "s3", access_key="BENCHKEY", secret_key="bench-secret")
    s3.start()
    try:
        url = recreate_database(host, int(port), DATABASE)
        upgrade(create_db_engine(load_settings(env="test", database_url=url)), lock_dir=work)
        stack = Stack(url, s3, "bench-target")
        size = args.mib * MIB
        print(f"seeding {args.episodes} approved episodes of {args.mib} MiB …", flush=True)
        for _ in range(args.episodes):
            stack.approve(size)
        total = args.episodes * size
        # Plain copy and Keystone alternate, each into fresh buckets, and the medians are
        # compared: this host's disk and CPU drift by ±15 % between minutes.
        plain_runs: list[float] = []
        ours_runs: list[float] = []
        for n in range(1, args.rounds + 1):
            print(f"round {n}/{args.rounds}: plain boto3 copy …", flush=True)
            plain_runs.append(plain_copy(stack, f"bench-plain-{n}")[0])
            print(f"round {n}/{args.rounds}: Keystone sync (service) …", flush=True)
            os.environ["KEYSTONE_SYNC_S3_BUCKET"] = f"bench-target-{n}"
            stack.settings = load_settings()
            stack.requeue_all()
            ours_runs.append(keystone_sync(stack)[0])
        results: dict[str, tuple[float, int]] = {
            "plain boto3 copy": (statistics.median(plain_runs), total),
            "Keystone sync": (statistics.median(ours_runs), total),
        }
        print("Keystone sync in a Dagster run (new target bucket) …", flush=True)
        os.environ["KEYSTONE_SYNC_S3_BUCKET"] = "bench-target-dagster"
        stack.settings = load_settings()
        stack.requeue_all()
        instance = DagsterInstance.ephemeral()
        seconds, _ = dagster_sync(stack, instance)
        results["Keystone sync, Dagster run"] = (seconds, total)
        print("Keystone sync → reference cloud receiver (http) …", flush=True)
        seconds, _ = receiver_sync(stack, s3, work)
        results["Keystone sync → receiver"] = (seconds, total)
        print(
            f"steady state: one {args.latency_mib} MiB episode every {args.interval} s "
            f"for {args.seconds:.0f} s …",
            flush=True,
        )
        latencies = steady_latency(
            stack, instance, args.seconds, args.interval, args.latency_mib * MIB
        )
    finally:
        s3.stop()
    s = stack.settings
    print()
    print(
        f"Sync throughput — {args.episodes} episodes x {args.mib} MiB, S3 → S3 on one "
        f"SeaweedFS, {s.sync_workers} episodes x {s.sync_part_workers} parts of "
        f"{s.sync_part_size_mib} MiB at once"
    )
    print(
        "  rounds (s): plain "
        + ", ".join(f"{x:.2f}" for x in plain_runs)
        + " | Keystone "
        + ", ".join(f"{x:.2f}" for x in ours_runs)
    )
    base = results["plain boto3 copy"][0]
    for label, (seconds, _moved) in results.items():
        mb_s = total / 1e6 / seconds
        per_min = args.episodes / seconds * 60
        ratio = base / seconds
        print(
            f"  {label:28}: {seconds:6.2f} s  {mb_s:7.1f} MB/s  {per_min:7.1f} episodes/min"
            f"  {ratio:5.2f}x plain"
        )
    ratio = base / results["Keystone sync"][0]
    print(f"  Keystone / plain copy (medians): {ratio:.2f} (target >= 0.80)")
    print(
        f"Approved → synced ({len(latencies)} episodes): p50 {percentile(latencies, 50):.1f} s, "
        f"p95 {percentile(latencies, 95):.1f} s, max {max(latencies or [0]):.1f} s "
        "(sensor interval 10 s, runs in process)"
    )


if __name__ == "__main__":
    main()
