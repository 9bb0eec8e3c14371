"""``keystone dev`` as a newcomer runs it: up, healthy, login works, Dagster sees the code."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from keystone_core.storage.embedded import free_tcp_ports

pytestmark = pytest.mark.integration

GRAPHQL_LOCATIONS = (
    "{ workspaceOrError { __typename ... on Workspace { locationEntries "
    "{ name loadStatus locationOrLoadError { __typename } } } } }"
)


def start_dev(cwd: Path, ports: dict[str, int], log: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYSTONE_", "DAGSTER_"))}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keystone_cli",
            "dev",
            "--api-port",
            str(ports["api"]),
            "--dagster-port",
            str(ports["dagster"]),
            "--s3-port",
            str(ports["s3"]),
            "--receiver-port",
            str(ports["receiver"]),
        ],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_banner(process: subprocess.Popen[str], log: Path, timeout_s: float = 240) -> str:
    output = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = log.read_text(errors="replace")
        if "Press Ctrl-C to stop." in output:
            return output
        if process.poll() is not None:
            break
        time.sleep(0.5)
    pytest.fail(f"keystone dev did not come up:\n{output}")


def stop_and_check_children(process: subprocess.Popen[str]) -> None:
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert descendants, "keystone dev started no child processes"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    _gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


def login(api: str, password: str) -> str:
    response = httpx.post(
        f"{api}/api/v1/auth/login", json={"account": "admin", "password": password}, timeout=10
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def test_dev_stack_comes_up_serves_and_restarts_on_the_same_data(tmp_path: Path) -> None:
    ports = dict(zip(("api", "dagster", "s3", "receiver"), free_tcp_ports(4), strict=True))
    api = f"http://127.0.0.1:{ports['api']}"
    log = tmp_path / "dev.log"
    process = start_dev(tmp_path, ports, log)
    try:
        banner = wait_for_banner(process, log)
        assert f"{api}/api/v1" in banner
        secrets = json.loads((tmp_path / ".keystone" / "dev-secrets.json").read_text())
        assert secrets["admin_password"] in banner

        health = httpx.get(f"{api}/api/v1/health", timeout=10)
        assert health.status_code == 200, health.text
        assert {c["status"] for c in health.json()["components"].values()} == {"up"}

        token = login(api, secrets["admin_password"])
        me = httpx.get(f"{api}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json()["role"] == "admin"

        graphql = httpx.post(
            f"http://127.0.0.1:{ports['dagster']}/graphql",
            json={"query": GRAPHQL_LOCATIONS},
            timeout=30,
        ).json()
        entries = graphql["data"]["workspaceOrError"]["locationEntries"]
        assert [(e["name"], e["loadStatus"]) for e in entries] == [("keystone_pipelines", "LOADED")]
        assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation"

        # The reference cloud receiver is up, and sync points at it.
        receiver = f"http://127.0.0.1:{ports['receiver']}"
        assert receiver in banner
        assert httpx.get(f"{receiver}/health", timeout=10).status_code == 200
        config = httpx.get(
            f"{api}/api/v1/sync/config", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert config["target"] == "http"
        assert config["destination"]["url"] == receiver
    finally:
        if process.poll() is None:
            stop_and_check_children(process)

    # A second start reuses the data: same admin password, same demo rows, same buckets.
    again = start_dev(tmp_path, ports, log)
    try:
        banner = wait_for_banner(again, log)
        assert "buckets: edge-1" in banner
        login(api, secrets["admin_password"])
    finally:
        if again.poll() is None:
            stop_and_check_children(again)


RUNS = (
    "{ runsOrError(filter: {statuses: [SUCCESS]}) { __typename ... on Runs "
    "{ results { jobName } } } }"
)
VERDICTS = {"auto_approved", "needs_inspection"}


def simulate_command(banner: str) -> list[str]:
    """The arguments of the `keystone simulate …` line the banner tells a newcomer to run."""
    (line,) = [line for line in banner.splitlines() if line.startswith("Simulate ")]
    words = shlex.split(line.removeprefix("Simulate").strip())
    assert words[:4] == [".tools/bin/uv", "run", "keystone", "simulate"], line
    return words[3:]


def test_newcomers_path_simulated_robots_to_verdicts_and_synced(tmp_path: Path) -> None:
    """README: `make dev`, open the URLs, run the printed `keystone simulate --robots 5` in
    another terminal, see the episodes reach a verdict and the approved ones synced, in the
    API and in the Dagster UI."""
    ports = dict(zip(("api", "dagster", "s3", "receiver"), free_tcp_ports(4), strict=True))
    api = f"http://127.0.0.1:{ports['api']}"
    log = tmp_path / "dev.log"
    process = start_dev(tmp_path, ports, log)
    try:
        banner = wait_for_banner(process, log)
        args = simulate_command(banner)
        assert args[args.index("--robots") + 1] == "5"
        assert args[args.index("--api") + 1] == api
        # In the directory `make dev` ran in, as the newcomer's second terminal is.
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTONE_")}
        simulated = subprocess.run(
            [sys.executable, "-m", "keystone_cli", *args, "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert simulated.returncode == 0, simulated.stdout + simulated.stderr
        summary = json.loads(simulated.stdout)
        expected = summary["episodes_acked"]
        assert expected == 5 * 2, summary  # five robots, two recordings each by default

        secrets = json.loads((tmp_path / ".keystone" / "dev-secrets.json").read_text())
        headers = {"Authorization": f"Bearer {login(api, secrets['admin_password'])}"}

        def settled() -> tuple[dict[str, int], int] | None:
            episodes = httpx.get(
                f"{api}/api/v1/episodes", params={"limit": 100}, headers=headers, timeout=10
            ).json()
            statuses = [e["status"] for e in episodes["items"]]
            counts = {s: statuses.count(s) for s in set(statuses)}
            synced = (
                httpx.get(f"{api}/api/v1/sync/episodes/summary", headers=headers, timeout=10)
                .json()["counts"]
                .get("synced", 0)
            )
            verdicts = sum(n for s, n in counts.items() if s in VERDICTS)
            if verdicts == expected and synced == counts.get("auto_approved", 0):
                return counts, synced
            return None

        deadline = time.monotonic() + 300
        outcome = None
        while outcome is None and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            outcome = settled()
            if outcome is None:
                time.sleep(1)
        assert outcome is not None, f"episodes did not settle: {settled.__name__} timed out"
        counts, synced = outcome
        assert counts.get("auto_approved", 0) > 0, counts
        assert synced == counts["auto_approved"]

        # The Dagster UI shows the QA and sync runs that did it (a run finishes a moment
        # after its last episode is recorded).
        def succeeded_jobs() -> set[str]:
            runs = httpx.post(
                f"http://127.0.0.1:{ports['dagster']}/graphql", json={"query": RUNS}, timeout=30
            ).json()["data"]["runsOrError"]["results"]
            return {run["jobName"] for run in runs}

        deadline = time.monotonic() + 120
        while not {"qa_batch", "sync_batch"} <= succeeded_jobs():
            assert time.monotonic() < deadline, f"runs in the Dagster UI: {succeeded_jobs()}"
            time.sleep(1)

        # And the reference cloud receiver holds the synced copies.
        receiver = httpx.get(f"http://127.0.0.1:{ports['receiver']}/health", timeout=10)
        assert receiver.status_code == 200
    finally:
        if process.poll() is None:
            stop_and_check_children(process)
