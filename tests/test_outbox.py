"""The outbox: order per priority, durability across restarts and SIGKILL, torn tails, full
policies, ttl, segment release."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.outbox import Outbox, OutboxSettings, Record
from cloud_sync.segments import READ_AHEAD
from streams import SensorUpdate, StreamKey, encode_update

T0 = 1_700_006_400_000
SOIL, ALERT = StreamKey("field-1-soil", "soil"), StreamKey("field-1-soil", "alert")


def settings(path: Path, **extra: Any) -> OutboxSettings:
    return OutboxSettings.model_validate({
        "path": path, "streams": [{"match": "*/alert", "priority": 0, "when_full": "reject"}],
        **extra,
    })  # fmt: skip


def updates(key: StreamKey, n: int, start: int = 0) -> list[tuple[StreamKey, SensorUpdate]]:
    return [(key, SensorUpdate({"x": i}, T0 + i)) for i in range(start, start + n)]


def drain(outbox: Outbox, ack: bool = True) -> list[Record]:
    out: list[Record] = []
    while batch := outbox.read(100):
        out += batch
        if ack:
            outbox.ack(batch)
    return out


def test_alerts_first_and_each_stream_in_order(tmp_path: Path) -> None:
    outbox = Outbox(settings(tmp_path))
    outbox.write(updates(SOIL, 5))
    outbox.write(updates(ALERT, 2))
    outbox.write(updates(SOIL, 3, start=5))
    got = drain(outbox)
    assert [(r.key.stream, r.last_update - T0) for r in got] == [
        ("alert", 0), ("alert", 1), *(("soil", i) for i in range(8))]  # fmt: skip
    assert outbox.depth() == 0 and outbox.counts.written == 10
    first = got[0].message_id("farm")
    assert first.startswith(f"farm/field-1-soil/alert/{T0}/")
    # the same update written again (a unit reprocessing after a crash) has the same id
    outbox.write(updates(ALERT, 1))
    assert drain(outbox)[0].message_id("farm") == first


def test_a_restart_resends_what_was_not_acknowledged(tmp_path: Path) -> None:
    outbox = Outbox(settings(tmp_path))
    outbox.write(updates(SOIL, 10))
    first = outbox.read(4)
    outbox.ack(first)
    outbox.read(4)  # read, never acknowledged: the cloud may not have them
    outbox.close()
    again = Outbox(settings(tmp_path))
    assert again.id == outbox.id
    again.write(updates(SOIL, 1, start=10))
    assert [r.seq for r in drain(again)] == list(range(5, 12))


def test_after_a_restart_with_everything_acknowledged_new_records_are_read(
    tmp_path: Path,
) -> None:
    outbox = Outbox(settings(tmp_path))
    outbox.write(updates(SOIL, 5))
    drain(outbox)
    outbox.close()
    again = Outbox(settings(tmp_path))
    again.write(updates(SOIL, 3, start=5))
    assert [r.seq for r in drain(again)] == [6, 7, 8]


def test_reading_keeps_up_with_appends_to_the_same_segment(tmp_path: Path) -> None:
    outbox = Outbox(settings(tmp_path))
    seen = []
    for i in range(5):
        outbox.write(updates(SOIL, 3, start=3 * i))
        batch = outbox.read(100)
        outbox.ack(batch)
        seen += [r.seq for r in batch]
    assert seen == list(range(1, 16))


def test_draining_reads_each_byte_once_and_records_larger_than_a_read(tmp_path: Path) -> None:
    """A backlog drained in batches of random sizes while more is appended, with records
    larger than one read of a segment (256 KiB) among small ones: every record once, in
    order, and the files read about once (reading used to restart at the cursor and read to
    the end of the segment on every call: 752 MB read to drain 14 MB)."""
    outbox = Outbox(settings(tmp_path, fsync="never"))
    big = SensorUpdate({"blob": "x" * (READ_AHEAD + 1000)}, T0)
    rng = random.Random(3)
    expected: list[bytes] = []

    def write(batch: list[tuple[StreamKey, SensorUpdate]]) -> None:
        outbox.write(batch)
        expected.extend(encode_update(u) for _, u in batch)

    for i in range(30):
        batch = [(SOIL, SensorUpdate({"x": j}, T0 + j)) for j in range(rng.randint(1, 400))]
        if i % 4 == 1:
            batch.insert(rng.randrange(len(batch)), (SOIL, big))
        write(batch)
    size = outbox.size()
    before, got = _bytes_read(), []
    while batch := outbox.read(rng.randint(1, 50)):
        got += batch
        outbox.ack(batch)
        if len(got) % 7 == 0:  # appended to the segment being read
            write([(SOIL, SensorUpdate({"x": len(got)}, T0 + 1))])
    read = _bytes_read() - before
    assert [r.body for r in got] == expected
    assert [r.seq for r in got] == list(range(1, len(expected) + 1))
    assert size < read < 1.2 * size, (read, size)


def _bytes_read() -> int:
    return int(Path("/proc/self/io").read_text().split("rchar: ")[1].split()[0])


def test_rewind_replays_in_order(tmp_path: Path) -> None:
    outbox = Outbox(settings(tmp_path))
    outbox.write(updates(SOIL, 6))
    outbox.ack(outbox.read(2))
    assert [r.seq for r in outbox.read(3)] == [3, 4, 5]
    outbox.rewind()  # the send failed
    assert [r.seq for r in outbox.read(10)] == [3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_tail_is_cut_and_logged(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(settings(tmp_path))
    outbox.write(updates(SOIL, 5))
    outbox.close()
    (segment,) = (tmp_path / "p5").glob("*.seg")
    data = segment.read_bytes()
    if damage == "torn":
        segment.write_bytes(data + data[-30:-3])  # half a record more, as a power loss leaves
    else:
        segment.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    again = Outbox(settings(tmp_path))
    assert again.counts.truncated == 1
    assert "cutting" in caplog.text and str(segment) in caplog.text
    kept = 5 if damage == "torn" else 4
    again.write(updates(SOIL, 1, start=9))
    assert [(r.seq, r.last_update - T0) for r in drain(again)] == [
        *((i + 1, i) for i in range(kept)), (kept + 1, 9)]  # fmt: skip


def test_full_rejects_new_alerts_and_blocks_telemetry_until_space(tmp_path: Path) -> None:
    outbox = Outbox(settings(tmp_path, max_bytes=65_536, segment_bytes=4_096))
    while outbox.size() < 65_536 - 4_096:
        outbox.write(updates(SOIL, 20))
    outbox.write(updates(ALERT, 200))  # reject-new: what does not fit is refused, counted
    assert outbox.counts.rejected > 0
    written = outbox.counts.written
    done = threading.Event()

    def blocked() -> None:
        outbox.write(updates(SOIL, 200))
        done.set()

    writer = threading.Thread(target=blocked)
    writer.start()
    assert not done.wait(0.5)  # waits: backpressure, not loss
    drain(outbox)
    assert done.wait(10)
    writer.join()
    assert outbox.counts.written == written + 200


def test_old_records_expire_counted_and_freed(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = Outbox(settings(tmp_path, ttl="1h", segment_bytes=4_096), clock=lambda: now[0])
    outbox.write(updates(SOIL, 100))
    now[0] += 3601
    outbox.write(updates(SOIL, 2, start=100))
    assert [r.last_update - T0 for r in drain(outbox)] == [100, 101]
    assert outbox.counts.expired == 100
    assert len(list((tmp_path / "p5").glob("*.seg"))) == 1  # the rest released


def test_the_acknowledged_position_is_made_durable_at_most_every_interval(
    tmp_path: Path,
) -> None:
    """Within `ack_sync_interval` an acknowledgement counts but leaves the file alone; a crash
    then resends what was acknowledged since (the cloud stores each once by message id).
    The next acknowledgement after the interval, `sync_acks`, `close` and a segment that can be
    deleted make it durable; a segment is deleted only once the durable position is past it."""
    now = [1000.0]
    outbox = Outbox(settings(tmp_path, ack_sync_interval="2s", segment_bytes=4_096),
                    clock=lambda: now[0])  # fmt: skip
    position = tmp_path / "p5" / "acked"

    def durable() -> int:
        return int.from_bytes(position.read_bytes(), "little") if position.exists() else 0

    outbox.write(updates(SOIL, 10))
    outbox.ack(outbox.read(4))
    assert durable() == 4  # the first acknowledgement: nothing made durable for 2 s before
    outbox.ack(outbox.read(3))
    assert durable() == 4 and outbox.counts.acked == 7 and outbox.depth() == 3
    assert not outbox.acks_due()
    now[0] += 1.9
    outbox.ack(outbox.read(1))
    assert durable() == 4 and not outbox.acks_due()
    now[0] += 0.1
    assert outbox.acks_due()  # what the forwarder looks at when idle
    outbox.sync_acks()
    assert durable() == 8 and not outbox.acks_due()
    outbox.ack(outbox.read(1))
    assert durable() == 8
    # a crash now: from the durable position
    crashed = Outbox(settings(tmp_path), clock=lambda: now[0])
    assert [r.last_update - T0 for r in crashed.read(100)] == [8, 9]
    now[0] += 2
    outbox.ack(outbox.read(1))  # after the interval: at once
    assert durable() == 10
    # a segment that can be deleted makes the position durable first, whatever the interval
    for i in range(10):
        outbox.write(updates(SOIL, 50, start=10 + 50 * i))
    segments = len(list((tmp_path / "p5").glob("*.seg")))
    assert segments > 3
    outbox.ack(outbox.read(60))
    assert durable() == 70
    assert len(list((tmp_path / "p5").glob("*.seg"))) < segments
    now[0] += 1
    outbox.ack(outbox.read(5))
    outbox.close()  # and close, whatever the interval
    assert durable() == 75
    reopened = Outbox(settings(tmp_path), clock=lambda: now[0])
    assert [r.last_update - T0 for r in reopened.read(1)] == [75]


def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    outbox = Outbox(settings(tmp_path, segment_bytes=4_096))
    for i in range(20):
        outbox.write(updates(SOIL, 50, start=50 * i))
    assert len(list((tmp_path / "p5").glob("*.seg"))) > 10
    assert len(drain(outbox)) == 1000
    assert len(list((tmp_path / "p5").glob("*.seg"))) == 1
    assert outbox.depth() == 0 and outbox.oldest_age() == 0.0


def test_a_write_waits_for_no_acknowledgement_and_wakes_its_watchers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acknowledgement makes its position durable (fsyncs) without the lock the unit's
    writes take (it counts at once); a reader on an event loop is woken by every write
    (`watch`)."""
    import cloud_sync.outbox as module
    from cloud_sync.segments import atomic_write as real

    outbox = Outbox(settings(tmp_path))
    outbox.write(updates(SOIL, 10))
    records = outbox.read(100)
    durable, release = threading.Event(), threading.Event()

    def slow_atomic_write(path: Path, data: bytes) -> None:
        durable.set()
        assert release.wait(10)  # the acknowledgement's fsync, held up
        real(path, data)

    monkeypatch.setattr(module, "atomic_write", slow_atomic_write)
    acking = threading.Thread(target=outbox.ack, args=(records,))
    acking.start()
    assert durable.wait(10)
    woken: list[int] = []
    unwatch = outbox.watch(lambda: woken.append(outbox.depth()))
    outbox.write(updates(SOIL, 5, start=10))  # not blocked by the acknowledgement under way
    assert woken == [5] and outbox.counts.acked == 10
    assert not (tmp_path / "p5" / "acked").exists()  # not durable yet
    release.set()
    acking.join(10)
    assert outbox.counts.acked == 10 and outbox.depth() == 5
    unwatch()
    outbox.write(updates(SOIL, 1, start=15))
    assert woken == [5]
    assert (tmp_path / "p5" / "acked").read_bytes() == (10).to_bytes(8, "little")
    monkeypatch.undo()
    reopened = Outbox(settings(tmp_path))  # after a restart: from the durable position
    assert [r.last_update for r in drain(reopened)] == [T0 + i for i in range(10, 16)]


