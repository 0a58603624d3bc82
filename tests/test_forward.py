"""Cloudlet to cloud over the real Kafka: every update a unit accepts reaches the topic, in
order per service object, across a SIGKILL of the unit (and its forwarder) and a Kafka outage."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.forwarder import Forwarder, encode_record
from cloud_sync.outbox import Outbox, OutboxSettings, Record
from cloud_sync.settings import ForwarderSettings
from cloud_sync.store import PostgresStore
from cloudlet.rig import Kafka, Mosquitto, Postgres
from cloudlet.unit_file import UnitFile
from cloudlet.units import CloudletUnit
from edge_objects.fleet import DeviceFleet
from streams import SensorUpdate, StreamKey
from streams.transport.mqtt import MqttSettings
from tests.test_cli import CLOUDLET
from tests.test_processors import OBJECTS

T0 = 1_700_006_400_000


def consume(bootstrap: str, topic: str, until: Any, timeout: float = 60) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, metadata_max_age_ms=1000,  # the topic may be new
        )  # fmt: skip
        await consumer.start()
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while not until(got) and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for r in records:
                        got.append({**orjson.loads(r.value), "headers": dict(r.headers),
                                    "key": r.key})  # fmt: skip
        finally:
            await consumer.stop()
        return got

    return asyncio.run(run())


def unique(got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for m in got:
        if m["messageId"] not in seen:
            seen.add(m["messageId"])
            out.append(m)
    return out


def _unit_file(tmp_path: Path, broker: Mosquitto, kafka: Kafka, topic: str, **extra: Any) -> Path:
    (tmp_path / "objects").mkdir(exist_ok=True)
    (tmp_path / "objects" / "objects.yaml").write_text(OBJECTS)
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": extra.pop("name", "u-forward"), "objects": ["objects/"],
        "mqtt": {"url": broker.url}, "state_dir": "state",
        "checkpoint": {"every": "200ms", "messages": 100},
        "outbox": {"path": "outbox", "streams": [{"match": "*/alert", "priority": 0}]},
        "forward": {"site": "test-site", "kafka": {"bootstrap_servers": kafka.bootstrap_servers,
                                                   "topic": topic, "linger_ms": 5}},
        **extra,
    }))  # fmt: skip
    return path


def _raw(messages: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(m["so"], m["update"]["lastUpdate"]) for m in messages if m["stream"] == "data"]


@pytest.mark.kafka
@pytest.mark.mqtt
def test_every_update_reaches_kafka_across_a_sigkill(
    mosquitto: Mosquitto, kafka: Kafka, tmp_path: Path
) -> None:
    topic = "cloudlet.kill"
    path = _unit_file(tmp_path, mosquitto, kafka, topic)
    log = tmp_path / "unit.log"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([CLOUDLET, "unit", "run", str(path), "--log-format", "json"],
                                stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    unit = start()
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-forward").start()
    sent = [(so, T0 + i) for i in range(400) for so in ("s1", "s2")]
    try:
        deadline = time.monotonic() + 30
        while b"subscription" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        for so, t in sent[:500]:
            fleet.publish(StreamKey(so, "data"), SensorUpdate({"t": 1.0}, t))
        consume(kafka.bootstrap_servers, topic, lambda g: len(g) >= 100)
        maps = Path(f"/proc/{unit.pid}/maps").read_text()  # a plain Kafka needs no OpenSSL
        assert "libcrypto" not in maps and "libssl" not in maps
        assert b"OpenSSL not loaded" in log.read_bytes()
        unit.send_signal(signal.SIGKILL)  # unit and forwarder, mid-stream
        unit.wait(10)
        for so, t in sent[500:]:
            fleet.publish(StreamKey(so, "data"), SensorUpdate({"t": 1.0}, t))
        assert fleet.flush(30)
        unit = start()
        got = consume(kafka.bootstrap_servers, topic,
                      lambda g: len(set(_raw(unique(g)))) >= len(sent), timeout=90)  # fmt: skip
    finally:
        fleet.stop()
        unit.send_signal(signal.SIGTERM)
        assert unit.wait(30) == 0
    messages = unique(got)
    assert sorted(_raw(messages)) == sorted(sent)  # each exactly once, by message id
    for so in ("s1", "s2"):  # in order per object, duplicates aside
        times = [t for s, t in _raw(messages) if s == so]
        assert times == sorted(times)
    # and the cloud side stores each exactly once, with no gap
    stored = _materialize(kafka, topic, f"sqlite:///{tmp_path / 'cloud.db'}", len(sent))
    assert stored == {so: [t for s, t in sorted(sent) if s == so] for so in ("s1", "s2")}
    first = messages[0]
    assert first["site"] == "test-site" and first["key"] == first["so"].encode()
    # lean headers by default: what a consumer needs to pick a decoder; the rest is the value's
    assert first["headers"] == {"content-type": b"application/json", "site": b"test-site"}


@pytest.mark.kafka
@pytest.mark.mqtt
@pytest.mark.postgres
def test_the_outbox_holds_through_a_kafka_outage_and_drains_in_order(
    mosquitto: Mosquitto, own_kafka: Kafka, postgres: Postgres, tmp_path: Path
) -> None:
    topic = "cloudlet.outage"
    config = UnitFile.load(_unit_file(tmp_path, mosquitto, own_kafka, topic, name="u-outage",
                                      http={"port": 0}))  # fmt: skip
    running = CloudletUnit(config).start()
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-outage").start()
    try:
        assert running.unit.runtime.connected.wait(10)
        assert running.forwarder is not None and running.forwarder.connected.wait(30)
        own_kafka.stop()  # the WAN link drops
        for i in range(300):
            fleet.publish(StreamKey("s1", "data"), SensorUpdate({"t": float(i)}, T0 + i))
        assert fleet.flush(30)
        deadline = time.monotonic() + 30
        while running.unit.runtime.published.messages < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.outbox is not None and running.outbox.depth() >= 290
        port = running.unit.status.port  # type: ignore[union-attr]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'cloudlet_outbox_depth{priority="5",unit="u-outage"}' in metrics
        own_kafka.resume()  # the link is back
        deadline = time.monotonic() + 90
        while running.outbox.depth() > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running.outbox.depth() == 0  # (the producer retried, or we did after a backoff)
    finally:
        fleet.stop()
        running.stop()
    got = unique(consume(own_kafka.bootstrap_servers, topic, lambda g: len(unique(g)) >= 300))
    assert [m["update"]["lastUpdate"] - T0 for m in got] == list(range(300))
    with PostgresStore(postgres.url)._transaction() as cur:
        cur.execute("TRUNCATE updates, channel_values, latest")
    stored = _materialize(own_kafka, topic, postgres.url, 300)
    assert stored == {"s1": [T0 + i for i in range(300)]}


def _materialize(kafka: Kafka, topic: str, store: str, expected: int) -> dict[str, list[int]]:
    """Run the cloud service over the topic until the store holds `expected` updates; each
    object's stored lastUpdates, in order."""
    settings = CloudSettings.model_validate({
        "store": store, "port": 0, "tokens": [{"token": "t", "objects": ["*"]}],
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic,
                  "group": f"cloud-{topic}"},
    })  # fmt: skip
    service = CloudService(settings).start()
    try:
        deadline = time.monotonic() + 60
        while service.store.count() < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # and nothing more arrives
        assert service.store.count() == expected
        out = {}
        for o in service.store.objects():
            page = service.store.history(o["id"], "data", limit=10_000)
            out[o["id"]] = [u["lastUpdate"] for u in page.updates]
        return out
    finally:
        service.stop()


