"""Faults with exact accounting: the broker restarting (gracefully or killed) while a unit
holds processed but unacknowledged messages, the disk filling up under the outbox, a poison
record in front of the cloud service's consumer and a PostgreSQL connection killed under it."""

from __future__ import annotations

import asyncio
import errno
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.outbox import Outbox, OutboxSettings
from cloud_sync.store import PostgresStore, SQLiteStore
from cloudlet.demo import scenario_dir
from cloudlet.rig import Kafka, Mosquitto, Postgres
from cloudlet.rig.process import free_port
from edge_objects.fleet import DeviceFleet
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from processors.config import UnitConfig
from processors.engine import engine_of
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings
from tests.test_cli import CLOUDLET
from tests.test_cloud import rejected
from tests.test_cloud_commands import produce

IRRIGATION = scenario_dir("irrigation")
T0 = 1_700_006_400_000


def _readings(steps: int) -> list[tuple[StreamKey, SensorUpdate]]:
    site = IrrigationSite.load(IRRIGATION / "site.yaml")
    model = IrrigationModel(site, seed=11, start_ms=T0)
    return [r for _ in range(steps) for r in model.step(60)]


@pytest.mark.mqtt
@pytest.mark.parametrize(
    ("how", "state"), [("restart", True), ("kill", True), ("restart", False), ("kill", False)]
)
def test_broker_restarts_redeliver_nothing_twice(tmp_path: Path, how: str, state: bool) -> None:
    """With a state store, messages stay processed but unacknowledged until the checkpoint (none
    before the end here, and 900 stay under the receive maximum): what every reconnect
    redelivers. Without one, inputs are acknowledged as their outputs are confirmed, while
    the next batches go on: the restarts land among outputs and acknowledgements in flight."""
    broker = Mosquitto(tmp_path / "broker", superuser=True).start()
    path = tmp_path / "unit.yaml"
    stored = {"state_dir": "state", "checkpoint": {"every": "10m", "messages": 100000}}
    path.write_bytes(orjson.dumps({
        "name": f"u-broker-{how}", "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": broker.url, "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5},
        "sink": {"sqlite": "results.db"}, **(stored if state else {}),
    }))  # fmt: skip
    readings = _readings(90)  # 900 updates, 9 ten-minute windows per field
    reference = engine_of(Catalog.load([IRRIGATION / "objects"]), clock=lambda: 0.0).process(
        readings
    )
    expected = Counter((k.so, k.stream, u.last_update) for k, u in reference.derived)
    expected.update((k.so, k.stream, u.last_update) for k, u in readings)
    unit = Unit(UnitConfig.load(path)).start()
    fleet = DeviceFleet(MqttSettings(url=broker.url), client_id=f"fleet-{how}").start()
    try:
        assert unit.runtime.connected.wait(10)
        for rounds in range(3):
            part = readings[rounds * 300 : (rounds + 1) * 300]
            for key, update in part:
                fleet.publish(key, update)
            assert fleet.flush(30)
            deadline = time.monotonic() + 20
            while (
                unit.runtime.published.messages + len(unit.runtime._unacked) < ((rounds + 1) * 300)
                and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            if state:
                assert unit.runtime._unacked, "nothing held for a checkpoint: it proves nothing"
            if how == "kill":
                time.sleep(1.5)  # the broker's autosave (1 s) has the queued messages
                broker.kill()
            else:
                broker.stop()
            broker.start()
            assert unit.runtime.connected.wait(20)
        deadline = time.monotonic() + 30
        while unit.runtime.published.messages < len(readings) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        fleet.stop()
        unit.stop()
        broker.stop()
    db = sqlite3.connect(tmp_path / "results.db")
    stored = Counter(db.execute("SELECT so, stream, last_update FROM results").fetchall())
    twice = {k: n for k, n in stored.items() if n > 1}
    assert not twice, f"{len(twice)} results stored more than once, e.g. {list(twice)[:3]}"
    assert stored == expected
    values = {
        (so, stream, t): orjson.loads(body)
        for so, stream, t, body in db.execute(
            "SELECT so, stream, last_update, body FROM results WHERE stream = 'moisture_10min'"
        )
    }
    for key, update in reference.derived:
        if key.stream == "moisture_10min":
            got = values[(key.so, key.stream, update.last_update)]["channels"]["moisture"]
            assert got["current-value"] == update.channels["moisture"]


# the cloud service's consumer ------------------------------------------------------------------


def _record(i: int) -> bytes:
    update = {"channels": {"v": {"current-value": i}}, "lastUpdate": T0 + i}
    return orjson.dumps({"messageId": f"poison-{i}", "site": "s1", "so": "probe", "stream": "data",
                         "enqueued": T0 + i, "update": update})  # fmt: skip


@pytest.mark.kafka
@pytest.mark.postgres
def test_the_cloud_consumer_survives_poison_records_and_a_killed_connection(
    kafka: Kafka, postgres: Postgres, tmp_path: Path
) -> None:
    topic, dead = "cloudlet.poison-test", "cloudlet.poison-test.dead-letter"
    poison = [
        orjson.dumps({"messageId": "p1", "site": "s1", "so": "probe", "stream": "data",
                      "enqueued": 1, "update": 5}),
        orjson.dumps({"messageId": "p2", "site": "s1", "so": ["probe"], "stream": "data",
                      "enqueued": 1, "update": {"lastUpdate": 1, "channels": {}}}),
        b"\xff not json",
        orjson.dumps([1, 2, 3]),
    ]  # fmt: skip
    produce(
        kafka, topic, [_record(i) for i in range(20)] + poison + [_record(i) for i in range(20, 40)]
    )
    store = PostgresStore(postgres.url)
    with store._transaction() as cur:
        cur.execute("TRUNCATE updates, channel_values, latest")
    settings = CloudSettings.model_validate({
        "port": 0, "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic,
                             "dead_letter_topic": dead, "group": "poison-test"},
    })  # fmt: skip
    service = CloudService(settings, store=store).start()
    try:
        _until(lambda: store.count() == 40 and rejected(service) == 4, 60)
        assert rejected(service, "not_a_record") == 4
        assert _get(service, "/readyz") == 200
        # every connection the service holds is killed under it
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        produce(kafka, topic, [_record(i) for i in range(40, 60)])
        _until(lambda: store.count() == 60, 60)
        assert service.alive and _get(service, "/healthz") == 200
        _until(lambda: _get(service, "/readyz") == 200, 30)
        letters = _consume(kafka, dead, 4)
        assert sorted(v for v, _ in letters) == sorted(poison)
        assert {h["reason"] for _, h in letters} == {b"not_a_record"}
    finally:
        service.stop()