WRITER = """
import sys
from pathlib import Path
from cloud_sync.outbox import Outbox, OutboxSettings
from streams import SensorUpdate, StreamKey
outbox = Outbox(OutboxSettings(path=Path(sys.argv[1]), segment_bytes=8192))
n = int(sys.argv[2])
while True:
    outbox.write([(StreamKey("s", "d"), SensorUpdate({"x": n + i}, n + i)) for i in range(50)])
    n += 50
    print(n, flush=True)  # everything before n is durable
"""


def test_sigkill_at_any_point_loses_nothing_written(tmp_path: Path) -> None:
    rng = random.Random(7)
    durable = 0
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(durable)],
                                  stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path.cwd())})  # fmt: skip
        assert writer.stdout is not None
        deadline = time.monotonic() + rng.uniform(0.3, 1.0)
        while time.monotonic() < deadline:
            line = writer.stdout.readline()
            if line:
                durable = max(durable, int(line))
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        for line in writer.stdout.read().split():
            durable = max(durable, int(line))  # printed before the kill
        # what the next run appends continues after what is on disk
        durable = max(durable, len(drain(Outbox(OutboxSettings(path=tmp_path)), ack=False)))
    values = [r.last_update for r in drain(Outbox(OutboxSettings(path=tmp_path)), ack=False)]
    assert values == sorted(values)
    assert values[:durable] == list(range(durable))  # every durable record, once, in order
