"""Benchmark: a factory's robots through register → record → upload → verified ACK.

Starts its own stack on this machine — a MariaDB database ``keystone_bench_devices``, a
private SeaweedFS, ``keystone api`` (one worker) and, for the default SHA-256 level, the
``verify_uploads`` job in a loop (what the Dagster sensor and run queue do) — then runs
``keystone simulate``'s fleet: N robots, each recording ``--tasks`` small episodes.

Prints the fleet summary (callback and upload_complete → upload_ack latencies, episodes,
errors) and, as a same-run baseline, the time of the object-store reads a verification
needs (HEAD MCAP + GET sidecar), so the ratio says how much Keystone adds on top.

    uv run python bench/devices.py [--robots 200] [--tasks 2] [--record-s 5] [--verify sha256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import recreate_database  # bench/ is on sys.path when run as a script
from sqlmodel import Session

from keystone_core.db import create_db_engine
from keystone_core.models import Factory, Organization, RobotType
from keystone_core.settings import load_settings
from keystone_core.simulation.fleet import FleetPlan, run_fleet
from keystone_core.storage import EmbeddedS3Server, create_s3_client_for_endpoint, free_tcp_ports

DATABASE = "keystone_bench_devices"
ADMIN_PASSWORD = "bench-admin-password"


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_tcp_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "keystone_cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/api/v1/health/live", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(log.read_text()[-3000:])


def baseline_reads(s3: EmbeddedS3Server, bucket: str, work: Path, samples: int = 50) -> float:
    """Median ms of HEAD mcap + GET sidecar on this store (what a check reads at least)."""
    from keystone_core.simulation.episodes import EpisodeSpec, generate

    client = create_s3_client_for_endpoint(
        s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key
    )
    episode = generate(EpisodeSpec(task_id="baseline", device_id="bench"), work)
    client.upload_file(str(episode.mcap_path), bucket, "baseline.mcap")
    client.upload_file(str(episode.sidecar_path), bucket, "baseline.json")
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        client.head_object(Bucket=bucket, Key="baseline.mcap")
        client.get_object(Bucket=bucket, Key="baseline.json")["Body"].read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--record-s", type=float, default=5.0)
    parser.add_argument("--verify", choices=["metadata", "sha256"], default="sha256")
    parser.add_argument("--mariadb", default="127.0.0.1:3306")
    args = parser.parse_args()

    host, port = args.mariadb.split(":")
    url = recreate_database(host, int(port), DATABASE)
    work = Path(tempfile.mkdtemp(prefix="keystone-bench-devices-"))
    s3 = EmbeddedS3Server(data_dir=work / "s3", access_key="BENCHKEY", secret_key="bench-secret")
    s3.start(timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
    env.update(
        {
            "KEYSTONE_ENV": "test",
            "KEYSTONE_DATABASE_URL": url,
            "KEYSTONE_DATA_DIR": str(work / "data"),
            "KEYSTONE_SECRET_KEY": "bench-secret-key-0123456789abcdef0123456789",
            "KEYSTONE_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "KEYSTONE_S3_ENDPOINT_URL": s3.endpoint_url,
            "KEYSTONE_S3_ACCESS_KEY": s3.access_key,
            "KEYSTONE_S3_SECRET_KEY": s3.secret_key,
            "KEYSTONE_ACK_VERIFY": args.verify,
            "KEYSTONE_REGISTRATION_RATE_PER_MINUTE": "10000",
            "KEYSTONE_LOGIN_RATE_PER_MINUTE": "10000",
            "KEYSTONE_LOG_LEVEL": "WARNING",
        }
    )
    stop = threading.Event()
    api: subprocess.Popen[bytes] | None = None
    try:
        api, base = start_api(env, work / "api.log")
        settings = load_settings(env="test", database_url=url)
        engine = create_db_engine(settings)
        with Session(engine) as session:
            org = Organization(name="bench", slug="bench")
            session.add(org)
            session.flush()
            factory = Factory(organization_id=org.id, name="Bench factory", slug="bench")  # type: ignore[arg-type]
            session.add_all([factory, RobotType(name="bench arm", model="bench-arm")])
            session.commit()
            factory_id = int(factory.id)  # type: ignore[arg-type]
        bucket = f"edge-{factory_id}"
        create_s3_client_for_endpoint(
            s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key
        ).create_bucket(Bucket=bucket)
        baseline_ms = baseline_reads(s3, bucket, work / "baseline")

        if args.verify == "sha256":
            from dagster import DagsterInstance

            from keystone_pipelines.definitions import defs
            from keystone_pipelines.resources import KeystoneDatabase

            resource = KeystoneDatabase(
                database_url=url,
                s3_endpoint_url=s3.endpoint_url,
                s3_access_key=s3.access_key,
                s3_secret_key=s3.secret_key,
            )

            def verifier() -> None:
                with DagsterInstance.ephemeral() as instance:
                    job = defs.resolve_job_def("verify_uploads")
                    while not stop.is_set():
                        job.execute_in_process(instance=instance, resources={"database": resource})
                        stop.wait(0.5)

            threading.Thread(target=verifier, daemon=True).start()

        plan = FleetPlan(
            base_url=base,
            admin_account="admin",
            admin_password=ADMIN_PASSWORD,
            factory_id=factory_id,
            robots=args.robots,
            tasks_per_robot=args.tasks,
            data_dir=work / "robots",
            duration_s=args.record_s,
            ack_timeout_s=300,
        )
        print(f"{args.robots} robots x {args.tasks} episodes, verify={args.verify}", flush=True)
        summary = asyncio.run(
            run_fleet(plan, robot_type="bench-arm", progress=lambda line: print(line, flush=True))
        )
        ack_p50 = summary["upload_complete_to_ack_ms"]["p50"]
        summary["baseline_store_reads_ms_p50"] = round(baseline_ms, 1)
        summary["ack_p50_over_baseline"] = round(ack_p50 / baseline_ms, 1) if ack_p50 else None
        p95_end_to_end_s = max(summary["upload_complete_to_ack_ms"]["p95"] or 0, 0) / 1000
        summary["target_upload_p95_under_5_min"] = p95_end_to_end_s < 300
        print(json.dumps(summary, indent=2))
    finally:
        stop.set()
        if api is not None and api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
        s3.stop()


if __name__ == "__main__":
    main()
