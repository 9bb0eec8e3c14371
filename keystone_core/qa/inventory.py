"""What an MCAP holds, read two ways: from its summary and indexes, or by a full pass.

``indexed_inventory`` (fast tier) reads the header magic, the footer, the summary section,
the ``axon.*`` metadata records and every chunk's MessageIndex records — the exact log
time of every message and, from consecutive offsets, its size — then decodes a sample of
image frames from a few chunks spread over the file. Bytes read are a few percent of the
file whatever its size.

``scanned_inventory`` walks the records from the start. The fast tier uses it to recover
a file whose footer or summary is missing (a truncated upload): chunk bodies are skipped
and the messages come from the MessageIndex records that follow each complete chunk. The
thorough tier uses it with ``full=True``: every chunk decompressed and CRC-checked, every
message counted, every image decoded, the whole object hashed on the way.

Every length field is checked against the file size and the limits before anything is
allocated, and a deadline bounds the time: hostile input ends as "unreadable", never as a
crash, a hang or a memory spike.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, cast

import numpy as np
import zstandard
from mcap.data_stream import ReadDataStream
from mcap.records import (
    Channel,
    Metadata,
    MetadataIndex,
    Schema,
    Statistics,
)

from keystone_core.qa.images import check_frame, image_kind
from keystone_core.qa.source import Source, SourceError

MAGIC = b"\x89MCAP0\r\n"
# Footer record (opcode + length + summary_start + summary_offset_start + crc) + magic.
TAIL = 1 + 8 + 8 + 8 + 4 + len(MAGIC)
MESSAGE_OVERHEAD = 1 + 8 + 2 + 4 + 8 + 8  # a Message record around its payload
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK = 0x02, 0x03, 0x04, 0x05, 0x06
OP_MESSAGE_INDEX, OP_CHUNK_INDEX, OP_STATISTICS = 0x07, 0x08, 0x0B
OP_METADATA, OP_METADATA_INDEX, OP_DATA_END = 0x0C, 0x0D, 0x0F


class Unreadable(Exception):
    """Nothing trustworthy can be read: not MCAP, empty, hostile, or over the limits."""


@dataclass(frozen=True)
class Limits:
    max_summary_bytes: int = 64 * 1024 * 1024
    max_metadata_bytes: int = 1024 * 1024
    max_metadata_records: int = 64
    max_chunk_bytes: int = 512 * 1024 * 1024
    max_small_record_bytes: int = 16 * 1024 * 1024
    max_messages: int = 50_000_000
    seconds: float = 600.0
    # Fast tier frame sample: chunks read (spread first to last), frames decoded per image
    # channel (spread over those chunks).
    sample_chunks: int = 3
    sample_frames: int = 6


@dataclass(frozen=True)
class ChannelInfo:
    id: int
    topic: str
    schema_id: int
    encoding: str


@dataclass
class ChunkRef:
    offset: int
    length: int
    channels: set[int] = field(default_factory=set)
    # From the chunk index (fast tier): where its MessageIndex records are.
    index_length: int = 0
    uncompressed_size: int | None = None
    # Log times of its first and last message (chunk index or chunk header), when known.
    start_ns: int | None = None
    end_ns: int | None = None


@dataclass(frozen=True)
class Frame:
    channel_id: int
    log_time: int
    problem: str | None


@dataclass
class Inventory:
    size: int
    tier: str
    recovered: bool = False
    notes: list[str] = field(default_factory=list)
    channels: dict[int, ChannelInfo] = field(default_factory=dict)
    schemas: dict[int, str] = field(default_factory=dict)
    times: dict[int, array[int]] = field(default_factory=dict)
    # Payload bytes per message, in log-time order; -1 where the index cannot tell.
    sizes: dict[int, array[int]] = field(default_factory=dict)
    start_ns: int | None = None
    end_ns: int | None = None
    stated_counts: dict[int, int] | None = None  # the Statistics record's, when present
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    chunks: list[ChunkRef] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    crc_errors: list[str] = field(default_factory=list)
    sha256: str | None = None
    exact: bool = False  # every message seen (thorough tier)

    def add(self, channel_id: int, log_time: int, size: int) -> None:
        self.times.setdefault(channel_id, array("q")).append(log_time)
        self.sizes.setdefault(channel_id, array("q")).append(size)

    def extend(self, channel_id: int, times: np.ndarray, sizes: np.ndarray) -> None:
        self.times.setdefault(channel_id, array("q")).frombytes(times.astype("<i8").tobytes())
        self.sizes.setdefault(channel_id, array("q")).frombytes(sizes.astype("<i8").tobytes())

    def schema_of(self, channel_id: int) -> str:
        info = self.channels.get(channel_id)
        return self.schemas.get(info.schema_id, "") if info else ""

    def counts(self) -> dict[int, int]:
        return {cid: len(times) for cid, times in self.times.items()}

    def total(self) -> int:
        return sum(len(times) for times in self.times.values())

    def finish(self) -> None:
        """Sort each channel's timeline (sizes follow) and set the time span."""
        for cid, times in self.times.items():
            values = np.frombuffer(times, dtype=np.int64)
            if len(values) > 1 and bool(np.any(np.diff(values) < 0)):
                order = np.argsort(values, kind="stable")
                sizes = np.frombuffer(self.sizes[cid], dtype=np.int64)
                self.times[cid] = array("q", values[order].tobytes())
                self.sizes[cid] = array("q", sizes[order].tobytes())
        firsts = [t[0] for t in self.times.values() if t]
        lasts = [t[-1] for t in self.times.values() if t]
        if firsts and self.start_ns is None:
            self.start_ns = min(firsts)
        if lasts and self.end_ns is None:
            self.end_ns = max(lasts)