def _consume(kafka: Kafka, topic: str, n: int) -> list[tuple[bytes, dict[str, bytes]]]:
    async def run() -> list[tuple[bytes, dict[str, bytes]]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka.bootstrap_servers,
                                    auto_offset_reset="earliest")  # fmt: skip
        await consumer.start()
        got: list[tuple[bytes, dict[str, bytes]]] = []
        try:
            end = time.monotonic() + 30
            while len(got) < n and time.monotonic() < end:
                batches = await consumer.getmany(timeout_ms=500)
                got += [(r.value, dict(r.headers)) for rs in batches.values() for r in rs]
        finally:
            await consumer.stop()
        return got

    return asyncio.run(run())


def _until(condition: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except psycopg.OperationalError:
            pass  # the test's own query met a killed connection (the pool replaces it)
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def _get(service: CloudService, path: str) -> int:
    try:
        return int(urllib.request.urlopen(service.url + path).status)
    except urllib.error.HTTPError as exc:
        return exc.code


# a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, so that a test can fill it (root only)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but for about `leave` bytes; the filler's path (delete it to free)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_the_outbox_on_a_full_disk_keeps_whole_batches_and_goes_on(small_disk: Path) -> None:
    outbox = Outbox(OutboxSettings(path=small_disk / "outbox", segment_bytes=1 << 14))
    filler = _fill(small_disk, 64 * 1024)
    key = StreamKey("probe", "data")
    batches, written = 0, 0
    with pytest.raises(OSError) as full:
        for batches in range(1000):
            outbox.write([(key, SensorUpdate({"v": "x" * 200}, T0 + batches * 10 + i))
                          for i in range(10)])  # fmt: skip
            written += 10
    assert full.value.errno == errno.ENOSPC
    assert outbox.counts.written == written
    filler.unlink()  # space again: the same batch goes in, once
    outbox.write([(key, SensorUpdate({"v": "x" * 200}, T0 + batches * 10 + i)) for i in range(10)])
    outbox.close()
    again = Outbox(OutboxSettings(path=small_disk / "outbox", segment_bytes=1 << 14))
    times = [r.last_update for r in again.read(limit=100_000)]
    assert times == [T0 + i for i in range(written + 10)]
    assert again.counts.truncated == 0  # nothing torn was left behind
    again.close()


@pytest.mark.mqtt
def test_a_unit_on_a_full_disk_waits_not_ready_and_goes_on_by_itself(
    mosquitto: Mosquitto, small_disk: Path, tmp_path: Path
) -> None:
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": "u-disk-full", "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": mosquitto.url}, "http": {"port": 0}, "republish": {"updates": False},
    }))  # fmt: skip
    outbox = Outbox(OutboxSettings(path=small_disk / "outbox", segment_bytes=1 << 14))
    unit = Unit(UnitConfig.load(path), sink=outbox).start()
    readings = _readings(60)  # 600 updates
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-disk").start()
    try:
        assert unit.runtime.connected.wait(10)
        filler = _fill(small_disk, 16 * 1024)
        for key, update in readings:
            fleet.publish(key, update)
        _until(lambda: unit.runtime.disk_full, 30)
        assert _status(unit, "/readyz") == 503 and _status(unit, "/healthz") == 200
        filler.unlink()
        _until(lambda: unit.runtime.published.messages >= len(readings), 60)
        assert _status(unit, "/readyz") == 200
    finally:
        fleet.stop()
        unit.stop()
    stored = Counter(
        (r.key.so, r.key.stream, r.last_update)
        for r in Outbox(OutboxSettings(path=small_disk / "outbox")).read(limit=100_000)
        if r.key.stream in {"soil", "state", "rain", "weather"}
    )
    assert stored == Counter((k.so, k.stream, u.last_update) for k, u in readings)


