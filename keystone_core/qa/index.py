"""Per-message timestamps and sizes from an MCAP's message indexes, without its chunks.

Each chunk index points at the chunk's MessageIndex records (one per channel: the log
time and the offset of every message inside the uncompressed chunk). Reading those ranges
gives every topic's exact timeline — gaps, rates — and, from the distance between
consecutive offsets, every message's size, so empty or cut frames are found without
decompressing a single chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO

from mcap.records import ChunkIndex

MESSAGE_INDEX_OPCODE = 0x07
# A Message record: opcode (1) + length (8) + channel id (2) + sequence (4) + log time (8)
# + publish time (8); the payload follows.
MESSAGE_RECORD_OVERHEAD = 31


@dataclass(frozen=True)
class IndexedMessage:
    channel_id: int
    log_time: int
    # Payload bytes; None for the last message of a chunk (its end is not indexed).
    size: int | None


def read_chunk_index(stream: IO[bytes], chunk: ChunkIndex) -> list[IndexedMessage]:
    """The messages of one chunk, in offset order, from its MessageIndex records."""
    start = chunk.chunk_start_offset + chunk.chunk_length
    stream.seek(start)
    data = stream.read(chunk.message_index_length)
    entries: list[tuple[int, int, int]] = []  # (offset, channel, log_time)
    position = 0
    while position + 9 <= len(data):
        opcode = data[position]
        (length,) = struct.unpack_from("<Q", data, position + 1)
        body = position + 9
        if body + length > len(data):
            raise ValueError("message index record runs past its section")
        if opcode == MESSAGE_INDEX_OPCODE:
            channel_id, records_length = struct.unpack_from("<HI", data, body)
            if records_length % 16 or records_length > length - 6:
                raise ValueError("malformed message index record")
            for i in range(records_length // 16):
                log_time, offset = struct.unpack_from("<QQ", data, body + 6 + 16 * i)
                entries.append((offset, channel_id, log_time))
        position = body + length
    entries.sort()
    messages = []
    for i, (offset, channel_id, log_time) in enumerate(entries):
        size = None
        if i + 1 < len(entries):
            size = entries[i + 1][0] - offset - MESSAGE_RECORD_OVERHEAD
        messages.append(IndexedMessage(channel_id=channel_id, log_time=log_time, size=size))
    return messages


def timelines(stream: IO[bytes], chunks: list[ChunkIndex]) -> dict[int, list[int]]:
    """Every channel's message log times (sorted), from all chunks' indexes."""
    out: dict[int, list[int]] = {}
    for chunk in chunks:
        for message in read_chunk_index(stream, chunk):
            out.setdefault(message.channel_id, []).append(message.log_time)
    for times in out.values():
        times.sort()
    return out
