"""Where QA reads an episode from: a local file or an S3 object, with byte accounting.

Both give positioned reads (``read_at``), batches of ranges (S3: fetched concurrently, so
the few hundred message-index ranges of a multi-GB file cost a handful of round trips) and
one sequential pass (``stream``) for the thorough tier. Every byte that crosses is
counted: the benchmark and each report say how much of the object was read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import urllib3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

STREAM_BLOCK = 8 * 1024 * 1024
# Ranges closer than this are fetched as one request.
COALESCE_GAP = 256 * 1024
S3_PARALLEL = 8


class SourceError(Exception):
    """The object cannot be read at all (missing, permission, network)."""


class Source(Protocol):
    name: str
    size: int
    bytes_read: int
    requests: int

    def read_at(self, offset: int, length: int) -> bytes: ...

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]: ...

    def stream(self) -> Iterator[bytes]: ...

    def sibling(self, suffix: str, max_bytes: int) -> bytes | None: ...

    def close(self) -> None: ...


def _count(source: LocalSource | S3Source, size: int, *, requests: int = 1) -> None:
    """Account one read (sources are read from several threads at once)."""
    with source._counting:
        source.requests += requests
        source.bytes_read += size


def _clamp(size: int, offset: int, length: int) -> tuple[int, int]:
    offset = max(0, min(offset, size))
    return offset, max(0, min(length, size - offset))


class LocalSource:
    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.path = path
        try:
            self._file = path.open("rb")
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise SourceError(f"cannot open {path}: {exc.strerror or exc}") from exc
        self.bytes_read = 0
        self._counting = threading.Lock()
        self.requests = 0

    def read_at(self, offset: int, length: int) -> bytes:
        offset, length = _clamp(self.size, offset, length)
        data = os.pread(self._file.fileno(), length, offset)
        _count(self, len(data))
        return data

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [self.read_at(o, n) for o, n in ranges]

    def stream(self) -> Iterator[bytes]:
        self._file.seek(0)
        while block := self._file.read(STREAM_BLOCK):
            _count(self, len(block))
            yield block

    def sibling(self, suffix: str, max_bytes: int) -> bytes | None:
        other = self.path.with_suffix(suffix)
        try:
            if other.stat().st_size > max_bytes:
                raise SourceError(f"{other} is larger than {max_bytes} bytes")
            return other.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SourceError(f"cannot read {other}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._file.close()


@dataclass
class _Fetch:
    start: int
    end: int


class S3Source:
    def __init__(self, client: S3Client, bucket: str, key: str, size: int | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self.client = client
        self.bucket = bucket
        self.key = key
        self.name = f"s3://{bucket}/{key}"
        if size is None:
            try:
                size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "error")
                raise SourceError(f"{self.name} not readable: {code}") from exc
            except BotoCoreError as exc:
                raise SourceError(f"object store unreachable: {exc}") from exc
        self.size = size
        self.bytes_read = 0
        self._counting = threading.Lock()
        self.requests = 0
        self._url: str | None = None

    def _describe(self, exc: Exception) -> str:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "error")
            return f"{self.name} not readable: {code}"
        return f"object store unreachable reading {self.name}: {exc}"

    def _signed_url(self) -> str:
        if self._url is None:
            self._url = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key}, ExpiresIn=3600
            )
        return self._url

    def _get(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; a GET on a missing object raises SourceError.

        Ranged reads go through one presigned URL (the Range header is not part of the
        signature) on a shared keep-alive pool: a signed boto3 call costs ~3 ms of CPU
        each, and the fast tier makes one per chunk of a big file."""
        try:
            response = _HTTP.request(
                "GET",
                self._signed_url(),
                headers={"Range": f"bytes={start}-{end - 1}"},
                retries=_RETRY,
                timeout=urllib3.Timeout(connect=5.0, read=60.0),
            )
        except (urllib3.exceptions.HTTPError, *self._errors) as exc:
            raise SourceError(f"object store unreachable reading {self.name}: {exc}") from exc
        if response.status in (200, 206):
            # 200: a store that ignores Range sent the whole object.
            data = response.data if response.status == 206 else response.data[start:end]
            _count(self, len(data))
            return data
        _count(self, 0)
        code = _error_code(response.data) or str(response.status)
        raise SourceError(f"{self.name} not readable: {code}")

    def read_at(self, offset: int, length: int) -> bytes:
        offset, length = _clamp(self.size, offset, length)
        return self._get(offset, offset + length) if length else b""

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        clamped = [_clamp(self.size, o, n) for o, n in ranges]
        # Coalesce neighbours, then fetch the merged ranges concurrently.
        order = sorted(range(len(clamped)), key=lambda i: clamped[i][0])
        fetches: list[_Fetch] = []
        for i in order:
            start, length = clamped[i]
            if not length:
                continue
            if fetches and start - fetches[-1].end <= COALESCE_GAP:
                fetches[-1].end = max(fetches[-1].end, start + length)
            else:
                fetches.append(_Fetch(start, start + length))
        if len(fetches) > 1:
            with ThreadPoolExecutor(S3_PARALLEL) as pool:
                blobs = list(pool.map(lambda f: self._get(f.start, f.end), fetches))
        else:
            blobs = [self._get(f.start, f.end) for f in fetches]
        out: list[bytes] = []
        for start, length in clamped:
            if not length:
                out.append(b"")
                continue
            for fetch, blob in zip(fetches, blobs, strict=True):
                if fetch.start <= start and start + length <= fetch.end:
                    out.append(blob[start - fetch.start : start - fetch.start + length])
                    break
        return out

    def stream(self) -> Iterator[bytes]:
        _count(self, 0)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"]
        except self._errors as exc:
            raise SourceError(self._describe(exc)) from exc
        try:
            while block := body.read(STREAM_BLOCK):
                _count(self, len(block), requests=0)
                yield block
        except self._errors as exc:
            raise SourceError(self._describe(exc)) from exc
        finally:
            body.close()

    def sibling(self, suffix: str, max_bytes: int) -> bytes | None:
        stem, dot, _ext = self.key.rpartition(".")
        key = (stem if dot else self.key) + suffix
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
            if int(head["ContentLength"]) > max_bytes:
                raise SourceError(f"s3://{self.bucket}/{key} is larger than {max_bytes} bytes")
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise SourceError(f"s3://{self.bucket}/{key} not readable: {exc}") from exc
        except self._errors as exc:
            raise SourceError(f"object store unreachable: {exc}") from exc

    def close(self) -> None:
        return None


# One keep-alive pool for every S3Source of the process (threads share it safely).
_HTTP = urllib3.PoolManager(maxsize=S3_PARALLEL * 2, block=False)
_RETRY = urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504))


def _error_code(body: bytes) -> str | None:
    """The ``<Code>`` of an S3 XML error body."""
    start, end = body.find(b"<Code>"), body.find(b"</Code>")
    if start < 0 or end < start:
        return None
    return body[start + 6 : end].decode("utf-8", "replace")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key); ValueError for anything else."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"an s3:// URL needs a bucket and a key: {url!r}")
    return bucket, key
