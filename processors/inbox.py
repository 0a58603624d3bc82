"""What a unit's network thread received and its worker has not taken yet: in order, and
bounded in memory whatever the broker sends.

A broker sends at most our receive maximum of unacknowledged QoS 1 messages, and the unit
acknowledges them only once processed: that would bound the inbox. Mosquitto 2.0.11 does not
keep to it while it drains a backlog (its in-flight quota is miscounted, fixed in 2.0.13): a
unit with a receive maximum of 1,000 was measured holding 37,000 messages (160 MB) of a
40,000-message backlog. QoS 0 messages have no such limit at all. So past `memory` bytes, what
arrives is appended to a temporary file (unlinked at once: it goes with the process), and read
back, in order, once what is in memory has been taken. Nothing in it was acknowledged, so a
crash loses nothing: the broker sends it all again.

Why not leave the socket unread instead (TCP backpressure): the broker's PUBACKs for what the
unit publishes come on that socket, and the worker waits for them before it can take more.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import struct
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from streams import kernels

log = logging.getLogger(__name__)

Message = Any  # a `streams.kernels.Publish`
OVERHEAD = 200  # bytes a received message costs beside its payload and topic (its object)
_LENGTH = struct.Struct("<I")


def _size(messages: list[Message]) -> int:
    return sum([len(m.payload) + len(m.topic) for m in messages]) + OVERHEAD * len(messages)


class Inbox:
    """A FIFO of message lists: `put` from the network thread (never blocks), `get` from the
    worker. At most `memory` bytes of them are held in memory (one list at least); the rest
    waits in a file in `directory` (the system's temporary folder when None)."""

    def __init__(
        self,
        memory: int,
        directory: Path | None = None,
        on_spill: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.memory = memory
        self.directory = directory
        self.on_spill = on_spill  # called with the number of messages written to the file
        self._queue: queue.SimpleQueue[tuple[list[Message], int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._bytes = 0  # in memory (in the queue)
        self._fd = -1  # the spill file, opened when first needed
        self._written = 0  # the file's end: what was spilled
        self._read = 0  # how far the worker has read it back
        # lists that came after the file's while it could not be written (disk full): they
        # wait in memory, after it, in order
        self._after: deque[tuple[list[Message], int]] = deque()
        self.spilled = 0  # messages written to the file, in all
        self.spill_failed = False  # the file could not be written (disk full): kept in memory

    @property
    def held_bytes(self) -> int:
        """Bytes in memory now (an estimate: payloads, topics and a fixed cost per message)."""
        return self._bytes

    @property
    def spill_bytes(self) -> int:
        """Bytes in the file not read back yet."""
        return self._written - self._read

    def wake(self) -> None:
        """Wake the worker waiting in `get` (it gets an empty list)."""
        self._queue.put(([], 0))

    def put(self, messages: list[Message]) -> None:
        size = _size(messages)
        with self._lock:
            behind = self._written > self._read or bool(self._after)  # after the file's
            if behind or (self._bytes and self._bytes + size > self.memory):
                if not self._after and self._spill(messages):
                    self._queue.put(([], 0))  # wake the worker: the file has more
                    return
                if self._written > self._read or self._after:
                    self._after.append((messages, size))
                    self._bytes += size
                    self._queue.put(([], 0))
                    return
            self._bytes += size
            self._queue.put((messages, size))

    def get(self, timeout: float) -> list[Message]:
        """The oldest list; raises `queue.Empty` after `timeout` seconds without one."""
        try:
            return self.get_nowait()
        except queue.Empty:
            pass
        messages, size = self._queue.get(timeout=timeout)
        if size:
            with self._lock:
                self._bytes -= size
        return messages

    def get_nowait(self) -> list[Message]:
        with self._lock:
            try:
                messages, size = self._queue.get_nowait()
            except queue.Empty:
                if self._written == self._read:
                    if not self._after:
                        raise
                    messages, size = self._after.popleft()
                    self._bytes -= size
                    return messages
                record = self._unspill()
            else:
                self._bytes -= size
                return messages
        return [kernels.Publish(*fields) for fields in msgpack.unpackb(record, use_list=False)]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # under the lock ------------------------------------------------------------------------

    def _spill(self, messages: list[Message]) -> bool:
        """Append `messages` to the file; False if it cannot be written (they stay in
        memory, which is better than losing them or stopping)."""
        body = msgpack.packb(
            [(m.topic, m.payload, m.qos, m.dup, m.packet_id, m.content_type, m.received_at)
             for m in messages]
        )  # fmt: skip
        try:
            if self._fd < 0:
                self._fd = _unlinked_file(self.directory)
                log.warning(
                    "the broker sent more than this unit holds in memory (%d bytes): the"
                    " rest waits in a temporary file until it is taken (a broker bug:"
                    " Mosquitto 2.0.11 overruns a unit's receive maximum draining a backlog)",
                    self.memory,
                )
            record = _LENGTH.pack(len(body)) + body
            if os.pwrite(self._fd, record, self._written) != len(record):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            if not self.spill_failed:
                log.error("cannot write the inbox's spill file (%s): kept in memory", exc)
                self.spill_failed = True
            return False
        self.spill_failed = False
        self._written += _LENGTH.size + len(body)
        self.spilled += len(messages)
        self.on_spill(len(messages))
        return True

    def _unspill(self) -> bytes:
        (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, self._read))
        record = os.pread(self._fd, length, self._read + _LENGTH.size)
        if len(record) != length:
            raise OSError(f"the inbox's spill file is short: {len(record)} of {length} bytes")
        self._read += _LENGTH.size + length
        if self._read == self._written:  # all read back: the file starts again, empty
            os.ftruncate(self._fd, 0)
            self._read = self._written = 0
        return record


def _unlinked_file(directory: Path | None) -> int:
    """A file only this process can reach, gone when it exits (however it exits)."""
    fd, path = tempfile.mkstemp(prefix="cloudlet-inbox-", dir=directory)
    os.unlink(path)
    return fd
