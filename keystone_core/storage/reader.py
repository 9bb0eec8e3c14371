"""A seekable, read-only file over one S3 object: ranged GETs, never the whole object.

The MCAP reader seeks to the footer and summary and reads only those sections; with this
object it does so over HTTP ranges. Reads are served from one read-ahead block so the
many small reads a parser makes turn into a few requests.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DEFAULT_BLOCK = 1024 * 1024


class S3RangeReader(io.IOBase):
    """``open()``-like access to ``s3://bucket/key`` of a known size.

    Not a ``RawIOBase``: readers that wrap raw streams in a ``BufferedReader`` of their own
    would close this one when that wrapper is collected, and it buffers already."""

    def __init__(
        self, client: S3Client, bucket: str, key: str, size: int, *, block: int = DEFAULT_BLOCK
    ) -> None:
        super().__init__()
        self.client = client
        self.bucket = bucket
        self.key = key
        self.size = size
        self.block = block
        self.position = 0
        self.requests = 0
        self.bytes_fetched = 0
        self._buffer = b""
        self._buffer_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self.position + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError("negative seek position")
        self.position = target
        return self.position

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object (one ranged GET)."""
        self.requests += 1
        body = self.client.get_object(
            Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}"
        )["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        self.bytes_fetched += len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        if self.position >= self.size:
            return b""
        if size is None or size < 0:
            size = self.size - self.position
        end = min(self.size, self.position + size)
        buffered_end = self._buffer_start + len(self._buffer)
        if not (self._buffer_start <= self.position and end <= buffered_end):
            fetch_end = min(self.size, max(end, self.position + self.block))
            self._buffer = self._fetch(self.position, fetch_end)
            self._buffer_start = self.position
        offset = self.position - self._buffer_start
        data = self._buffer[offset : offset + (end - self.position)]
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)
