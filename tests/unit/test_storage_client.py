"""The S3 client factory, ensure_bucket and the object-store health check (moto, stubs)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from moto import mock_aws

from keystone_core.errors import DependencyUnavailable
from keystone_core.settings import Settings, load_settings
from keystone_core.storage import (
    check_object_store,
    create_s3_client,
    create_s3_client_for_endpoint,
    ensure_bucket,
)
from keystone_core.storage.client import HEALTH_CONNECT_TIMEOUT_S, HEALTH_READ_TIMEOUT_S

ACCESS_KEY = "AKIAKEYSTONETEST0001"
SECRET_KEY = "unit-test-secret-key-0123456789"
# A refused connection must not be retried: well under one health budget.
HEALTH_BUDGET_S = HEALTH_CONNECT_TIMEOUT_S + HEALTH_READ_TIMEOUT_S


def s3_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": "test",
        "s3_access_key": ACCESS_KEY,
        "s3_secret_key": SECRET_KEY,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def bucket_names(settings: Settings) -> list[str]:
    return [b["Name"] for b in create_s3_client(settings).list_buckets()["Buckets"]]


def test_presigned_urls_are_path_style_sigv4_with_the_configured_key() -> None:
    settings = s3_settings(s3_endpoint_url="http://127.0.0.1:8333")
    url = create_s3_client(settings).generate_presigned_url(
        "get_object", Params={"Bucket": "edge-7", "Key": "7/robot-1/2024-01-01/task.mcap"}
    )
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}" == "http://127.0.0.1:8333"
    assert parts.path == "/edge-7/7/robot-1/2024-01-01/task.mcap"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Credential"][0].startswith(f"{ACCESS_KEY}/")
    assert "/us-east-1/s3/" in query["X-Amz-Credential"][0]


def test_ensure_bucket_creates_once_and_is_idempotent(aws: None) -> None:
    settings = s3_settings()
    client = create_s3_client(settings)
    ensure_bucket(client, "edge-1")
    ensure_bucket(client, "edge-1")
    assert bucket_names(settings) == ["edge-1"]


def test_ensure_bucket_accepts_a_bucket_someone_else_created(aws: None) -> None:
    settings = s3_settings()
    create_s3_client(settings).create_bucket(Bucket="edge-2")
    ensure_bucket(create_s3_client(settings), "edge-2")
    assert bucket_names(settings) == ["edge-2"]


def test_ensure_bucket_outside_us_east_1_sets_the_location(aws: None) -> None:
    settings = s3_settings(s3_region="eu-central-1")
    client = create_s3_client(settings)
    ensure_bucket(client, "edge-3")
    ensure_bucket(client, "edge-3")
    assert client.get_bucket_location(Bucket="edge-3")["LocationConstraint"] == "eu-central-1"


def test_ensure_bucket_treats_a_lost_create_race_as_success() -> None:
    client = create_s3_client(s3_settings(s3_endpoint_url="http://127.0.0.1:8333"))
    with Stubber(client) as stub:
        stub.add_client_error("head_bucket", "404", http_status_code=404)
        stub.add_client_error("create_bucket", "BucketAlreadyOwnedByYou", http_status_code=409)
        ensure_bucket(client, "edge-4")
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("head_error", "create_error"),
    [("403", None), ("404", "AccessDenied")],
    ids=["head-forbidden", "create-forbidden"],
)
def test_ensure_bucket_does_not_hide_permission_errors(
    head_error: str, create_error: str | None
) -> None:
    client = create_s3_client(s3_settings(s3_endpoint_url="http://127.0.0.1:8333"))
    with Stubber(client) as stub:
        stub.add_client_error("head_bucket", head_error, http_status_code=int(head_error))
        if create_error is not None:
            stub.add_client_error("create_bucket", create_error, http_status_code=403)
        with pytest.raises(ClientError):
            ensure_bucket(client, "edge-5")


def test_check_object_store_passes_when_the_store_answers(aws: None) -> None:
    check_object_store(create_s3_client(s3_settings(), health=True))


def test_check_object_store_reports_a_refusal_in_one_line() -> None:
    client = create_s3_client(s3_settings(s3_endpoint_url="http://127.0.0.1:8333"), health=True)
    with Stubber(client) as stub:
        stub.add_client_error(
            "list_buckets",
            "InvalidAccessKeyId",
            "The access key ID you provided\ndoes not exist.",
            http_status_code=403,
        )
        with pytest.raises(DependencyUnavailable) as caught:
            check_object_store(client)
    assert caught.value.message == (
        "object store refused: InvalidAccessKeyId The access key ID you provided does not exist."
    )
    assert caught.value.code == "dependency_unavailable"


def test_check_object_store_fails_fast_on_a_closed_port() -> None:
    client = create_s3_client(s3_settings(s3_endpoint_url="http://127.0.0.1:1"), health=True)
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable, match=r"^object store unreachable: ") as caught:
        check_object_store(client)
    assert time.monotonic() - started < HEALTH_BUDGET_S
    assert "\n" not in caught.value.message


def test_ensure_bucket_on_a_closed_port_is_dependency_unavailable() -> None:
    client = create_s3_client(s3_settings(s3_endpoint_url="http://127.0.0.1:1"), health=True)
    with pytest.raises(DependencyUnavailable, match="unreachable"):
        ensure_bucket(client, "edge-6")


def test_check_object_store_gives_up_on_a_silent_store_within_the_health_budget() -> None:
    # The kernel completes the handshake for a listening socket nobody accepts on: the
    # request goes out and no answer ever comes, like a wedged store.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = create_s3_client_for_endpoint(
            f"http://127.0.0.1:{port}", access_key=ACCESS_KEY, secret_key=SECRET_KEY, health=True
        )
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable, match="unreachable"):
            check_object_store(client)
        elapsed = time.monotonic() - started
    assert HEALTH_READ_TIMEOUT_S <= elapsed < HEALTH_BUDGET_S + 0.5