def _status(unit: Unit, path: str) -> int:
    assert unit.status is not None
    try:
        url = f"http://127.0.0.1:{unit.status.port}{path}"
        return int(urllib.request.urlopen(url).status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_killed_cloud_service_resumes_and_stores_every_record_once(
    kafka: Kafka, postgres: Postgres, tmp_path: Path
) -> None:
    topic, n = "cloudlet.kill-cloud", 3000
    store = PostgresStore(postgres.url)
    with store._transaction() as cur:
        cur.execute("TRUNCATE updates, channel_values, latest")
    port = free_port()
    config = tmp_path / "cloud.yaml"
    config.write_bytes(orjson.dumps({
        "store": postgres.url, "http": {"port": port},
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic,
                  "group": "kill-cloud"},
    }))  # fmt: skip
    log = tmp_path / "cloud.log"

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen([CLOUDLET, "cloud", "serve", str(config)],
                                stdout=subprocess.DEVNULL, stderr=log.open("ab"))  # fmt: skip

    server = serve()
    try:
        produce(kafka, topic, [_record(i) for i in range(n // 2)])
        _until(lambda: store.count() > 0, 60)
        server.send_signal(signal.SIGKILL)  # mid-stream: some stored, not all committed
        server.wait(10)
        produce(kafka, topic, [_record(i) for i in range(n // 2, n)])
        server = serve()
        _until(lambda: store.count() == n, 120)
        time.sleep(1.0)  # anything read twice would show up now
        assert store.count() == n
        ids = store._query("SELECT count(DISTINCT message_id) FROM updates")[0][0]
        assert ids == n
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, log.read_text()[-2000:]
        store.close()


# a thread that dies anyway ----------------------------------------------------------------------


@pytest.mark.mqtt
def test_a_unit_whose_worker_dies_says_so_and_exits_non_zero(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Its state cannot be written (not a full disk: a directory where the snapshot goes): the
    worker dies at its first checkpoint; /healthz turns 503 and `cloudlet unit run` exits 1."""
    port = free_port()
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": "u-dies", "objects": [str(IRRIGATION / "objects")], "state_dir": "state",
        "mqtt": {"url": mosquitto.url}, "http": {"port": port},
        "checkpoint": {"every": "100ms"},
    }))  # fmt: skip
    (tmp_path / "state" / "u-dies.state.tmp").mkdir(parents=True)
    log = tmp_path / "unit.log"
    unit = subprocess.Popen([CLOUDLET, "unit", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))  # fmt: skip
    try:
        _until(lambda: b"subscription" in log.read_bytes(), 30)
        update = _readings(1)[0][1]
        body = orjson.dumps({"channels": {"moisture": {"current-value": 20}},
                             "lastUpdate": update.last_update})  # fmt: skip
        subprocess.run(["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port),
                        *mosquitto.cli_auth, "-q", "1", "-t", "field-1-soil/streams/soil",
                        "-m", body.decode()],
                       check=True, timeout=30)  # fmt: skip
        assert unit.wait(30) == 1
    finally:
        unit.kill()
    text = log.read_text()
    assert "unit u-dies: its worker stopped; see the log above" in text
    assert "IsADirectoryError" in text


@pytest.mark.mqtt
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_turns_red_when_a_thread_has_died(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": "u-red", "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": mosquitto.url}, "http": {"port": 0},
    }))  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    try:
        assert unit.runtime.connected.wait(10)
        _until(lambda: _status(unit, "/readyz") == 200, 10)
        unit.threads["forwarder"] = lambda: False  # as a dead forwarder reports itself
        assert (_status(unit, "/healthz"), _status(unit, "/readyz")) == (503, 200)
        assert unit.dead_threads() == ["forwarder"]
        del unit.threads["forwarder"]
        monkeypatch.setattr(unit.runtime, "_take_batch", lambda: 1 / 0)  # the worker dies
        _until(lambda: not unit.runtime.alive, 10)
        assert (_status(unit, "/healthz"), _status(unit, "/readyz")) == (503, 503)
    finally:
        unit.stop()
    settings = CloudSettings.model_validate(
        {"port": 0, "kafka": {"bootstrap_servers": "127.0.0.1:1"}}
    )
    cloud = CloudService(settings, store=SQLiteStore(tmp_path / "cloud.db"))
    assert cloud.materializer is not None
    monkeypatch.setattr(cloud.materializer, "_run", lambda: 1 / 0)  # its thread dies
    cloud.start()
    try:
        _until(lambda: not cloud.alive, 10)
        assert _get(cloud, "/healthz") == 503 and _get(cloud, "/readyz") == 503
    finally:
        cloud.stop()
