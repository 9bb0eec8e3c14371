"""The embedded SeaweedFS server (`weed mini`) and the S3 client against a real store."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import pytest

from keystone_core.errors import ConfigurationError, DependencyUnavailable
from keystone_core.settings import Settings, load_settings
from keystone_core.storage import (
    EmbeddedS3Error,
    EmbeddedS3Server,
    check_object_store,
    create_s3_client,
    ensure_bucket,
    free_tcp_ports,
)
from keystone_core.storage import embedded as embedded_module
from keystone_core.storage.client import HEALTH_CONNECT_TIMEOUT_S, HEALTH_READ_TIMEOUT_S
from keystone_core.storage.embedded import WEED_GRPC_SOCKET
from tests.support.s3 import s3_settings_overrides, start_test_s3_server

HEALTH_BUDGET_S = HEALTH_CONNECT_TIMEOUT_S + HEALTH_READ_TIMEOUT_S
STOP_BUDGET_S = 10.0


def settings_for(server: EmbeddedS3Server, **overrides: object) -> Settings:
    return load_settings(env="test", **{**s3_settings_overrides(server), **overrides})


def all_ports(server: EmbeddedS3Server) -> set[int]:
    return {*astuple(server.ports), server.ports.admin_grpc}


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (TIME_WAIT left by closed connections does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A port someone else holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3Server]:
    s3 = start_test_s3_server(tmp_path_factory.mktemp("s3"))
    yield s3
    s3.stop()


# --- without a server ----------------------------------------------------------------------


def test_free_tcp_ports_are_distinct_and_free() -> None:
    ports = free_tcp_ports(12)
    assert len(set(ports)) == 12
    assert all(port_is_free(port) for port in ports)


def test_an_admin_port_without_room_for_its_grpc_port_is_refused(tmp_path: Path) -> None:
    server = EmbeddedS3Server(tmp_path, access_key="AK", secret_key="SK", admin_port=60000)
    with pytest.raises(ConfigurationError, match="admin port 60000"):
        server.start()
    assert not server.log_path.exists()


def test_the_endpoint_is_unknown_before_start(tmp_path: Path) -> None:
    server = EmbeddedS3Server(tmp_path, access_key="AK", secret_key="SK")
    with pytest.raises(RuntimeError, match="not been started"):
        _ = server.endpoint_url
    server.stop()  # stopping a server that never ran is harmless


# --- against real servers --------------------------------------------------------------------


@pytest.mark.integration
def test_objects_round_trip_through_the_client_factory(server: EmbeddedS3Server) -> None:
    settings = settings_for(server)
    client = create_s3_client(settings)
    bucket = settings.bucket_for_factory("7")
    ensure_bucket(client, bucket)
    ensure_bucket(client, bucket)
    body = b"\x89MCAP0\r\n" + bytes(range(256)) * 64
    digest = hashlib.sha256(body).hexdigest()
    key = "7/robot-1/2024-05-01/task-1.mcap"

    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"checksum-sha256": digest})

    got = client.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == body
    assert got["Metadata"] == {"checksum-sha256": digest}
    assert [b["Name"] for b in client.list_buckets()["Buckets"]].count(bucket) == 1
    check_object_store(create_s3_client(settings, health=True))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("access_key", "secret_key"),
    [("WRONGKEY0000000000", None), (None, "wrong-secret")],
    ids=["unknown-access-key", "wrong-secret"],
)
def test_the_server_refuses_other_credentials(
    server: EmbeddedS3Server, access_key: str | None, secret_key: str | None
) -> None:
    settings = settings_for(
        server,
        s3_access_key=access_key or server.access_key,
        s3_secret_key=secret_key or server.secret_key,
    )
    with pytest.raises(DependencyUnavailable, match=r"^object store refused: "):
        check_object_store(create_s3_client(settings, health=True))


@pytest.mark.integration
def test_after_stop_the_ports_are_free_and_the_health_check_fails_fast(tmp_path: Path) -> None:
    server = start_test_s3_server(tmp_path)
    health_client = create_s3_client(settings_for(server), health=True)
    check_object_store(health_client)
    ports = server.ports

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < STOP_BUDGET_S
    assert all(port_is_free(port) for port in (ports.s3, ports.master, ports.filer, ports.admin))

    started = time.monotonic()
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        check_object_store(health_client)
    assert time.monotonic() - started < HEALTH_BUDGET_S
    server.stop()  # a second stop is harmless


@pytest.mark.integration
def test_a_wedged_server_is_killed_and_its_sockets_removed(tmp_path: Path) -> None:
    server = start_test_s3_server(tmp_path)
    ports = server.ports
    pid = server.pid
    assert pid is not None
    grpc_sockets = [
        Path(WEED_GRPC_SOCKET.format(component=component, port=port))
        for component, port in ports.grpc_by_component().items()
    ]
    assert all(path.exists() for path in grpc_sockets)
    os.kill(pid, signal.SIGSTOP)  # wedged: SIGTERM stays pending, only SIGKILL ends it

    started = time.monotonic()
    server.stop(timeout=0.5)

    assert time.monotonic() - started < STOP_BUDGET_S
    assert server.pid is None
    assert port_is_free(ports.s3)
    assert not any(path.exists() for path in grpc_sockets)


@pytest.mark.integration
def test_two_servers_run_side_by_side(tmp_path: Path) -> None:
    # The second data dir is too long for unix socket paths: its sockets go to a temp dir.
    long_dir = tmp_path / ("deeply-nested-" * 8) / "s3"
    with (
        EmbeddedS3Server(tmp_path / "a", access_key="AKSIDEA", secret_key="secret-a-1234") as a,
        EmbeddedS3Server(long_dir, access_key="AKSIDEB", secret_key="secret-b-1234") as b,
    ):
        assert not all_ports(a) & all_ports(b)
        client_a = create_s3_client(settings_for(a))
        client_b = create_s3_client(settings_for(b))
        ensure_bucket(client_a, "edge-a")
        ensure_bucket(client_b, "edge-b")
        assert [x["Name"] for x in client_a.list_buckets()["Buckets"]] == ["edge-a"]
        assert [x["Name"] for x in client_b.list_buckets()["Buckets"]] == ["edge-b"]
    assert "S3 Endpoint" in b.log_path.read_text()


@pytest.mark.integration
def test_objects_and_credentials_survive_a_restart(tmp_path: Path) -> None:
    access_key, secret_key = "restart-ak", "restart-secret-key-0123456789"
    with EmbeddedS3Server(tmp_path / "s3", access_key, secret_key) as first:
        client = create_s3_client(settings_for(first))
        ensure_bucket(client, "edge-1")
        client.put_object(Bucket="edge-1", Key="1/robot/2024-05-01/a.json", Body=b"{}")

    with EmbeddedS3Server(tmp_path / "s3", access_key, secret_key) as second:
        client = create_s3_client(settings_for(second))
        got = client.get_object(Bucket="edge-1", Key="1/robot/2024-05-01/a.json")
        assert got["Body"].read() == b"{}"


@pytest.mark.integration
def test_a_picked_port_taken_before_weed_binds_it_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening_socket: socket.socket
) -> None:
    busy = int(listening_socket.getsockname()[1])
    real_free_tcp_ports = embedded_module.free_tcp_ports
    calls = 0

    def first_pick_includes_a_busy_port(count: int, host: str = "127.0.0.1") -> list[int]:
        nonlocal calls
        calls += 1
        ports = real_free_tcp_ports(count, host)
        # The first port goes to S3: an HTTP port, which weed does not replace on its own.
        return [busy, *ports[1:]] if calls == 1 else ports

    monkeypatch.setattr(embedded_module, "free_tcp_ports", first_pick_includes_a_busy_port)
    with EmbeddedS3Server(tmp_path, access_key="AKRETRY", secret_key="secret-retry") as server:
        assert busy not in all_ports(server)
        check_object_store(create_s3_client(settings_for(server), health=True))
    assert f"Port allocation failed: port {busy} for S3" in server.log_path.read_text()


@pytest.mark.integration
def test_a_configured_port_in_use_fails_at_once_with_the_log_tail(
    tmp_path: Path, listening_socket: socket.socket
) -> None:
    busy = int(listening_socket.getsockname()[1])
    server = EmbeddedS3Server(tmp_path, access_key="AKBUSY", secret_key="secret", s3_port=busy)
    with pytest.raises(EmbeddedS3Error) as caught:
        server.start()
    assert "weed mini exited with code" in caught.value.message
    assert f"port {busy} for S3" in caught.value.message
    assert server.log_path.read_text().count("Port allocation failed") == 1  # no retries


@pytest.mark.integration
def test_a_server_that_is_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    server = EmbeddedS3Server(tmp_path, access_key="AKSLOW", secret_key="secret-slow")
    with pytest.raises(EmbeddedS3Error, match=re.escape("not ready after 0.01s")):
        server.start(timeout=0.01)
    ports = server.ports
    assert port_is_free(ports.master)
    assert port_is_free(ports.s3)
