"""Benchmark: list endpoints under load against a live ``keystone api`` on MariaDB.

Starts ``keystone api`` (its own process, N workers) on a fresh MariaDB database seeded
with one factory and a few hundred tasks, then drives it with 32 concurrent keep-alive
connections for a fixed time per endpoint: with ``wrk`` when it is installed (Debian
package ``wrk``; light enough to leave the CPU to the server), else with httpx + asyncio.
is the in-run baseline: the ratio column is the endpoint's rps over the baseline's.

    uv run python bench/api.py [--seconds 20] [--connections 32] [--workers 2]

The load generator shares the 2-core host with the server, so absolute rps understate
what a dedicated client would see; the ratios are what to compare between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pymysql
from sqlmodel import Session

from keystone_core.db import create_db_engine
from keystone_core.migrate import upgrade
from keystone_core.models import Batch, Factory, Order, Organization, Task
from keystone_core.settings import load_settings
from keystone_core.storage.embedded import free_tcp_ports

DATABASE = "keystone_bench_api"
ADMIN_PASSWORD = "bench-admin-password"


def prepare_database(tasks: int) -> str:
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        cur.execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4")
    conn.close()
    url = f"mysql+pymysql://root@127.0.0.1:3306/{DATABASE}"
    engine = create_db_engine(load_settings(env="test", database_url=url))
    upgrade(engine, lock_dir=Path(tempfile.mkdtemp()))
    with Session(engine) as session:
        org = Organization(name="Bench", slug="bench")
        session.add(org)
        session.flush()
        factory = Factory(organization_id=org.id, name="Bench", slug="bench")  # type: ignore[arg-type]
        session.add(factory)
        session.flush()
        order = Order(factory_id=factory.id, name="bench", target_count=tasks)  # type: ignore[arg-type]
        session.add(order)
        session.flush()
        batch = Batch(batch_id="batch-bench", order_id=order.id, factory_id=factory.id)  # type: ignore[arg-type]
        session.add(batch)
        session.flush()
        session.add_all(
            Task(
                task_id=f"task-bench-{i:05d}",
                batch_id=batch.id,  # type: ignore[arg-type]
                order_id=order.id,  # type: ignore[arg-type]
                factory_id=factory.id,  # type: ignore[arg-type]
            )
            for i in range(tasks)
        )
        session.commit()
    engine.dispose()
    return url


def start_api(url: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KEYSTONE_ENV": "test",
        "KEYSTONE_DATABASE_URL": url,
        "KEYSTONE_SECRET_KEY": secrets.token_urlsafe(40),
        "KEYSTONE_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "KEYSTONE_S3_ENDPOINT_URL": "http://127.0.0.1:1",
        "KEYSTONE_LOG_LEVEL": "WARNING",
        "KEYSTONE_DATA_DIR": tempfile.mkdtemp(),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keystone_cli",
            "api",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/health/live", timeout=1).is_success:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("keystone api did not start")


async def load(
    base: str, path: str, token: str, seconds: float, connections: int
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=base, limits=limits, headers=headers, timeout=10
    ) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.get(path)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / elapsed,
        "p50": quantiles[49] * 1000,
        "p95": quantiles[94] * 1000,
        "p99": quantiles[98] * 1000,
        "errors": errors,
        "requests": len(latencies),
    }


WRK_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %f %f %f %d\\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def load_with_wrk(
    wrk: str, base: str, path: str, token: str, seconds: float, connections: int
) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_REPORT)
    output = subprocess.run(
        [
            wrk,
            "-t2",
            f"-c{connections}",
            f"-d{int(seconds)}s",
            "-s",
            script.name,
            "-H",
            f"Authorization: Bearer {token}",
            base + path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    line = next(line for line in output.splitlines() if line.startswith("RESULT"))
    requests, duration_us, p50, p95, p99, errors = line.split()[1:]
    return {
        "rps": int(requests) / (int(duration_us) / 1e6),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "errors": float(errors),
        "requests": float(requests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=500)
    args = parser.parse_args()

    url = prepare_database(args.tasks)
    (port,) = free_tcp_ports(1)
    process = start_api(url, port, args.workers)
    base = f"http://127.0.0.1:{port}"
    try:
        token = httpx.post(
            f"{base}/api/v1/auth/login", json={"account": "admin", "password": ADMIN_PASSWORD}
        ).json()["access_token"]
        paths = ["/api/v1/health/live", "/api/v1/tasks?limit=50", "/api/v1/factories"]
        print(
            f"{args.connections} connections, {args.seconds:.0f} s per endpoint, "
            f"{args.workers} API workers, MariaDB, {args.tasks} tasks\n"
        )
        print(
            f"{'endpoint':<26} {'rps':>7} {'p50 ms':>7} {'p95 ms':>7} "
            f"{'p99 ms':>7} {'ratio':>6} {'errors':>6}"
        )
        wrk = shutil.which("wrk")
        print(f"load generator: {'wrk' if wrk else 'httpx (install wrk for lighter load)'}")
        baseline = None
        for path in paths:
            if wrk:
                result = load_with_wrk(wrk, base, path, token, args.seconds, args.connections)
            else:
                result = asyncio.run(load(base, path, token, args.seconds, args.connections))
            baseline = baseline or result["rps"]
            print(
                f"{path:<26} {result['rps']:>7.0f} {result['p50']:>7.1f} {result['p95']:>7.1f} "
                f"{result['p99']:>7.1f} {result['rps'] / baseline:>6.2f} {result['errors']:>6.0f}"
            )
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
