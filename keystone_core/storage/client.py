"""The one object-store client factory (boto3, path-style, SigV4) and cheap store checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from keystone_core.errors import DependencyUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType

    from keystone_core.settings import Settings

DEFAULT_REGION = "us-east-1"

# Health probes answer a load balancer: one attempt, and a dead or black-holed store costs at
# most connect + read = 3 s instead of minutes of retries.
HEALTH_CONNECT_TIMEOUT_S = 1.0
HEALTH_READ_TIMEOUT_S = 2.0

# Data-plane calls stream multi-GB episodes from a store on the factory LAN: a short connect
# timeout finds a dead store quickly, the read timeout only bounds one stalled socket read,
# and "standard" retries absorb the 503 SlowDown / connection resets busy stores produce.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 5
# Dagster ops hash and copy objects from thread pools; botocore's default of 10 would queue.
MAX_POOL_CONNECTIONS = 32

_MISSING_BUCKET_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})
_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


def _client_config(*, health: bool) -> Config:
    return Config(
        signature_version="s3v4",
        # SeaweedFS and MinIO on a bare IP:port cannot serve virtual-hosted bucket names.
        s3={"addressing_style": "path"},
        connect_timeout=HEALTH_CONNECT_TIMEOUT_S if health else CONNECT_TIMEOUT_S,
        read_timeout=HEALTH_READ_TIMEOUT_S if health else READ_TIMEOUT_S,
        # total_max_attempts counts the first request; botocore's "max_attempts" key counts
        # only retries, so max_attempts=1 would still mean two attempts.
        retries={"total_max_attempts": 1 if health else MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        tcp_keepalive=True,
        # boto3 >= 1.36 adds CRC trailers to every upload by default; S3-compatible stores
        # do not all accept them, and our integrity check is the SHA-256 in the metadata.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def create_s3_client_for_endpoint(
    endpoint_url: str | None,
    *,
    access_key: str | None,
    secret_key: str | None,
    region: str = DEFAULT_REGION,
    health: bool = False,
) -> S3Client:
    """A client for one endpoint; ``None`` endpoint and keys mean AWS's defaults.

    Everything that talks S3 comes through here so timeouts, retries and addressing are the
    same everywhere. Code holding :class:`Settings` calls :func:`create_s3_client`; this form
    exists for callers that know an endpoint before any settings exist (the embedded server
    probing itself while it starts).
    """
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=_client_config(health=health),
    )


def create_s3_client(settings: Settings, *, health: bool = False) -> S3Client:
    """The configured store's client. ``health=True``: one attempt and ~3 s at most.

    Use a separate ``health=True`` client for readiness probes: the ordinary client retries
    and waits long enough for multi-GB transfers, which is wrong for a probe.
    """
    return create_s3_client_for_endpoint(
        settings.s3_endpoint_url,
        access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        region=settings.s3_region,
        health=health,
    )


def create_presign_client(settings: Settings) -> S3Client:
    """A client that signs links for browsers: for ``s3_public_endpoint_url`` when the
    store is reached at another address from outside (a reverse proxy, a public name),
    else for the store's own endpoint. Presigning is local: this client never connects."""
    return create_s3_client_for_endpoint(
        settings.s3_public_endpoint_url or settings.s3_endpoint_url,
        access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        region=settings.s3_region,
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def ensure_bucket(client: S3Client, name: str) -> None:
    """Create bucket ``name`` unless it exists already; safe to call on every start.

    HEAD first, so credentials without ``s3:CreateBucket`` (buckets provisioned by ops) still
    pass when the bucket is there. A lost create race with another starting process counts
    as success.
    """
    try:
        client.head_bucket(Bucket=name)
        return
    except ClientError as exc:
        if _error_code(exc) not in _MISSING_BUCKET_CODES:
            raise
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"object store unreachable: {exc}") from None
    region = client.meta.region_name
    try:
        if region and region != DEFAULT_REGION:
            # Outside us-east-1 AWS rejects a create without the matching location; the
            # region is whatever the operator configured, not one of the stubs' literals.
            location = cast("BucketLocationConstraintType", region)
            client.create_bucket(
                Bucket=name, CreateBucketConfiguration={"LocationConstraint": location}
            )
        else:
            client.create_bucket(Bucket=name)
    except ClientError as exc:
        if _error_code(exc) not in _BUCKET_EXISTS_CODES:
            raise
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"object store unreachable: {exc}") from None


def check_object_store(client: S3Client) -> None:
    """Return if the store answers an authenticated request, else raise DependencyUnavailable.

    ``list_buckets`` is the cheapest call that needs no bucket name and proves both that the
    store is reachable and that it accepts our credentials. How long a dead store takes to
    report depends on the client: pass one made with ``health=True``.
    """
    try:
        client.list_buckets()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code") or "error"
        message = " ".join(str(error.get("Message") or "").split())
        raise DependencyUnavailable(f"object store refused: {code} {message}".strip()) from None
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"object store unreachable: {exc}") from None
