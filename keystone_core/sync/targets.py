"""Cloud targets: another S3 bucket (default) or a cloud receiver speaking docs/sync.md.

A target pushes one :class:`Shipment` and answers a :class:`Receipt` only when the copy is
complete and verified; anything else raises :class:`SyncFailure`. Pushes are resumable:
``progress`` (persisted on the job row through ``checkpoint``) carries multipart upload ids
and the receiver's session, so a retried or recovered job sends only what is missing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from keystone_core import clock
from keystone_core.errors import DependencyUnavailable
from keystone_core.storage.client import create_s3_client_for_endpoint, ensure_bucket
from keystone_core.sync.transfer import MIB, Part, Shipment, SyncFailure, SyncObject, split, stream

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

    from keystone_core.settings import Settings

CHECKSUM_META = "checksum-sha256"
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
Checkpoint = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Receipt:
    """A verified copy: when the target says it completed, where, and what we sent now
    (``duplicate``: the target already had the complete episode; nothing was sent)."""

    synced_at: dt.datetime
    destination: str
    bytes_sent: int
    duplicate: bool
    remote_session: str | None = None


class Target(Protocol):
    kind: str

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    def push(
        self,
        shipment: Shipment,
        source: S3Client,
        progress: dict[str, Any],
        checkpoint: Checkpoint,
    ) -> Receipt: ...


# --- S3 ----------------------------------------------------------------------------------


class S3Target:
    """Objects land at ``{prefix}{factory}/{device}/{date}/{episode_id}/{name}``, each with
    its SHA-256 in ``x-amz-meta-checksum-sha256``. An object already there with the same
    size and checksum is not sent again, so a repeated push is a no-op."""

    kind = "s3"

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        *,
        prefix: str = "",
        part_size: int = 16 * MIB,
        workers: int = 4,
        endpoint: str | None = None,
    ):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = part_size
        self.workers = workers
        self.endpoint = endpoint
        self._bucket_ready = False

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.kind,
            "endpoint": self.endpoint or "",
            "bucket": self.bucket,
            "prefix": self.prefix,
        }

    def close(self) -> None:
        """Nothing to release (the client's pool is shared)."""

    def folder(self, shipment: Shipment) -> str:
        return (
            f"{self.prefix}{shipment.factory}/{shipment.device_id}/"
            f"{shipment.recording_date.isoformat()}/{shipment.episode_id}/"
        )

    def push(
        self,
        shipment: Shipment,
        source: S3Client,
        progress: dict[str, Any],
        checkpoint: Checkpoint,
    ) -> Receipt:
        try:
            if not self._bucket_ready:
                ensure_bucket(self.client, self.bucket)
                self._bucket_ready = True
            folder = self.folder(shipment)
            sent = 0
            for obj in shipment.objects:
                sent += self._put(obj, folder + obj.name, source, progress, checkpoint)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise SyncFailure(
                f"target store refused: {error.get('Code', '')} {error.get('Message', '')}".strip(),
                retryable=status is None or status >= 500 or status in (408, 429),
                http_status=status,
            ) from None
        except (BotoCoreError, DependencyUnavailable) as exc:
            raise SyncFailure(f"target store unreachable: {exc}", retryable=True) from None
        return Receipt(
            synced_at=clock.now(),
            destination=f"s3://{self.bucket}/{folder}",
            bytes_sent=sent,
            duplicate=sent == 0,
        )

    def _present(self, key: str, obj: SyncObject) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in {
                "404",
                "NoSuchKey",
                "NotFound",
            }:
                return False
            raise
        return (
            head.get("ContentLength") == obj.size
            and head.get("Metadata", {}).get(CHECKSUM_META) == obj.sha256
        )

    def _put(
        self,
        obj: SyncObject,
        key: str,
        source: S3Client,
        progress: dict[str, Any],
        checkpoint: Checkpoint,
    ) -> int:
        if self._present(key, obj):
            return 0
        metadata = {CHECKSUM_META: obj.sha256}
        if obj.size <= self.part_size:
            streamed = stream(
                obj,
                source,
                split(obj.size, self.part_size),
                lambda _part, data: self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, Metadata=metadata
                ),
                workers=1,
            )
            self._check_landed(key, obj)
            return streamed.bytes_sent
        uploads: dict[str, Any] = progress.setdefault("multipart", {})
        upload_id, done = self._resume(uploads.get(obj.name), key)
        if upload_id is None:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=metadata
            )["UploadId"]
            uploads[obj.name] = {"upload_id": upload_id, "key": key}
            checkpoint(progress)
        parts = split(obj.size, self.part_size)
        sizes = {p.number: p.length for p in parts}
        skip = {n for n, (size, _etag) in done.items() if sizes.get(n) == size}

        def send(part: Part, data: bytes) -> str:
            answer = self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part.number, Body=data
            )
            return answer["ETag"]

        try:
            streamed = stream(obj, source, parts, send, skip=skip, workers=self.workers)
        except SyncFailure as exc:
            if not exc.retryable:  # the parts can never be completed: drop them
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                uploads.pop(obj.name, None)
                checkpoint(progress)
            raise
        etags = {n: done[n][1] for n in skip} | streamed.results
        completed: list[CompletedPartTypeDef] = [
            {"PartNumber": p.number, "ETag": etags[p.number]} for p in parts
        ]
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": completed}
        )
        uploads.pop(obj.name, None)
        checkpoint(progress)
        self._check_landed(key, obj)
        return streamed.bytes_sent

    def _resume(self, saved: Any, key: str) -> tuple[str | None, dict[int, tuple[int, str]]]:
        """The saved multipart upload and its stored parts, or (None, {}) to start over."""
        if not isinstance(saved, dict) or saved.get("key") != key or not saved.get("upload_id"):
            return None, {}
        upload_id = str(saved["upload_id"])
        done: dict[int, tuple[int, str]] = {}
        marker = 0
        try:
            while True:
                page = self.client.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
                )
                for part in page.get("Parts", []):
                    done[int(part["PartNumber"])] = (int(part["Size"]), str(part["ETag"]))
                if not page.get("IsTruncated"):
                    break
                marker = int(page.get("NextPartNumberMarker", 0))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in {"NoSuchUpload", "404"}:
                return None, {}
            raise
        return upload_id, done

    def _check_landed(self, key: str, obj: SyncObject) -> None:
        if not self._present(key, obj):
            raise SyncFailure(
                f"{obj.name}: the target does not show {obj.size} bytes with our checksum "
                "after the upload",
                retryable=True,
            )


