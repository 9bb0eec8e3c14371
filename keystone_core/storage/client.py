"""The one object-store client factory (boto3, path-style, SigV4) and cheap checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from keystone_core.errors import DependencyUnavailable
from keystone_core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def create_s3_client(settings: Settings, *, health: bool = False) -> S3Client:
    """A client for the configured store. ``health=True``: short timeouts, no retries."""
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=2 if health else 5,
        read_timeout=3 if health else 60,
        retries={"max_attempts": 1 if health else 5, "mode": "standard"},
        max_pool_connections=32,
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=(
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
        ),
        aws_secret_access_key=(
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        ),
        config=config,
    )


def ensure_bucket(client: S3Client, name: str) -> None:
    """Create ``name`` unless it exists already (safe to call on every start)."""
    try:
        client.head_bucket(Bucket=name)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise


def check_object_store(client: S3Client) -> None:
    """Raise DependencyUnavailable with a one-line reason when the store does not answer."""
    try:
        client.list_buckets()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise DependencyUnavailable(
            f"object store refused: {error.get('Code', '?')} {error.get('Message', '')}".strip()
        ) from None
    except BotoCoreError as exc:
        raise DependencyUnavailable(f"object store unreachable: {exc}") from None
