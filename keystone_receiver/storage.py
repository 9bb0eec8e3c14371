"""The receiver's bucket: presigned URLs, multipart bookkeeping, sizes and streamed SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from keystone_receiver.errors import ObjectStoreUnavailable
from keystone_receiver.settings import ReceiverSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType

DEFAULT_REGION = "us-east-1"
HASH_CHUNK_BYTES = 1024 * 1024
# The data client streams multi-GB objects: a short connect timeout finds a dead store fast,
# the read timeout bounds one stalled read, and "standard" retries absorb 503 SlowDown.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 5
MAX_POOL_CONNECTIONS = 32
# Health answers a load balancer: one attempt, at most ~3 s.
PROBE_CONNECT_TIMEOUT_S = 1.0
PROBE_READ_TIMEOUT_S = 2.0

_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})
_BUCKET_EXISTS = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
_MISSING_OBJECT = frozenset({"404", "NoSuchKey", "NotFound"})
_MISSING_UPLOAD = frozenset({"NoSuchUpload"})
_REJECTED_PARTS = frozenset({"InvalidPart", "InvalidPartOrder", "EntityTooSmall"})


@dataclass(frozen=True)
class StoredPart:
    part_number: int
    size: int
    etag: str
    last_modified: datetime


def _config(*, probe: bool) -> Config:
    return Config(
        signature_version="s3v4",
        # SeaweedFS and MinIO on a bare host:port cannot serve virtual-hosted bucket names.
        s3={"addressing_style": "path"},
        connect_timeout=PROBE_CONNECT_TIMEOUT_S if probe else CONNECT_TIMEOUT_S,
        read_timeout=PROBE_READ_TIMEOUT_S if probe else READ_TIMEOUT_S,
        retries={"total_max_attempts": 1 if probe else MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=MAX_POOL_CONNECTIONS,
        tcp_keepalive=True,
        # boto3 >= 1.36 adds CRC trailers and expects CRC headers by default; S3-compatible
        # stores do not all support them, and a presigned URL must not demand one of senders.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def create_s3_client(
    settings: ReceiverSettings, *, endpoint_url: str | None, probe: bool = False
) -> S3Client:
    """The one way the receiver builds an S3 client."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=(
            settings.s3_access_key.get_secret_value() if settings.s3_access_key else None
        ),
        aws_secret_access_key=(
            settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        ),
        config=_config(probe=probe),
    )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def _store_errors(action: str) -> Iterator[None]:
    """Turn what the store says into a 503 the sender retries, never a 500."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        message = " ".join(str(error.get("Message") or "").split())
        raise ObjectStoreUnavailable(
            f"object store refused to {action}: {error.get('Code') or 'error'} {message}".strip()
        ) from None
    except BotoCoreError as exc:
        raise ObjectStoreUnavailable(f"object store unreachable ({action}): {exc}") from None


class ReceiverStore:
    """The bucket received episodes live in. Thread-safe: boto3 clients are."""

    def __init__(self, settings: ReceiverSettings) -> None:
        self.bucket = settings.bucket
        self.presign_expires_s = settings.presign_expires_s
        self._client = create_s3_client(settings, endpoint_url=settings.s3_endpoint_url)
        self._probe = create_s3_client(settings, endpoint_url=settings.s3_endpoint_url, probe=True)
        # Signing needs no network: this client only builds URLs for the host senders reach.
        self._signer = create_s3_client(settings, endpoint_url=settings.presign_endpoint_url)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; HEAD first so ops-provisioned buckets pass."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING_BUCKET:
                raise ObjectStoreUnavailable(
                    f"bucket {self.bucket!r} is not usable: {_code(exc)}"
                ) from None
        except BotoCoreError as exc:
            raise ObjectStoreUnavailable(f"object store unreachable: {exc}") from None
        region = self._client.meta.region_name
        try:
            if region and region != DEFAULT_REGION:
                location = cast("BucketLocationConstraintType", region)
                self._client.create_bucket(
                    Bucket=self.bucket, CreateBucketConfiguration={"LocationConstraint": location}
                )
            else:
                self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _BUCKET_EXISTS:
                raise ObjectStoreUnavailable(
                    f"cannot create bucket {self.bucket!r}: {_code(exc)}"
                ) from None
        except BotoCoreError as exc:
            raise ObjectStoreUnavailable(f"object store unreachable: {exc}") from None

    def check(self) -> None:
        """Return if the bucket answers (one attempt, ~3 s at most), else raise."""
        with _store_errors("open the bucket"):
            self._probe.head_bucket(Bucket=self.bucket)

    def presign_put(self, key: str) -> str:
        return self._signer.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.presign_expires_s,
        )

    def presign_part(self, key: str, upload_id: str, part_number: int) -> str:
        return self._signer.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": part_number,
            },
            ExpiresIn=self.presign_expires_s,
        )

    def create_multipart(self, key: str) -> str:
        with _store_errors("start a multipart upload"):
            return self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def stored_parts(
        self, key: str, upload_id: str, sizes: Mapping[int, int]
    ) -> dict[int, StoredPart] | None:
        """The parts of ``upload_id`` stored with the expected size (``sizes``: number → bytes).

        ``None`` when the upload no longer exists (completed or aborted). A part uploaded twice
        can be listed twice (SeaweedFS keeps both); the newest one of the right size counts.
        """
        found: dict[int, StoredPart] = {}
        marker = 0
        with _store_errors("list parts"):
            while True:
                try:
                    page = self._client.list_parts(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
                    )
                except ClientError as exc:
                    if _code(exc) in _MISSING_UPLOAD:
                        return None
                    raise
                for item in page.get("Parts", []):
                    number, size = item.get("PartNumber", 0), item.get("Size", -1)
                    if sizes.get(number) != size:
                        continue
                    part = StoredPart(
                        part_number=number,
                        size=size,
                        etag=item.get("ETag", ""),
                        last_modified=item.get("LastModified", datetime.min.replace(tzinfo=UTC)),
                    )
                    earlier = found.get(number)
                    if earlier is None or part.last_modified >= earlier.last_modified:
                        found[number] = part
                next_marker = page.get("NextPartNumberMarker", 0)
                if not page.get("IsTruncated") or next_marker <= marker:
                    return found
                marker = next_marker

    def complete_multipart(
        self, key: str, upload_id: str, parts: list[StoredPart]
    ) -> Literal["assembled", "gone", "rejected"]:
        """Assemble the object from ``parts``.

        ``gone``: the upload no longer exists (assembled by a concurrent call, or aborted).
        ``rejected``: the store refuses these parts (e.g. an ETag it no longer knows); the
        upload cannot be completed and must start over.
        """
        with _store_errors("complete a multipart upload"):
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={
                        "Parts": [{"PartNumber": p.part_number, "ETag": p.etag} for p in parts]
                    },
                )
            except ClientError as exc:
                if _code(exc) in _MISSING_UPLOAD:
                    return "gone"
                if _code(exc) in _REJECTED_PARTS:
                    return "rejected"
                raise
        return "assembled"

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with _store_errors("abort a multipart upload"):
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if _code(exc) not in _MISSING_UPLOAD:
                    raise

    def size_of(self, key: str) -> int | None:
        """The stored object's size, ``None`` if there is none."""
        with _store_errors("read object metadata"):
            try:
                return self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            except ClientError as exc:
                if _code(exc) in _MISSING_OBJECT:
                    return None
                raise

    def sha256_of(self, key: str) -> tuple[str, int] | None:
        """Stream the object through SHA-256: ``(hex digest, bytes read)``, ``None`` if gone."""
        digest = hashlib.sha256()
        read = 0
        with _store_errors("read an object"):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as exc:
                if _code(exc) in _MISSING_OBJECT:
                    return None
                raise
            try:
                for chunk in body.iter_chunks(HASH_CHUNK_BYTES):
                    digest.update(chunk)
                    read += len(chunk)
            finally:
                body.close()
        return digest.hexdigest(), read

    def delete(self, key: str) -> None:
        with _store_errors("delete an object"):
            self._client.delete_object(Bucket=self.bucket, Key=key)
