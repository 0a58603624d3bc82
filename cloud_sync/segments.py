"""The outbox's files: per priority, segments of records, each with its length, a CRC and its
sequence number, so that a torn or corrupt tail is found and cut at start-up."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<IIQ")
MAX_RECORD = 64 * 1024 * 1024
READ_AHEAD = 256 * 1024  # bytes read at once from a segment (more when a record is larger)


@dataclass
class Segment:
    first: int
    path: Path
    size: int
    last: int  # last seq in it (first - 1 when empty)


@dataclass
class Log:
    """One priority's segments, acknowledged position and read cursor."""

    directory: Path
    segments: list[Segment] = field(default_factory=list)
    acked: int = 0
    synced: int = 0  # the acknowledged position on disk (`acked` may be ahead of it)
    next_seq: int = 1
    cursor: tuple[int, int] = (0, 0)  # (segment index, byte offset) of the next record to read
    tail: Any = None  # the open file of the last segment
    # bytes read from a segment but not parsed yet: (segment's first seq, offset, data)
    ahead: tuple[int, int, bytes] | None = None

    @property
    def pending(self) -> int:
        return self.next_seq - 1 - self.acked


def parse_record(data: bytes, offset: int) -> tuple[int, bytes, int] | None:
    """(seq, body, end offset) of the record at `offset`, or None if it is torn or corrupt."""
    if offset + HEADER.size > len(data):
        return None
    length, crc, seq = HEADER.unpack_from(data, offset)
    start = offset + HEADER.size
    end = start + length
    if length > MAX_RECORD or end > len(data):
        return None
    body = data[start:end]
    # the checksum covers the sequence number (the header's last 8 bytes), then the body
    if zlib.crc32(body, zlib.crc32(data[start - 8 : start])) != crc:
        return None
    return seq, body, end


def record_size(data: bytes, offset: int) -> int | None:
    """The whole size of the record whose header starts at `offset`, if the header is there."""
    if offset + HEADER.size > len(data):
        return None
    length: int = HEADER.unpack_from(data, offset)[0]
    return HEADER.size + length


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
