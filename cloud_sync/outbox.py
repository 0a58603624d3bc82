"""The outbox: a durable, append-only, per-priority ordered log between processing and the WAN.

Why our own log and not a database: appends and in-order reads of whole batches are all it
does, and it must say exactly what a crash can cost, which a framed, checksummed log makes
plain.

Layout: `<path>/p<priority>/<first seq>.seg` segment files of framed records,
`<path>/p<priority>/acked` (the last sequence number the cloud confirmed) and `<path>/id` (this
outbox's identity, part of every message id). A record is `length, crc32, seq` (little-endian
u32, u32, u64) and a msgpack body `[so, stream, enqueued ms, lastUpdate, update bytes]`; the
checksum covers the sequence number and the body.

Durability (`fsync`):
- `batch` (default): `write` returns once its batch is fsynced. A crash or a power loss loses
  nothing that `write` returned for; the unit acknowledges its MQTT input only after that, so
  what was not yet written is redelivered by the broker.
- `interval`: fsync at most every `fsync_interval`; a power loss can lose that much of the
  newest records (a process crash loses nothing: the OS has them).
- `never`: the OS decides; only for tests and benchmarks.
A torn last record (power lost mid-write) fails its checksum on start-up, is truncated and
logged; everything before it is intact.

The acknowledged position is made durable at most every `ack_sync_interval` (and always before
a segment is deleted, and on close): a crash resends up to that much of what the cloud had
already confirmed, under the same message ids, which the cloud stores once. Written at every
acknowledgement, its two fsyncs (file and directory) several hundred times a second competed
with the writes' own fsyncs for the file system's journal: measured, the device-to-Kafka p99
at 10,000 updates/s went from 47-63 ms to 32-47 ms without them.

Full (`max_bytes` of segments) is a per-stream choice: `block` makes `write` wait for the
forwarder to free space (the unit then stops acknowledging, and devices' updates wait on the
broker instead of vanishing) and `reject` refuses new records, counted and logged. Records
older than `ttl` are not sent; they are counted and logged as expired. Nothing is dropped
silently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud_sync.segments import (
    HEADER,
    MAX_RECORD,
    READ_AHEAD,
    Log,
    Segment,
    atomic_write,
    fsync_dir,
    parse_record,
    record_size,
)
from streams.codec import encode_update
from streams.flows.model import duration_ms
from streams.updates import SensorUpdate, StreamKey

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class StreamPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str  # so/stream pattern
    priority: int = Field(default=5, ge=0, le=9)  # 0 goes first
    when_full: Literal["block", "reject"] = "block"


class OutboxSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    max_bytes: int = Field(default=1 << 30, ge=1 << 16)
    segment_bytes: int = Field(default=8 << 20, ge=1 << 12)
    ttl: int | None = 7 * 86_400_000  # ms; None keeps records until sent
    fsync: Literal["batch", "interval", "never"] = "batch"
    fsync_interval: int = 1_000  # ms
    # ms: how often the acknowledged position is made durable (0: at every acknowledgement)
    ack_sync_interval: int = Field(default=1_000, ge=0)
    streams: list[StreamPolicy] = []  # first match wins; otherwise priority 5, block

    @field_validator("ttl", "fsync_interval", "ack_sync_interval", mode="before")
    @classmethod
    def _durations(cls, value: Any) -> Any:
        return None if value is None else duration_ms(value)

    def policy(self, key: StreamKey) -> StreamPolicy:
        name = f"{key.so}/{key.stream}"
        for p in self.streams:
            if fnmatch.fnmatchcase(name, p.match):
                return p
        return _DEFAULT


_DEFAULT = StreamPolicy(match="*")


_SEQ = struct.Struct("<Q")


class OutboxFull(Exception):
    """Raised by `write` for streams whose policy is reject, when the outbox is full."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a setattr call per field
class Record:
    priority: int
    seq: int
    key: StreamKey
    enqueued: int  # ms
    last_update: int
    body: bytes  # the update, JSON

    def message_id(self, site: str) -> str:
        """The update's identity: the same whenever it is produced again. A unit killed
        between processing and acknowledging reprocesses its input and writes the same
        updates to the outbox again (new positions, same content); this id lets the cloud
        store each once. Two readings alike in object, stream, time and values are one."""
        digest = hashlib.blake2b(self.body, digest_size=8).hexdigest()
        return f"{site}/{self.key.so}/{self.key.stream}/{self.last_update}/{digest}"


