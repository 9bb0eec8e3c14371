"""One object, streamed in parts from the edge store to wherever ``send`` puts them."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

MIB = 1024 * 1024
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class SyncFailure(Exception):
    """A push that did not finish. ``retryable``: the same push may succeed later (network,
    5xx, timeouts, the cloud asking for a re-upload); otherwise retrying cannot help
    (source object gone or changed, the cloud refusing the request)."""

    def __init__(self, message: str, *, retryable: bool, http_status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.http_status = http_status


@dataclass(frozen=True)
class SyncObject:
    """One object of a shipment: read from the edge store (``bucket``/``key``) or held in
    memory (``data``: the sidecar and the QA report, a few KiB)."""

    name: str
    size: int
    sha256: str
    bucket: str | None = None
    key: str | None = None
    data: bytes | None = None

    def read(self, source: S3Client, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        if self.data is not None:
            return self.data[offset : offset + length]
        assert self.bucket is not None
        assert self.key is not None
        body = read_edge(
            source, self.name, self.bucket, self.key, f"bytes={offset}-{offset + length - 1}"
        )
        if len(body) != length:
            raise SyncFailure(
                f"{self.name}: edge object is shorter than its recorded size {self.size}",
                retryable=False,
            )
        return body


def read_edge(
    source: S3Client,
    name: str,
    bucket: str,
    key: str,
    byte_range: str | None = None,
    *,
    max_bytes: int | None = None,
) -> bytes:
    """GET an edge object (or a range of it), store errors as :class:`SyncFailure`: a
    missing object cannot be retried, a refusing or unreachable store can."""
    try:
        if byte_range is None:
            response = source.get_object(Bucket=bucket, Key=key)
        else:
            response = source.get_object(Bucket=bucket, Key=key, Range=byte_range)
        if max_bytes is not None and int(response.get("ContentLength", 0)) > max_bytes:
            raise SyncFailure(f"{name}: larger than {max_bytes} bytes", retryable=False)
        return response["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise SyncFailure(
                f"{name}: edge object s3://{bucket}/{key} is gone", retryable=False
            ) from None
        raise SyncFailure(f"{name}: edge store refused: {code}", retryable=True) from None
    except BotoCoreError as exc:
        raise SyncFailure(f"{name}: edge store unreachable: {exc}", retryable=True) from None


@dataclass(frozen=True)
class Shipment:
    """What one sync job sends: the episode's identity and its objects."""

    episode_id: str
    factory: str
    device_id: str
    task_id: str
    recording_date: dt.date
    objects: tuple[SyncObject, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)


@dataclass(frozen=True)
class Part:
    number: int  # 1-based, as S3 counts
    offset: int
    length: int


def split(size: int, part_size: int) -> list[Part]:
    """Parts of an object of ``size`` bytes (one empty part for an empty object)."""
    if size <= 0:
        return [Part(1, 0, 0)]
    return [
        Part(i + 1, offset, min(part_size, size - offset))
        for i, offset in enumerate(range(0, size, part_size))
    ]


@dataclass
class Streamed:
    results: dict[int, Any]
    sha256: str
    bytes_sent: int


def stream(
    obj: SyncObject,
    source: S3Client,
    parts: list[Part],
    send: Callable[[Part, bytes], T],
    *,
    skip: Collection[int] = (),
    workers: int = 4,
) -> Streamed:
    """Read every part, ``send`` those not in ``skip``, ``workers`` at a time, and hash the
    whole object in order. At most ``workers + 1`` parts are held in memory. The hash must
    equal ``obj.sha256`` (the checksum verified when the upload landed) or the push stops:
    the edge object changed and sending it would spread a corrupt copy. A single-part
    object is checked before it is sent; parts of a multipart upload are invisible until
    the caller completes it, which it does only after this returns.
    """
    hasher = hashlib.sha256()
    results: dict[int, Any] = {}
    sent = 0

    whole = len(parts) == 1

    def work(part: Part) -> tuple[Part, bytes, Any]:
        data = obj.read(source, part.offset, part.length)
        if part.number in skip:
            return part, data, None
        if whole:  # a single PUT is visible at once: verify before it leaves
            _verify(obj, hashlib.sha256(data).hexdigest())
        return part, data, send(part, data)

    window: deque[Future[tuple[Part, bytes, Any]]] = deque()
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="sync-part")
    try:
        pending = iter(parts)
        for part in pending:
            window.append(pool.submit(work, part))
            if len(window) > workers:
                sent += _absorb(window.popleft(), hasher, results, skip)
        while window:
            sent += _absorb(window.popleft(), hasher, results, skip)
    finally:
        for future in window:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    digest = hasher.hexdigest()
    _verify(obj, digest)
    return Streamed(results, digest, sent)


def _verify(obj: SyncObject, digest: str) -> None:
    if digest != obj.sha256:
        raise SyncFailure(
            f"{obj.name}: SHA-256 of the edge object is {digest}, expected {obj.sha256} "
            "(the object changed after it was verified)",
            retryable=False,
        )


def _absorb(
    future: Future[tuple[Part, bytes, Any]],
    hasher: Any,
    results: dict[int, Any],
    skip: Collection[int],
) -> int:
    part, data, result = future.result()
    hasher.update(data)
    if part.number in skip:
        return 0
    results[part.number] = result
    return part.length