class _Clock:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise Unreadable(f"not read within the {self.seconds:.0f} s time budget")


def _records(data: bytes | memoryview, base: int = 0) -> Iterator[tuple[int, int, memoryview]]:
    """(opcode, offset, body) of each record in a byte range; ValueError on a bad length."""
    view = memoryview(data)
    position = 0
    while position + 9 <= len(view):
        opcode = view[position]
        (length,) = struct.unpack_from("<Q", view, position + 1)
        body = position + 9
        if body + length > len(view):
            raise ValueError(f"record at offset {base + position} runs past its section")
        yield opcode, base + position, view[body : body + length]
        position = body + length


def _parse(record: type, body: memoryview) -> object:
    stream = ReadDataStream(cast(IO[bytes], _BytesReader(body)))
    return record.read(stream)  # type: ignore[attr-defined]


class _BytesReader:
    """The minimal file object ``ReadDataStream`` needs, over a memoryview (no copy)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(len(self.view), self.pos + size)
        out = bytes(self.view[self.pos : end])
        self.pos = end
        return out


# One MessageIndex record: its channel and an (n, 2) array of (log_time, offset).
IndexPart = tuple[int, "np.ndarray[Any, np.dtype[np.uint64]]"]


def _message_index(body: memoryview, chunk: ChunkRef | None) -> IndexPart:
    """The entries of one MessageIndex record (parsed in bulk, no per-entry Python)."""
    if len(body) < 6:
        raise ValueError("message index record too short")
    channel_id, records_length = struct.unpack_from("<HI", body, 0)
    if records_length % 16 or records_length > len(body) - 6:
        raise ValueError("malformed message index record")
    count = records_length // 16
    entries = np.frombuffer(body, dtype="<u8", count=2 * count, offset=6).reshape(count, 2)
    if chunk is not None and count:
        chunk.channels.add(channel_id)
    return channel_id, entries


def _add_indexed(inventory: Inventory, parts: list[IndexPart], uncompressed: int | None) -> None:
    _add_chunks(inventory, [(parts, uncompressed)])


def _add_chunks(inventory: Inventory, chunks: list[tuple[list[IndexPart], int | None]]) -> None:
    """Messages of many chunks from their index entries, in bulk. A message's size is the
    distance to the next message's offset in its chunk (the last one's: to the end of the
    chunk's records, or unknown (-1) when the chunk's size is not known)."""
    rows = [
        (number, cid, entries)
        for number, (parts, _) in enumerate(chunks)
        for cid, entries in parts
        if len(entries)
    ]
    if not rows:
        return
    counts = np.array([len(e) for _, _, e in rows])
    chunk_of = np.repeat(np.array([n for n, _, _ in rows], dtype=np.int64), counts)
    channels = np.repeat(np.array([cid for _, cid, _ in rows], dtype=np.int64), counts)
    times = np.concatenate([e[:, 0] for _, _, e in rows]).astype(np.int64)
    offsets = np.concatenate([e[:, 1] for _, _, e in rows]).astype(np.int64)
    ends = np.array([-1 if end is None else end for _, end in chunks], dtype=np.int64)
    order = np.lexsort((offsets, chunk_of))
    in_chunk, at = chunk_of[order], offsets[order]
    following = np.empty_like(at)
    following[:-1] = at[1:]
    same = np.zeros(len(at), dtype=bool)
    same[:-1] = in_chunk[1:] == in_chunk[:-1]
    end = ends[in_chunk]
    step = np.where(
        same, following - at - MESSAGE_OVERHEAD, np.where(end >= 0, end - at - MESSAGE_OVERHEAD, -1)
    )
    sizes = np.empty_like(step)
    sizes[order] = step
    for cid in np.unique(channels):
        mask = channels == cid
        inventory.extend(int(cid), times[mask], sizes[mask])


def _add_definition(inventory: Inventory, opcode: int, body: memoryview) -> None:
    if opcode == OP_SCHEMA:
        schema = _parse(Schema, body)
        assert isinstance(schema, Schema)
        inventory.schemas[schema.id] = schema.name
    elif opcode == OP_CHANNEL:
        channel = _parse(Channel, body)
        assert isinstance(channel, Channel)
        inventory.channels[channel.id] = ChannelInfo(
            channel.id, channel.topic, channel.schema_id, channel.message_encoding
        )


def _check_magic(source: Source) -> None:
    if source.size == 0:
        raise Unreadable("empty file (0 bytes)")
    head = source.read_at(0, len(MAGIC))
    if head != MAGIC:
        raise Unreadable(f"not an MCAP file (starts with {head[:8].hex()})")


# --- fast tier: summary + indexes -----------------------------------------------------------


def indexed_inventory(source: Source, limits: Limits) -> Inventory:
    """The fast tier's view; falls back to ``scanned_inventory`` (flagged) when the footer
    or summary is missing or damaged."""
    clock = _Clock(limits.seconds)
    _check_magic(source)
    inventory = Inventory(size=source.size, tier="fast")
    problem = _read_summary(source, limits, inventory)
    if problem:
        recovered = scanned_inventory(source, limits, full=False, clock=clock)
        recovered.recovered = True
        recovered.notes.insert(0, problem)
        _sample_frames(source, limits, recovered, clock)
        return recovered
    clock.check()
    # The chunk index already says which chunks hold image frames: decode the sample
    # (decompression and JPEG decoding release the GIL) while the indexes are read.
    with ThreadPoolExecutor(1) as pool:
        sampling = pool.submit(_sample_frames, source, limits, inventory, clock)
        _read_indexes(source, limits, inventory, clock)
        sampling.result()
    inventory.finish()
    return inventory


def _read_summary(source: Source, limits: Limits, inventory: Inventory) -> str | None:
    """Fill channels, statistics, chunks and metadata from the summary; or say why not."""
    size = source.size
    if size < len(MAGIC) + TAIL:
        return "file too short for an MCAP footer: truncated"
    tail = source.read_at(size - TAIL, TAIL)
    if tail[-len(MAGIC) :] != MAGIC or tail[0] != OP_FOOTER:
        return "file does not end with an MCAP footer: truncated or cut"
    summary_start, _offsets, summary_crc = struct.unpack_from("<QQI", tail, 9)
    footer_at = size - TAIL
    if summary_start == 0:
        return "file has no summary section"
    if not len(MAGIC) <= summary_start <= footer_at:
        return "footer points outside the file"
    length = footer_at - summary_start
    if length > limits.max_summary_bytes:
        raise Unreadable(
            f"summary section of {length} bytes is over the {limits.max_summary_bytes} limit"
        )
    summary = source.read_at(summary_start, length)
    if summary_crc and zlib.crc32(tail[:25], zlib.crc32(summary)) != summary_crc:
        return "summary section fails its CRC"
    metadata_index: list[MetadataIndex] = []
    try:
        for opcode, _at, body in _records(summary, summary_start):
            if opcode in (OP_SCHEMA, OP_CHANNEL):
                _add_definition(inventory, opcode, body)
            elif opcode == OP_CHUNK_INDEX:
                inventory.chunks.append(_chunk_index(body))
            elif opcode == OP_STATISTICS:
                stats = _parse(Statistics, body)
                assert isinstance(stats, Statistics)
                inventory.stated_counts = dict(stats.channel_message_counts)
                if stats.message_count:
                    inventory.start_ns = stats.message_start_time
                    inventory.end_ns = stats.message_end_time
            elif opcode == OP_METADATA_INDEX:
                entry = _parse(MetadataIndex, body)
                assert isinstance(entry, MetadataIndex)
                metadata_index.append(entry)
    except Exception as exc:  # a damaged summary is recoverable by a scan
        return f"summary section is damaged: {exc}"[:300]
    _read_metadata(source, limits, inventory, metadata_index)
    for ref in inventory.chunks:
        if not (ref.offset > 0 and ref.offset + ref.length <= size):
            return "chunk index points outside the file"
    return None


def _read_metadata(
    source: Source, limits: Limits, inventory: Inventory, entries: list[MetadataIndex]
) -> None:
    wanted = [e for e in entries if e.length <= limits.max_metadata_bytes]
    skipped = len(entries) - len(wanted)
    if len(wanted) > limits.max_metadata_records:
        skipped += len(wanted) - limits.max_metadata_records
        wanted = wanted[: limits.max_metadata_records]
    if skipped:
        inventory.notes.append(f"{skipped} metadata record(s) over the limits were not read")
    blobs = source.read_ranges([(e.offset, e.length) for e in wanted])
    for blob in blobs:
        try:
            for opcode, _at, body in _records(blob):
                if opcode == OP_METADATA:
                    record = _parse(Metadata, body)
                    assert isinstance(record, Metadata)
                    inventory.metadata[record.name] = dict(record.metadata)
        except Exception as exc:  # a bad record is noted; consistency checks then miss it
            inventory.notes.append(f"metadata record unreadable: {exc}"[:200])


def _chunk_index(body: memoryview) -> ChunkRef:
    """A ChunkIndex record, parsed directly (thousands per file: no per-field objects)."""
    start, end, offset, length, map_length = struct.unpack_from("<QQQQI", body, 0)
    position = 36 + map_length
    if map_length % 10 or position + 12 > len(body):
        raise ValueError("malformed chunk index record")
    channels = {cid for cid, _ in struct.iter_unpack("<HQ", body[36:position])}
    (index_length,) = struct.unpack_from("<Q", body, position)
    (name_length,) = struct.unpack_from("<I", body, position + 8)
    position += 12 + name_length
    if position + 16 > len(body):
        raise ValueError("malformed chunk index record")
    _compressed, uncompressed = struct.unpack_from("<QQ", body, position)
    return ChunkRef(offset, length, channels, index_length, uncompressed, start, end)


def _read_indexes(source: Source, limits: Limits, inventory: Inventory, clock: _Clock) -> None:
    ranges = [(ref.offset + ref.length, ref.index_length) for ref in inventory.chunks]
    # Batches keep the memory of one batch of index sections, not the whole file's.
    batch = 256
    for first in range(0, len(ranges), batch):
        clock.check()
        blobs = source.read_ranges(ranges[first : first + batch])
        found: list[tuple[list[IndexPart], int | None]] = []
        for ref, blob in zip(inventory.chunks[first : first + batch], blobs, strict=True):
            entries: list[IndexPart] = []
            try:
                for opcode, _at, body in _records(blob):
                    if opcode == OP_MESSAGE_INDEX:
                        entries.append(_message_index(body, ref))
            except ValueError as exc:
                inventory.notes.append(f"message index of chunk at {ref.offset}: {exc}")
            found.append((entries, ref.uncompressed_size))
        if sum(len(e) for parts, _ in found for _, e in parts) + inventory.total() > (
            limits.max_messages
        ):
            raise Unreadable(f"more than {limits.max_messages} messages")
        _add_chunks(inventory, found)
    if not inventory.chunks and inventory.stated_counts and sum(inventory.stated_counts.values()):
        inventory.notes.append("messages are not chunked: no message index to read")


# --- chunks ------------------------------------------------------------------------------


def _chunk_records(
    body: memoryview, limits: Limits, *, validate_crc: bool
) -> tuple[memoryview, str | None]:
    """The decompressed records of a Chunk record body, and a CRC problem if any."""
    if len(body) < 8 * 3 + 4 + 4:
        raise ValueError("chunk record too short")
    _start, _end, uncompressed_size, crc = struct.unpack_from("<QQQI", body, 0)
    (name_length,) = struct.unpack_from("<I", body, 28)
    position = 32 + name_length
    if position + 8 > len(body):
        raise ValueError("chunk header runs past the record")
    compression = bytes(body[32:position]).decode("ascii", "replace")
    (records_length,) = struct.unpack_from("<Q", body, position)
    data = body[position + 8 :]
    if records_length != len(data):
        raise ValueError("chunk records length disagrees with the record")
    if uncompressed_size > limits.max_chunk_bytes:
        raise ValueError(f"chunk claims {uncompressed_size} uncompressed bytes (over the limit)")
    if compression == "zstd":
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=uncompressed_size)
    elif compression == "lz4":
        import lz4.frame

        raw = lz4.frame.decompress(bytes(data))
    elif compression == "":
        raw = bytes(data)
    else:
        raise ValueError(f"unknown chunk compression {compression!r}")
    if len(raw) != uncompressed_size:
        raise ValueError(f"chunk decompresses to {len(raw)} bytes, header says {uncompressed_size}")
    problem = None
    if validate_crc and crc and zlib.crc32(raw) != crc:
        problem = "chunk CRC mismatch"
    return memoryview(raw), problem


def _chunk_times(ref: ChunkRef, body: bytes) -> None:
    """The first and last log time a Chunk record's header states."""
    if len(body) >= 16:
        ref.start_ns, ref.end_ns = struct.unpack_from("<QQ", body, 0)