# --- HTTP cloud receiver -------------------------------------------------------------------


class HttpTarget:
    """The cloud receiver protocol (docs/sync.md § Cloud receiver protocol)."""

    kind = "http"

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        workers: int = 4,
        client: httpx.Client | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.workers = workers
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        self.api = client or httpx.Client(
            headers=headers, timeout=timeout_s, limits=limits, follow_redirects=False
        )
        # Presigned URLs carry their own authorization: never send ours to the store.
        self.store = httpx.Client(timeout=timeout_s, limits=limits, follow_redirects=False)

    def describe(self) -> dict[str, Any]:
        return {"target": self.kind, "url": self.base_url}

    def close(self) -> None:
        self.api.close()
        self.store.close()

    def push(
        self,
        shipment: Shipment,
        source: S3Client,
        progress: dict[str, Any],
        checkpoint: Checkpoint,
    ) -> Receipt:
        manifest = {
            "episode_id": shipment.episode_id,
            "factory_id": shipment.factory,
            "device_id": shipment.device_id,
            "task_id": shipment.task_id,
            "objects": [
                {"name": o.name, "size": o.size, "sha256": o.sha256} for o in shipment.objects
            ],
            "metadata": shipment.metadata,
        }
        url = f"{self.base_url}/api/v1/sync/episode"
        answer = self._call("POST", url, manifest)
        destination = f"{url}/{shipment.episode_id}"
        if answer.status_code == 409 and "synced_at" in _json(answer):
            return self._receipt(answer, destination, 0, duplicate=True)
        if answer.status_code != 202:
            raise _refused("announce", answer)
        body = _json(answer)
        session = str(body.get("session", ""))
        if progress.get("session") != session:
            progress["session"] = session
            checkpoint(progress)
        objects = {o.name: o for o in shipment.objects}
        sent = 0
        for upload in body.get("uploads", []):
            obj = objects.get(str(upload.get("name")))
            if obj is None:
                raise SyncFailure(f"receiver asked for unknown object {upload!r}", retryable=False)
            if not upload.get("done"):
                sent += self._upload(obj, upload, source)
        # The receiver re-reads and hashes every object before it answers (~400 MiB/s on a
        # small host): allow for that on top of the request timeout.
        hashing_s = shipment.total_bytes / (100 * MIB)
        complete = self._call(
            "POST", f"{destination}/complete", {"session": session}, extra_timeout_s=hashing_s
        )
        if complete.status_code == 200:
            return self._receipt(complete, destination, sent, duplicate=False, session=session)
        raise _refused("complete", complete)

    def _upload(self, obj: SyncObject, upload: dict[str, Any], source: S3Client) -> int:
        if upload.get("url"):
            url = str(upload["url"])
            streamed = stream(
                obj, source, split(obj.size, max(obj.size, 1)), lambda _p, d: self._put(url, d)
            )
            return streamed.bytes_sent
        part_size = int(upload.get("part_size") or 0)
        offered = {int(p["part_number"]): p for p in upload.get("parts", [])}
        parts = split(obj.size, part_size) if part_size > 0 else []
        if not parts or set(offered) != {p.number for p in parts}:
            raise SyncFailure(
                f"{obj.name}: receiver's parts do not cover {obj.size} bytes", retryable=True
            )
        skip = {n for n, p in offered.items() if p.get("done")}
        streamed = stream(
            obj,
            source,
            parts,
            lambda part, data: self._put(str(offered[part.number]["url"]), data),
            skip=skip,
            workers=self.workers,
        )
        return streamed.bytes_sent

    def _put(self, url: str, data: bytes) -> None:
        try:
            answer = self.store.put(url, content=data)
        except httpx.HTTPError as exc:
            raise SyncFailure(
                f"upload failed: {type(exc).__name__}: {exc}", retryable=True
            ) from None
        if answer.status_code not in (200, 201, 204):
            raise SyncFailure(
                f"upload refused: HTTP {answer.status_code} {answer.text[:200]}",
                retryable=True,
                http_status=answer.status_code,
            )

    def _call(
        self, method: str, url: str, body: dict[str, Any], *, extra_timeout_s: float = 0.0
    ) -> httpx.Response:
        timeout = self.api.timeout
        if extra_timeout_s > 0:
            timeout = httpx.Timeout((timeout.read or 30.0) + extra_timeout_s)
        try:
            return self.api.request(method, url, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise SyncFailure(
                f"receiver unreachable: {type(exc).__name__}: {exc}", retryable=True
            ) from None

    @staticmethod
    def _receipt(
        answer: httpx.Response,
        destination: str,
        sent: int,
        *,
        duplicate: bool,
        session: str | None = None,
    ) -> Receipt:
        raw = _json(answer).get("synced_at")
        try:
            synced_at = clock.as_utc(dt.datetime.fromisoformat(str(raw)))
        except ValueError:
            raise SyncFailure(
                f"receiver answered {answer.status_code} without a valid synced_at ({raw!r})",
                retryable=True,
            ) from None
        return Receipt(synced_at, destination, sent, duplicate, session)


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _refused(step: str, answer: httpx.Response) -> SyncFailure:
    body = _json(answer)
    code = body.get("code", "")
    message = body.get("message", answer.text[:200])
    status = answer.status_code
    # 5xx, throttling and timeouts pass; a 409/422 from the receiver means "ask again /
    # re-upload" (its state moved on); other 4xx mean the request itself is wrong.
    retryable = status >= 500 or status in (404, 408, 409, 422, 429)
    return SyncFailure(
        f"receiver refused {step}: HTTP {status} {code} {message}".strip(),
        retryable=retryable,
        http_status=status,
    )


def describe_target(settings: Settings) -> dict[str, Any]:
    """Where the configured target points, without secrets (and without connecting)."""
    if settings.sync_target == "http":
        return {"target": "http", "url": settings.sync_http_url or ""}
    if settings.sync_target == "s3":
        return {
            "target": "s3",
            "endpoint": settings.sync_s3_endpoint_url or settings.s3_endpoint_url or "",
            "bucket": settings.sync_s3_bucket,
            "prefix": settings.sync_s3_prefix,
        }
    return {"target": "off"}


def build_target(settings: Settings) -> Target:
    """The configured target (``sync_target`` must not be ``off``)."""
    part_size = settings.sync_part_size_mib * MIB
    if settings.sync_target == "http":
        if not settings.sync_http_url:
            raise SyncFailure("KEYSTONE_SYNC_HTTP_URL is not set", retryable=False)
        token = settings.sync_http_token.get_secret_value() if settings.sync_http_token else None
        return HttpTarget(
            settings.sync_http_url,
            token,
            timeout_s=settings.sync_http_timeout_s,
            workers=settings.sync_part_workers,
        )
    if settings.sync_target != "s3":
        raise SyncFailure("cloud sync is off (KEYSTONE_SYNC_TARGET=off)", retryable=False)
    endpoint = settings.sync_s3_endpoint_url or settings.s3_endpoint_url
    own_keys = settings.sync_s3_access_key is not None
    access = settings.sync_s3_access_key if own_keys else settings.s3_access_key
    secret = settings.sync_s3_secret_key if own_keys else settings.s3_secret_key
    client = create_s3_client_for_endpoint(
        endpoint,
        access_key=access.get_secret_value() if access else None,
        secret_key=secret.get_secret_value() if secret else None,
        region=settings.sync_s3_region,
    )
    return S3Target(
        client,
        settings.sync_s3_bucket,
        prefix=settings.sync_s3_prefix,
        part_size=part_size,
        workers=settings.sync_part_workers,
        endpoint=endpoint,
    )
