"""The unit's inbox (`processors.inbox`): in order, bounded in memory, the rest on disk; and the
slices its outputs go out in, bounded the same way."""

from __future__ import annotations

import errno
import logging
import os
import queue
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from processors.inbox import Inbox, _size
from streams import kernels


def _messages(start: int, count: int, size: int = 1000, qos: int = 1) -> list[Any]:
    return [
        kernels.Publish(f"so-{i % 7}/streams/data", bytes([i % 251]) * size, qos, i % 5 == 0,
                        (i % 65_535) + 1 if qos else 0, "application/json" if i % 3 else None,
                        1_700_000_000_000 + i)
        for i in range(start, start + count)
    ]  # fmt: skip


def _fields(m: Any) -> tuple[Any, ...]:
    return (m.topic, m.payload, m.qos, m.dup, m.packet_id, m.content_type, m.received_at)


def _drain(inbox: Inbox) -> list[Any]:
    got: list[Any] = []
    while True:
        try:
            got += inbox.get_nowait()
        except queue.Empty:
            return got


def test_past_its_memory_the_rest_waits_in_an_unlinked_file_and_comes_back_in_order(
    tmp_path: Path,
) -> None:
    spilled: list[int] = []
    inbox = Inbox(50_000, tmp_path, spilled.append)
    sent, peak = [], 0
    for n in range(100):  # 100 lists of 10 messages, 1,000-byte payloads: ~1.2 MB
        batch = _messages(n * 10, 10)
        sent += batch
        inbox.put(batch)
        peak = max(peak, inbox.held_bytes)
    one = _size(_messages(0, 10))
    assert peak == 4 * one  # the lists that fit in 50,000 bytes
    assert inbox.spilled == sum(spilled) == 1000 - 40
    assert list(tmp_path.iterdir()) == []  # the file is unlinked: gone with the process
    assert inbox.spill_bytes > 1_000_000
    got = _drain(inbox)
    assert [_fields(m) for m in got] == [_fields(m) for m in sent]
    assert type(got[-1]) is type(sent[-1])  # the kernel's own Publish, compiled or twin
    assert inbox.held_bytes == inbox.spill_bytes == 0
    inbox.put(_messages(0, 10))  # drained: memory again
    assert inbox.spilled == 960 and inbox.held_bytes == one
    inbox.close()


def test_one_list_larger_than_the_memory_is_still_taken_in_memory(tmp_path: Path) -> None:
    inbox = Inbox(1000, tmp_path)
    big = _messages(0, 50)
    inbox.put(big)
    assert inbox.spilled == 0 and inbox.held_bytes == _size(big)
    inbox.put(_messages(50, 1))  # but nothing beside it
    assert inbox.spilled == 1
    assert [m.received_at for m in _drain(inbox)] == [m.received_at for m in _messages(0, 51)]


def test_a_producer_and_a_consumer_thread_keep_the_order(tmp_path: Path) -> None:
    """The network thread puts while the worker takes, as in a unit: every message once, in
    the order put, whatever share of them went through the file."""
    rng = random.Random(7)
    lists = [_messages(i * 40, rng.randint(1, 40), rng.randint(10, 3000), rng.choice((0, 1)))
             for i in range(400)]  # fmt: skip
    inbox = Inbox(50_000, tmp_path)
    got: list[Any] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set() or inbox.held_bytes or inbox.spill_bytes:
            try:
                got.extend(inbox.get(0.01))
            except queue.Empty:
                continue
            if rng.random() < 0.05:
                threading.Event().wait(0.002)  # a slow batch now and then: the file fills

    worker = threading.Thread(target=consume)
    worker.start()
    for i, batch in enumerate(lists):
        inbox.put(batch)
        if i % 50 == 0:
            inbox.wake()  # wake-ups anywhere in the stream change nothing
    done.set()
    worker.join(30)
    assert [_fields(m) for m in got] == [_fields(m) for batch in lists for m in batch]
    assert inbox.spilled > 0  # the file was used
    inbox.close()


def test_when_the_file_cannot_be_written_messages_stay_in_memory_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk: what cannot go to the file stays in memory (better than losing it or
    stopping), after what the file holds; said once."""
    inbox = Inbox(5_000, tmp_path)
    sent: list[Any] = []

    def put(batch: list[Any]) -> None:
        sent.extend(batch)
        inbox.put(batch)

    for n in range(6):  # some in memory, some in the file
        put(_messages(n * 4, 4))
    assert inbox.spilled > 0
    real = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.ERROR, logger="processors.inbox"):
        for n in range(6, 12):
            put(_messages(n * 4, 4))
    assert caplog.text.count("cannot write the inbox's spill file") == 1
    got = inbox.get_nowait() + inbox.get_nowait()  # the oldest, from memory
    monkeypatch.setattr(os, "pwrite", real)  # space again
    for n in range(12, 14):
        put(_messages(n * 4, 4))
    got += _drain(inbox)
    assert [_fields(m) for m in got] == [_fields(m) for m in sent]
    inbox.put(_messages(0, 1))
    assert inbox.spill_bytes == 0 and inbox.held_bytes == _size(_messages(0, 1))
    inbox.close()


def test_with_no_folder_to_write_it_keeps_everything_in_memory(tmp_path: Path) -> None:
    inbox = Inbox(1_000, tmp_path / "missing")
    sent = _messages(0, 30)
    for i in range(0, 30, 3):
        inbox.put(sent[i : i + 3])
    assert inbox.spill_failed and inbox.spilled == 0
    assert [_fields(m) for m in _drain(inbox)] == [_fields(m) for m in sent]


def test_a_wake_up_is_an_empty_list_and_get_waits_at_most_its_timeout(tmp_path: Path) -> None:
    inbox = Inbox(1_000_000, tmp_path)
    inbox.wake()
    assert inbox.get(1.0) == []
    with pytest.raises(queue.Empty):
        inbox.get(0.01)


def test_outputs_go_out_in_slices_bounded_in_count_and_bytes() -> None:
    """The unit's publish slices (`processors.runtime._slices`): in order, each within both
    limits, one message at least however large."""
    from processors.runtime import _slices

    messages = [(f"t/{i}", b"x" * size) for i, size in enumerate([10, 20, 30, 500, 5, 5, 5, 5])]
    parts = list(_slices(messages, 3, 50))
    assert [[t for t, _ in p] for p in parts] == [
        ["t/0", "t/1"], ["t/2"], ["t/3"], ["t/4", "t/5", "t/6"], ["t/7"],
    ]  # fmt: skip
    assert [m for p in parts for m in p] == messages
    assert list(_slices([], 3, 50)) == []