def chunk_messages(
    record: bytes | memoryview, limits: Limits
) -> Iterator[tuple[int, int, memoryview]]:
    """(channel, log_time, payload) of every message in one whole Chunk record (as read
    from ``ChunkRef.offset``, ``ChunkRef.length`` bytes); ValueError when it does not open.
    Its CRC is not checked (the thorough tier does that)."""
    view = memoryview(record)
    if len(view) < 9 or view[0] != OP_CHUNK:
        raise ValueError("not a chunk record")
    raw, _ = _chunk_records(view[9:], limits, validate_crc=False)
    for opcode, channel_id, log_time, payload in _messages(raw):
        if opcode == OP_MESSAGE:
            yield channel_id, log_time, payload


def _messages(raw: memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(opcode, channel, log_time, payload) for messages; other records as opcode only."""
    for opcode, _at, body in _records(raw):
        if opcode == OP_MESSAGE:
            if len(body) < 22:
                raise ValueError("message record too short")
            channel_id, _seq, log_time = struct.unpack_from("<HIQ", body, 0)
            yield opcode, channel_id, log_time, body[22:]
        else:
            yield opcode, -1, 0, body


def _sample_frames(source: Source, limits: Limits, inventory: Inventory, clock: _Clock) -> None:
    """Decode image frames from a few chunks spread over the file (fast tier)."""
    kinds = {cid: image_kind(inventory.schema_of(cid)) for cid in inventory.channels}
    image_channels = {cid for cid, kind in kinds.items() if kind}
    if not image_channels:
        return
    candidates = [ref for ref in inventory.chunks if ref.channels & image_channels]
    if not candidates:
        return
    wanted = min(limits.sample_chunks, len(candidates))
    picks = sorted({round(i * (len(candidates) - 1) / max(1, wanted - 1)) for i in range(wanted)})
    chosen = [candidates[i] for i in picks if candidates[i].length <= limits.max_chunk_bytes]
    per_chunk = max(1, -(-limits.sample_frames // max(1, len(chosen))))
    work: list[tuple[int, int, str, bytes]] = []
    for ref, blob in zip(
        chosen, source.read_ranges([(r.offset, r.length) for r in chosen]), strict=True
    ):
        clock.check()
        try:
            raw, _ = _chunk_records(memoryview(blob)[9:], limits, validate_crc=False)
            found: dict[int, list[tuple[int, memoryview]]] = {}
            for opcode, cid, log_time, payload in _messages(raw):
                if opcode == OP_MESSAGE and cid in image_channels:
                    found.setdefault(cid, []).append((log_time, payload))
        except Exception as exc:  # a chunk that cannot be opened is itself a finding
            inventory.frames.append(
                Frame(
                    next(iter(ref.channels & image_channels)),
                    0,
                    f"chunk at offset {ref.offset} unreadable: {exc}"[:300],
                )
            )
            continue
        for cid, frames in found.items():
            step = max(1, len(frames) // per_chunk)
            kind = kinds[cid]
            assert kind is not None
            work.extend((cid, t, kind, bytes(p)) for t, p in frames[::step][:per_chunk])
    # The decoders release the GIL: decode the sample on every core.
    with ThreadPoolExecutor(min(len(work), os.cpu_count() or 1) or 1) as pool:
        problems = list(pool.map(lambda w: check_frame(w[2], w[3]), work))
    inventory.frames.extend(
        Frame(cid, log_time, problem)
        for (cid, log_time, _, _), problem in zip(work, problems, strict=True)
    )


# --- sequential scan: recovery (fast) and the full pass (thorough) --------------------------


class _Reader:
    """Sequential reads over ``source.stream()`` with the SHA-256 of everything read."""

    def __init__(self, source: Source) -> None:
        self.blocks = source.stream()
        self.buffer = bytearray()
        self.position = 0
        self.digest = hashlib.sha256()
        self.exhausted = False

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size and not self.exhausted:
            block = next(self.blocks, None)
            if block is None:
                self.exhausted = True
                break
            self.digest.update(block)
            self.buffer += block

    def read(self, size: int) -> bytes:
        self._fill(size)
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.position += len(out)
        return out

    def skip(self, size: int) -> int:
        skipped = 0
        while skipped < size:
            self._fill(min(size - skipped, 8 * 1024 * 1024))
            step = min(size - skipped, len(self.buffer))
            if not step:
                break
            del self.buffer[:step]
            skipped += step
        self.position += skipped
        return skipped

    def drain(self) -> str:
        while not self.exhausted:
            self._fill(len(self.buffer) + 1)
            self.buffer.clear()
        return self.digest.hexdigest()


def scanned_inventory(
    source: Source, limits: Limits, *, full: bool, clock: _Clock | None = None
) -> Inventory:
    """Walk every record from the start (see the module docstring)."""
    clock = clock or _Clock(limits.seconds)
    _check_magic(source)
    inventory = Inventory(size=source.size, tier="thorough" if full else "fast", exact=full)
    reader = _Reader(source)
    try:
        _scan(reader, source.size, limits, inventory, full=full, clock=clock)
    except SourceError:
        raise
    if full:
        inventory.sha256 = reader.drain()
    inventory.finish()
    if inventory.recovered and not inventory.total():
        raise Unreadable("truncated and nothing recoverable: " + "; ".join(inventory.notes))
    return inventory


def _scan(
    reader: _Reader, size: int, limits: Limits, inventory: Inventory, *, full: bool, clock: _Clock
) -> None:
    reader.read(len(MAGIC))
    kinds: dict[int, str | None] = {}
    pending_chunk: tuple[ChunkRef, bytes, int] | None = None  # fast: the last chunk's body
    entries: list[IndexPart] = []
    ended = False
    sampled = 0

    def close_chunk() -> None:
        nonlocal pending_chunk, entries
        if pending_chunk is None:
            return
        ref, body, uncompressed = pending_chunk
        unknown = {cid for cid, found in entries if len(found)} - set(inventory.channels)
        if unknown:
            try:
                raw, _ = _chunk_records(memoryview(body), limits, validate_crc=False)
                for opcode, _cid, _t, record in _messages(raw):
                    if opcode in (OP_SCHEMA, OP_CHANNEL):
                        _define(opcode, record)
            except ValueError as exc:
                inventory.notes.append(f"chunk at offset {ref.offset}: {exc}")
        _add_indexed(inventory, entries, uncompressed)
        inventory.chunks.append(ref)
        pending_chunk, entries = None, []

    def _define(opcode: int, body: memoryview) -> None:
        _add_definition(inventory, opcode, body)
        for cid in inventory.channels:
            kinds[cid] = image_kind(inventory.schema_of(cid))

    while True:
        clock.check()
        at = reader.position
        header = reader.read(9)
        if len(header) < 9:
            if not ended:
                inventory.recovered = True
                inventory.notes.append(f"file ends at byte {at} without an MCAP footer")
            break
        opcode = header[0]
        (length,) = struct.unpack_from("<Q", header, 1)
        if length > size - reader.position:
            inventory.recovered = True
            inventory.notes.append(
                f"record (opcode 0x{opcode:02x}) at byte {at} runs past the end: truncated"
            )
            break
        if opcode == OP_CHUNK:
            close_chunk()
            ref = ChunkRef(at, 9 + length)
            if length > limits.max_chunk_bytes:
                inventory.notes.append(f"chunk at byte {at} is over the size limit; skipped")
                reader.skip(length)
                continue
            if not full:
                # Kept only until its index shows whether it defines unknown channels.
                chunk_body = reader.read(length)
                _chunk_times(ref, chunk_body)
                uncompressed = struct.unpack_from("<Q", chunk_body, 16)[0] if length >= 24 else 0
                pending_chunk = (ref, chunk_body, int(uncompressed))
                continue
            body_bytes = reader.read(length)
            _chunk_times(ref, body_bytes)
            try:
                raw, crc_problem = _chunk_records(memoryview(body_bytes), limits, validate_crc=True)
            except Exception as exc:  # a chunk that does not open is a finding, not a crash
                inventory.crc_errors.append(f"chunk at byte {at}: {exc}"[:300])
                continue
            if crc_problem:
                inventory.crc_errors.append(f"chunk at byte {at}: {crc_problem}")
            try:
                for inner, cid, log_time, payload in _messages(raw):
                    if inner in (OP_SCHEMA, OP_CHANNEL):
                        _define(inner, payload)
                    elif inner == OP_MESSAGE:
                        inventory.add(cid, log_time, len(payload))
                        ref.channels.add(cid)
                        kind = kinds.get(cid)
                        if kind:
                            inventory.frames.append(
                                Frame(cid, log_time, check_frame(kind, bytes(payload)))
                            )
                            sampled += 1
            except ValueError as exc:
                inventory.crc_errors.append(f"chunk at byte {at}: {exc}")
            inventory.chunks.append(ref)
            if inventory.total() > limits.max_messages:
                raise Unreadable(f"more than {limits.max_messages} messages")
            continue
        if opcode == OP_MESSAGE_INDEX and not full:
            body = memoryview(reader.read(length))
            try:
                entries.append(_message_index(body, pending_chunk[0] if pending_chunk else None))
            except ValueError as exc:
                inventory.notes.append(f"message index at byte {at}: {exc}")
            continue
        close_chunk()
        if opcode in (OP_SCHEMA, OP_CHANNEL, OP_STATISTICS, OP_METADATA, OP_MESSAGE):
            limit = (
                limits.max_metadata_bytes
                if opcode == OP_METADATA
                else limits.max_small_record_bytes
            )
            if opcode == OP_MESSAGE:
                limit = limits.max_chunk_bytes
            if length > limit:
                inventory.notes.append(
                    f"record (opcode 0x{opcode:02x}) at byte {at} over the limit; skipped"
                )
                reader.skip(length)
                continue
            body = memoryview(reader.read(length))
            try:
                if opcode in (OP_SCHEMA, OP_CHANNEL):
                    _define(opcode, body)
                elif opcode == OP_STATISTICS:
                    stats = _parse(Statistics, body)
                    assert isinstance(stats, Statistics)
                    inventory.stated_counts = dict(stats.channel_message_counts)
                elif opcode == OP_METADATA:
                    record = _parse(Metadata, body)
                    assert isinstance(record, Metadata)
                    inventory.metadata[record.name] = dict(record.metadata)
                else:  # a message outside chunks
                    cid, _seq, log_time = struct.unpack_from("<HIQ", body, 0)
                    inventory.add(cid, log_time, len(body) - 22)
                    kind = kinds.get(cid)
                    if kind and (full or sampled < limits.sample_frames):
                        inventory.frames.append(
                            Frame(cid, log_time, check_frame(kind, bytes(body[22:])))
                        )
                        sampled += 1
            except Exception as exc:  # one bad record is noted; the scan goes on
                inventory.notes.append(f"record (opcode 0x{opcode:02x}) at byte {at}: {exc}"[:300])
            continue
        if opcode == OP_FOOTER:
            ended = True
            reader.skip(length)
            if reader.read(len(MAGIC)) != MAGIC:
                inventory.recovered = True
                inventory.notes.append("footer is not followed by the closing magic")
            break
        reader.skip(length)
    close_chunk()