@pytest.mark.kafka
def test_records_are_readable_by_kafkas_own_console_consumer(kafka: Kafka, tmp_path: Path) -> None:
    topic = "cloudlet.console"
    outbox = Outbox(OutboxSettings(path=tmp_path / "outbox"))
    settings = ForwarderSettings.model_validate(
        {"site": "farm", "commands": False,
         "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic}}
    )  # fmt: skip
    forwarder = Forwarder(outbox, settings).start()
    outbox.write([(StreamKey("s1", "data"), SensorUpdate({"t": float(i)}, T0 + i))
                  for i in range(5)])  # fmt: skip
    deadline = time.monotonic() + 30
    while outbox.depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    forwarder.stop()
    done = subprocess.run(
        kafka.java("org.apache.kafka.tools.consumer.ConsoleConsumer", "--bootstrap-server",
                   kafka.bootstrap_servers, "--topic", topic, "--from-beginning",
                   "--max-messages", "5", "--timeout-ms", "30000",
                   "--property", "print.key=true", "--property", "key.separator=|"),
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if "|" in line]
    assert len(lines) == 5, done.stdout + done.stderr
    keys, values = zip(*(line.split("|", 1) for line in lines), strict=True)
    assert set(keys) == {"s1"}
    docs = [orjson.loads(v) for v in values]
    assert [d["update"]["lastUpdate"] - T0 for d in docs] == list(range(5))
    assert docs[0]["update"]["channels"] == {"t": {"current-value": 0.0}}
    assert docs[0]["site"] == "farm"
    assert docs[0]["messageId"].startswith(f"farm/s1/data/{T0}/")


@pytest.mark.kafka
def test_records_go_to_the_key_partition_in_order_in_kafkas_batches(
    kafka: Kafka, tmp_path: Path
) -> None:
    """The forwarder builds the batches itself: each record must land on the partition the
    default partitioner gives its key (the object id), each object's records in order, every
    record once, headers and all, on a topic of several partitions."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.partitioner import DefaultPartitioner

    topic = "cloudlet.partitions"

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
        finally:
            await admin.close()

    asyncio.run(create())
    outbox = Outbox(OutboxSettings(path=tmp_path / "outbox"))
    settings = ForwarderSettings.model_validate(
        {"site": "farm", "commands": False, "batch": 300,
         "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic,
                   "max_batch_size": 4096,  # small: batches fill and go while building
                   "headers": "full"}}
    )  # fmt: skip
    forwarder = Forwarder(outbox, settings).start()
    sent = [(StreamKey(f"obj-{i % 40}", "data"), SensorUpdate({"t": float(i)}, T0 + i))
            for i in range(1000)]  # fmt: skip
    for i in range(0, len(sent), 250):
        outbox.write(sent[i : i + 250])
    got = _consume_with_partitions(kafka.bootstrap_servers, topic, 1000)
    forwarder.stop()
    assert len(got) == 1000 and len({d["messageId"] for _, d, _ in got}) == 1000
    partitioner = DefaultPartitioner()
    for partition, doc, headers in got:
        key = doc["so"].encode()
        assert partition == partitioner(key, [0, 1, 2, 3], [0, 1, 2, 3])
        assert headers == {
            "content-type": b"application/json",
            "site": b"farm",
            "so": key,
            "stream": b"data",
            "message-id": doc["messageId"].encode(),
        }
    assert len({p for p, _, _ in got}) > 1
    for so in {k.so for k, _ in sent}:
        times = [d["update"]["lastUpdate"] for _, d, _ in got if d["so"] == so]
        assert times == [u.last_update for k, u in sent if k.so == so]


def _consume_with_partitions(
    bootstrap: str, topic: str, count: int
) -> list[tuple[int, dict[str, Any], dict[str, bytes]]]:
    async def run() -> list[tuple[int, dict[str, Any], dict[str, bytes]]]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False,
        )  # fmt: skip
        await consumer.start()
        got: list[tuple[int, dict[str, Any], dict[str, bytes]]] = []
        deadline = time.monotonic() + 60
        try:
            while len(got) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got += [(r.partition, orjson.loads(r.value), dict(r.headers)) for r in records]
        finally:
            await consumer.stop()
        return got

    return asyncio.run(run())


def test_msgpack_records_carry_the_same_document() -> None:
    body = b'{"channels":{"t":{"current-value":1.5}},"lastUpdate":1700006399999}'
    record = Record(5, 7, StreamKey("s1", "data"), T0, T0 - 1, body)
    as_json = orjson.loads(encode_record(record, "farm", "json"))
    as_msgpack = msgpack.unpackb(encode_record(record, "farm", "msgpack"))
    assert (
        as_json
        == as_msgpack
        == {
            "messageId": record.message_id("farm"),
            "site": "farm",
            "so": "s1",
            "stream": "data",
            "enqueued": T0,
            "update": {"channels": {"t": {"current-value": 1.5}}, "lastUpdate": T0 - 1},
        }
    )


def test_records_encoded_in_bulk_are_the_documents_byte_for_byte() -> None:
    """`encode_records` puts JSON together from pieces: it must give exactly what orjson gives
    for the whole document, whatever the ids hold (quotes, backslashes, non-ASCII, slashes)."""
    from cloud_sync.forwarder import encode_records

    rng = random.Random(5)
    names = ["s1", 'q"uote', "back\\slash", "ümlaut", "new\nline", "a/b", ""]
    records = [
        Record(rng.randrange(3), i, StreamKey(rng.choice(names), rng.choice(names)),
               T0 + rng.randrange(10**6), T0,
               orjson.dumps({"channels": {"t": {"current-value": rng.random()}},
                             "lastUpdate": T0}))
        for i in range(500)
    ]  # fmt: skip
    for site in ("farm", 'we"ird', "ü"):
        for codec in ("json", "msgpack"):
            assert encode_records(records, site, codec) == [
                (r.message_id(site), encode_record(r, site, codec)) for r in records
            ]


@pytest.mark.kafka
def test_a_record_too_large_for_kafka_is_dead_lettered_and_the_rest_go_on(
    kafka: Kafka, tmp_path: Path
) -> None:
    """A record over max_record_bytes (Kafka would refuse it, and it used to be retried forever,
    holding up every record after it) goes to the dead-letter topic as an excerpt, counted;
    the records around it arrive, in order."""
    topic, dead = "cloudlet.large", "cloudlet.large.dead"
    outbox = Outbox(OutboxSettings(path=tmp_path / "outbox"))
    settings = ForwarderSettings.model_validate(
        {"site": "farm", "commands": False,
         "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic,
                   "max_record_bytes": 5000, "dead_letter_topic": dead}}
    )  # fmt: skip
    forwarder = Forwarder(outbox, settings).start()
    small = [(StreamKey("s1", "data"), SensorUpdate({"t": float(i)}, T0 + i)) for i in range(6)]
    big = (StreamKey("s1", "data"), SensorUpdate({"blob": "x" * 20_000}, T0 + 3))
    outbox.write([*small[:3], big, *small[3:]])
    got = _consume_with_partitions(kafka.bootstrap_servers, topic, 6)
    letters = _consume_with_partitions(kafka.bootstrap_servers, dead, 1)
    deadline = time.monotonic() + 30
    while outbox.depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    forwarder.stop()
    assert [d["update"]["lastUpdate"] - T0 for _, d, _ in got] == [0, 1, 2, 3, 4, 5]
    assert len(letters) == 1
    _, letter, headers = letters[0]
    assert headers == {"reason": b"too_large", "site": b"farm"}
    assert letter["reason"] == "too_large" and letter["so"] == "s1" and letter["size"] > 20_000
    assert letter["messageId"].startswith(f"farm/s1/data/{T0 + 3}/")
    assert len(letter["excerpt"]) == 1000
    assert forwarder.counts.dead_letters == 1 and outbox.depth() == 0


def test_a_relative_sqlite_store_is_beside_the_unit_file(tmp_path: Path) -> None:
    """Like every other path of a unit file: not the directory the command ran in."""
    from cloudlet.unit_file import UnitFile

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "unit.yaml").write_text(
        f"name: u\nobjects: [{tmp_path}]\noutbox: {{path: outbox}}\n"
        "forward: {site: s, store: 'sqlite:///cloud.db'}\n"
    )
    config = UnitFile.load(folder / "unit.yaml")
    assert config.forward is not None and config.forward.store == f"sqlite:///{folder}/cloud.db"
    (folder / "abs.yaml").write_text(
        f"name: u\nobjects: [{tmp_path}]\noutbox: {{path: outbox}}\n"
        f"forward: {{site: s, store: 'sqlite:///{tmp_path}/x.db'}}\n"
    )
    config = UnitFile.load(folder / "abs.yaml")
    assert config.forward is not None and config.forward.store == f"sqlite:///{tmp_path}/x.db"


def test_an_idle_forwarder_makes_the_acknowledged_position_durable(tmp_path: Path) -> None:
    """Acknowledgements within `ack_sync_interval` leave the position on disk behind; when
    they stop, the forwarder, idle, makes it durable (not only the next acknowledgement or a
    clean stop), so a crash then resends nothing the cloud already has. Through the embedded
    store (Kafka's loop does the same when idle)."""
    outbox = Outbox(OutboxSettings.model_validate({"path": tmp_path / "outbox",
                                                   "ack_sync_interval": "400ms"}))  # fmt: skip
    key = StreamKey("field-1-soil", "soil")
    forwarder = Forwarder(
        outbox, ForwarderSettings(site="s", store=f"sqlite:///{tmp_path / 'cloud.db'}")
    ).start()
    position = tmp_path / "outbox" / "p5" / "acked"
    try:
        acked_at = []
        for start in (0, 10):  # the second batch acknowledged within the interval of the first
            outbox.write([(key, SensorUpdate({"x": i}, T0 + i)) for i in range(start, start + 10)])
            deadline = time.monotonic() + 10
            while outbox.counts.acked < start + 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert outbox.counts.acked == start + 10
            acked_at.append(time.monotonic())
        if acked_at[1] - acked_at[0] < 0.3:  # (a slow machine may take longer than the interval)
            assert position.read_bytes() == (10).to_bytes(8, "little")  # behind, for now
        deadline = time.monotonic() + 5
        while position.read_bytes() != (20).to_bytes(8, "little") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert position.read_bytes() == (20).to_bytes(8, "little")
        assert forwarder.alive
    finally:
        forwarder.stop()
        outbox.close()