@dataclass
class OutboxCounts:
    written: int = 0
    rejected: int = 0  # reject-new when full
    expired: int = 0  # older than ttl when their turn came
    acked: int = 0
    truncated: int = 0  # torn records cut at start-up


class Outbox:
    """Thread-safe: the unit writes from its worker, the forwarder reads and acknowledges."""

    def __init__(self, settings: OutboxSettings, *, clock: Clock = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.counts = OutboxCounts()
        self._lock = threading.Condition()
        self._acking = threading.Lock()  # acknowledgements, one at a time (see `ack`)
        self._watchers: list[Callable[[], None]] = []
        self._closed = False
        self._last_fsync = 0.0
        self._acks_synced_at = float("-inf")  # when the positions were last made durable
        self._policies: dict[StreamKey, StreamPolicy] = {}
        settings.path.mkdir(parents=True, exist_ok=True)
        id_file = settings.path / "id"
        if not id_file.exists():
            atomic_write(id_file, uuid.uuid4().hex[:16].encode())
        self.id = id_file.read_text().strip()
        self._logs: dict[int, Log] = {}
        for directory in sorted(settings.path.glob("p[0-9]")):
            self._logs[int(directory.name[1:])] = self._recover(directory)
        self._size = self._bytes()  # kept up to date: not summed for every record written

    # recovery ----------------------------------------------------------------------------

    def _recover(self, directory: Path) -> Log:
        lg = Log(directory)
        acked_file = directory / "acked"
        if acked_file.exists():
            lg.acked = lg.synced = struct.unpack("<Q", acked_file.read_bytes()[:8])[0]
        paths = sorted(directory.glob("*.seg"), key=lambda p: int(p.stem))
        for i, path in enumerate(paths):
            first = int(path.stem)
            last, good_size = self._scan(path, first, final=i == len(paths) - 1)
            lg.segments.append(Segment(first, path, good_size, last))
        if lg.segments:
            lg.next_seq = lg.segments[-1].last + 1
        lg.next_seq = max(lg.next_seq, lg.acked + 1)
        self._seek(lg, lg.acked)
        return lg

    def _scan(self, path: Path, first: int, *, final: bool) -> tuple[int, int]:
        """The last good seq and the good length of a segment; a torn tail is cut off."""
        data = path.read_bytes()
        offset, last = 0, first - 1
        while offset < len(data):
            record = parse_record(data, offset)
            if record is None or record[0] != last + 1:
                what = "a torn record" if final else "a corrupt record"
                log.error("outbox %s: %s at byte %d (after seq %d): cutting %d bytes off",
                          path, what, offset, last, len(data) - offset)  # fmt: skip
                self.counts.truncated += 1
                with path.open("r+b") as f:
                    f.truncate(offset)
                    f.flush()
                    os.fsync(f.fileno())
                break
            last, offset = record[0], record[2]
        return last, offset

    def _seek(self, lg: Log, acked: int) -> None:
        """Put the read cursor on the first record after `acked`."""
        lg.ahead = None
        for i, seg in enumerate(lg.segments):
            if seg.last <= acked:
                continue
            offset = 0
            if seg.first <= acked:
                data = seg.path.read_bytes()
                while offset < len(data):
                    parsed = parse_record(data, offset)
                    assert parsed is not None
                    if parsed[0] > acked:
                        break
                    offset = parsed[2]
            lg.cursor = (i, offset)
            return
        # everything acknowledged: the next record will be appended to the last segment
        lg.cursor = (len(lg.segments) - 1, lg.segments[-1].size) if lg.segments else (0, 0)

    # writing -----------------------------------------------------------------------------

    def write(self, results: Sequence[tuple[StreamKey, SensorUpdate]]) -> None:
        """Append a batch (the unit's result sink). Returns once it is as durable as the
        fsync policy says; waits while full for block streams; refuses (counts and logs)
        the records of reject-new streams while full."""
        self.append([(k, u, encode_update(u)) for k, u in results])

    def append(self, items: Sequence[tuple[StreamKey, SensorUpdate, bytes]]) -> int:
        """Append; the number refused (reject-new streams, outbox full). On an OSError (the
        disk full, say) nothing of this call is left behind that was not already durable:
        the logs are cut back to where they were, and the caller may simply try again."""
        now = int(self.clock() * 1000)
        rejected = 0
        with self._lock:
            touched: set[int] = set()
            marks: dict[int, tuple[int, int, int, int, int]] = {}
            try:
                for key, update, body in items:
                    policy = self._policies.get(key)
                    if policy is None:  # the patterns matched once per stream, not per record
                        if len(self._policies) > 100_000:
                            self._policies.clear()
                        policy = self._policies[key] = self.settings.policy(key)
                    frame_body = msgpack.packb([key.so, key.stream, now, update.last_update, body])
                    size = HEADER.size + len(frame_body)
                    while self._size + size > self.settings.max_bytes:
                        if policy.when_full == "reject":
                            break
                        self._flush(touched)  # what is written so far is durable before we wait
                        touched.clear()
                        marks.clear()
                        log.warning("outbox full (%d bytes): waiting for the forwarder",
                                    self.settings.max_bytes)  # fmt: skip
                        self._lock.wait(1.0)
                        if self._closed:
                            raise OutboxFull("the outbox closed while waiting for space")
                    else:
                        if policy.priority not in marks:
                            marks[policy.priority] = self._mark(policy.priority)
                        self._append(policy.priority, frame_body)
                        touched.add(policy.priority)
                        self.counts.written += 1
                        continue
                    rejected += 1
                    self.counts.rejected += 1
                self._flush(touched)
            except OSError:
                self._roll_back(marks)
                raise
            self._lock.notify_all()
        for watcher in self._watchers:
            watcher()
        if rejected:
            log.warning("outbox full: refused %d records of reject-new streams", rejected)
        return rejected

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` after every write (in the writer's thread: it must not block), as
        a reader on an event loop is woken; the function returned stops it."""
        self._watchers = [*self._watchers, callback]

        def unwatch() -> None:
            self._watchers = [w for w in self._watchers if w is not callback]

        return unwatch

    def _mark(self, priority: int) -> tuple[int, int, int, int, int]:
        """Where a log stands: segments, the last one's size and last seq, next seq, written."""
        lg = self._log(priority)
        last = lg.segments[-1] if lg.segments else None
        return (len(lg.segments), last.size if last else 0, last.last if last else 0,
                lg.next_seq, self.counts.written)  # fmt: skip

    def _roll_back(self, marks: dict[int, tuple[int, int, int, int, int]]) -> None:
        """Cut each log back to its mark: records appended since are gone from the disk
        (some may have reached it before the write failed) and from the counts."""
        for priority, (n, size, last, next_seq, written) in marks.items():
            lg = self._logs[priority]
            if lg.tail is not None:
                try:
                    lg.tail.close()  # its buffer cannot be written; the file is closed anyway
                except OSError:
                    pass
                lg.tail = None
            for seg in lg.segments[n:]:
                seg.path.unlink(missing_ok=True)
            del lg.segments[n:]
            if n:
                seg = lg.segments[-1]
                with seg.path.open("r+b") as f:
                    f.truncate(size)
                seg.size, seg.last = size, last
            lg.next_seq = next_seq
            lg.ahead = None
            self.counts.written = min(self.counts.written, written)
        self._size = self._bytes()
        if marks:
            log.error("outbox: a write failed; %d logs cut back to their last durable record",
                      len(marks))  # fmt: skip

    def _log(self, priority: int) -> Log:
        lg = self._logs.get(priority)
        if lg is None:
            directory = self.settings.path / f"p{priority}"
            directory.mkdir(exist_ok=True)
            fsync_dir(self.settings.path)
            lg = self._logs[priority] = Log(directory)
        return lg

    def _append(self, priority: int, body: bytes) -> None:
        lg = self._log(priority)
        seq = lg.next_seq
        if not lg.segments or lg.segments[-1].size >= self.settings.segment_bytes:
            if lg.tail is not None:
                lg.tail.close()
                lg.tail = None
            path = lg.directory / f"{seq:020d}.seg"
            path.touch()
            fsync_dir(lg.directory)
            lg.segments.append(Segment(seq, path, 0, seq - 1))
        seg = lg.segments[-1]
        if lg.tail is None:
            lg.tail = seg.path.open("ab")
        crc = zlib.crc32(body, zlib.crc32(_SEQ.pack(seq)))  # the sequence number, then the body
        lg.tail.write(HEADER.pack(len(body), crc, seq))
        lg.tail.write(body)
        size = HEADER.size + len(body)
        seg.size += size
        self._size += size
        seg.last = seq
        lg.next_seq = seq + 1

    def _flush(self, priorities: set[int]) -> None:
        policy = self.settings.fsync
        due = policy == "batch" or (
            policy == "interval"
            and (self.clock() - self._last_fsync) * 1000 >= self.settings.fsync_interval
        )
        for p in priorities:
            tail = self._logs[p].tail
            if tail is not None:
                tail.flush()
                if due:
                    os.fsync(tail.fileno())
        if due:
            self._last_fsync = self.clock()

    def _bytes(self) -> int:
        return sum(s.size for lg in self._logs.values() for s in lg.segments)

    # reading -----------------------------------------------------------------------------

    def read(self, limit: int = 500, wait: float = 0.0) -> list[Record]:
        """The next records not yet read: all from the most urgent priority that has any,
        in order. Expired records are skipped (and counted). With nothing to read, wait up to
        `wait` seconds for a write (a reader woken by the write, not polling)."""
        deadline = time.monotonic() + wait
        with self._lock:
            while True:
                for priority in sorted(self._logs):
                    lg = self._logs[priority]
                    if lg.tail is not None:
                        lg.tail.flush()
                    records = self._read(priority, lg, limit)
                    if records:
                        return records
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return []
                self._lock.wait(left)

    def _read(self, priority: int, lg: Log, limit: int) -> list[Record]:
        out: list[Record] = []
        expired, last_expired = 0, 0
        horizon = None if self.settings.ttl is None else self.clock() * 1000 - self.settings.ttl
        index, offset = lg.cursor
        while len(out) < limit and index < len(lg.segments):
            seg = lg.segments[index]
            if offset >= seg.size:
                if index + 1 == len(lg.segments):
                    break  # at the end of the segment being written: wait here for more
                index, offset = index + 1, 0
                continue
            data = self._chunk(lg, seg, offset)
            pos = 0
            while pos < len(data) and len(out) < limit:
                parsed = parse_record(data, pos)
                if parsed is None:
                    break  # the rest of a record beyond this read: read again from here
                seq, body, end = parsed
                so, stream, enqueued, last_update, update = msgpack.unpackb(body)
                if horizon is not None and enqueued < horizon:
                    expired, last_expired = expired + 1, seq
                else:
                    out.append(Record(priority, seq, StreamKey(so, stream), enqueued,
                                      last_update, update))  # fmt: skip
                pos = end
            # what was read and not parsed waits for the next read: each byte is read once
            lg.ahead = (seg.first, offset + pos, data[pos:]) if pos < len(data) else None
            if pos == 0:
                break
            offset += pos
        lg.cursor = (index, offset)
        if expired:
            self.counts.expired += expired
            log.warning("outbox: %d records of priority %d expired (older than ttl %d ms)",
                        expired, priority, self.settings.ttl)  # fmt: skip
            if not out:  # nothing after them to acknowledge: free them now
                self.counts.acked -= last_expired - lg.acked
                self._acknowledge(lg, last_expired)
        return out

    @staticmethod
    def _chunk(lg: Log, seg: Segment, offset: int) -> bytes:
        """Bytes of `seg` from `offset`: what an earlier read left over, else at most
        READ_AHEAD (or one whole record, if larger) from the file. Draining a backlog reads
        each byte once, whatever the batch size."""
        ahead = lg.ahead
        fits = ahead is not None and ahead[0] == seg.first and ahead[1] == offset
        data = ahead[2] if ahead is not None and fits else b""
        size = record_size(data, 0)
        if size is not None and size <= len(data):
            return data  # a whole record (at least) is here already
        available = seg.size - offset
        with seg.path.open("rb") as f:
            f.seek(offset + len(data))
            data += f.read(max(0, min(READ_AHEAD, available) - len(data)))
            size = record_size(data, 0)
            if size is not None and len(data) < size <= MAX_RECORD + HEADER.size:
                data += f.read(min(size, available) - len(data))  # all of a larger record
        return data

    def ack(self, records: Sequence[Record]) -> None:
        """The cloud has these (in order per priority): free what is no longer needed.

        The new position counts at once (reads, depth) and is made durable when
        `ack_sync_interval` has passed since it last was, or when a segment can be deleted
        (a segment is deleted only once the durable position is past it); otherwise by the
        next acknowledgement, `sync_acks` or `close`. Made durable without holding the lock
        the unit's writes take: at low rates an acknowledgement follows every few records,
        and fsyncs under that lock were the unit's longest wait (measured: a third of the
        device-to-Kafka latency at 1,000 updates/s). Acknowledgements are serialised among
        themselves."""
        through: dict[int, int] = {}
        for r in records:
            through[r.priority] = max(through.get(r.priority, 0), r.seq)
        with self._acking:
            with self._lock:
                for p, seq in through.items():
                    lg = self._logs[p]
                    if seq > lg.acked:
                        self.counts.acked += seq - lg.acked
                        lg.acked = seq
                release = any(len(lg.segments) > 1 and lg.segments[0].last <= lg.acked
                              for lg in self._logs.values())  # fmt: skip
            if release or self.acks_due():
                self._sync_acks()

    def acks_due(self) -> bool:
        """Whether a position acknowledged is not durable yet and `ack_sync_interval` has
        passed since the last time positions were made durable (a look, without a lock)."""
        waited = (self.clock() - self._acks_synced_at) * 1000
        behind = any(lg.acked > lg.synced for lg in list(self._logs.values()))
        return behind and waited >= self.settings.ack_sync_interval

    def sync_acks(self) -> None:
        """Make the acknowledged positions durable now (the forwarder calls this when idle,
        so a position is not left behind when acknowledgements stop)."""
        with self._acking:
            self._sync_acks()

    def _sync_acks(self) -> None:  # holding _acking
        with self._lock:
            behind = [(lg, lg.acked) for lg in self._logs.values() if lg.acked > lg.synced]
        self._acks_synced_at = self.clock()
        for lg, seq in behind:
            atomic_write(lg.directory / "acked", struct.pack("<Q", seq))
        with self._lock:
            released = []
            for lg, seq in behind:
                lg.synced = max(lg.synced, seq)
                if self._release(lg):
                    released.append(lg)
            self._lock.notify_all()
        for lg in released:
            fsync_dir(lg.directory)

    def _acknowledge(self, lg: Log, seq: int) -> None:
        """`ack` under the lock (records skipped as expired, while reading)."""
        if seq <= lg.acked:
            return
        self.counts.acked += seq - lg.acked
        lg.acked = lg.synced = seq
        atomic_write(lg.directory / "acked", struct.pack("<Q", seq))
        if self._release(lg):
            fsync_dir(lg.directory)

    def _release(self, lg: Log) -> bool:
        """Delete segments acknowledged durably (never the one being written); whether any
        was (the caller makes the deletion durable: `fsync_dir`)."""
        released = False
        while len(lg.segments) > 1 and lg.segments[0].last <= lg.synced:
            seg = lg.segments.pop(0)
            seg.path.unlink()
            self._size -= seg.size
            index, offset = lg.cursor
            lg.cursor = (max(0, index - 1), offset if index > 0 else 0)
            released = True
        return released

    def rewind(self) -> None:
        """Read again from the first unacknowledged record (after a failed send), so a
        replay is in order."""
        with self._lock:
            for lg in self._logs.values():
                self._seek(lg, lg.acked)

    # status ------------------------------------------------------------------------------

    def depth(self) -> int:
        with self._lock:
            return sum(lg.pending for lg in self._logs.values())

    def depth_by_priority(self) -> dict[int, int]:
        with self._lock:
            return {p: lg.pending for p, lg in self._logs.items()}

    def size(self) -> int:
        with self._lock:
            return self._size

    def oldest_age(self) -> float:
        """Seconds since the oldest unacknowledged record was written (0 when empty)."""
        with self._lock:
            oldest = None
            for lg in self._logs.values():
                if lg.pending <= 0:
                    continue
                for seg in lg.segments:
                    if seg.last <= lg.acked:
                        continue
                    with seg.path.open("rb") as f:
                        data = f.read(min(seg.size, 1 << 20))
                    pos = 0
                    while pos < len(data):
                        parsed = parse_record(data, pos)
                        if parsed is None:
                            break
                        if parsed[0] > lg.acked:
                            enqueued = msgpack.unpackb(parsed[1])[2]
                            oldest = enqueued if oldest is None else min(oldest, enqueued)
                            break
                        pos = parsed[2]
                    break
            return 0.0 if oldest is None else max(0.0, self.clock() - oldest / 1000)

    def close(self) -> None:
        self.sync_acks()
        with self._lock:
            self._closed = True
            for lg in self._logs.values():
                if lg.tail is not None:
                    lg.tail.flush()
                    os.fsync(lg.tail.fileno())
                    lg.tail.close()
                    lg.tail = None
            self._lock.notify_all()
