"""Units reading Kafka (the cloud tier): a cross-site flow computed from many sites'
forwarders, its windows stored exactly once, through a rebalance; on a three-broker KRaft
cluster, with one instance and then one broker killed mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.forwarder import Forwarder
from cloud_sync.outbox import Outbox, OutboxSettings
from cloud_sync.settings import ForwarderSettings
from cloudlet.rig import Kafka, KafkaCluster
from processors.config import UnitConfig
from processors.kafka_source import KafkaUnit
from streams import SensorUpdate, StreamKey
from streams.catalog import Catalog
from streams.colocation import colocated, groups

pytestmark = pytest.mark.kafka
MINUTE = 60_000
T0 = (int(time.time() * 1000) // MINUTE - 24 * 60) * MINUTE  # a day ago, on a minute
FLOWS = """\
flows:
  city-pm25:
    from: "air-*/air"
    key: none
    window: {tumbling: 1m}
    watermark: {delay: 2m, idle: null}
    aggregates: {avg: avg(pm25), n: count()}
    into: city/pm25_1m
"""


def _objects(folder: Path, sites: int, stations: int) -> Path:
    folder.mkdir(parents=True)
    for s in range(sites):
        for j in range(stations):
            so = f"air-s{s:02d}-{j}"
            (folder / f"{so}.yaml").write_text(
                f"id: {so}\nstreams: {{air: {{channels: {{pm25: {{type: number}}}}}}}}\n"
            )
    (folder / "city.yaml").write_text(
        "id: city\nstreams: {info: {channels: {note: {type: string}}}}\n"
    )
    (folder / "city.flows.yaml").write_text(FLOWS)
    return folder


def _reading(site: int, station: int, minute: int, k: int) -> tuple[StreamKey, SensorUpdate]:
    """Whole numbers: their sums are exact in any order, so the averages are too."""
    value = float((site * 7 + station * 3 + minute * 11 + k) % 50)
    return (StreamKey(f"air-s{site:02d}-{station}", "air"),
            SensorUpdate({"pm25": value}, T0 + minute * MINUTE + k * 10_000))  # fmt: skip


def _expected(sites: int, stations: int, minutes: int) -> dict[int, dict[str, Any]]:
    out = {}
    for m in range(minutes):
        values = [_reading(s, j, m, k)[1].channels["pm25"] for s in range(sites)
                  for j in range(stations) for k in range(6)]  # fmt: skip
        # a window's update is dated its last millisecond
        out[T0 + (m + 1) * MINUTE - 1] = {"avg": sum(values) / len(values), "n": len(values)}
    return out


def test_what_flows_and_groups_join_stays_together() -> None:
    irrigation = Path(__file__).resolve().parent.parent / "cloudlet/scenarios/irrigation/objects"
    of = colocated(Catalog.load([irrigation]))
    # the fields' composite streams read the rain gauge and the weather station (groups);
    # the valves are commanded by a rule, which joins nothing
    assert groups(of)["field-1-soil"] == ["field-1-soil", "field-2-soil", "field-3-soil",
                                          "field-4-soil", "rain-gauge-1", "weather-1"]  # fmt: skip
    assert of["field-1-valve"] == "field-1-valve"


def test_records_routed_again_are_applied_once() -> None:
    """A router that reads its input again from an older committed offset (Kafka answers a
    consumer with its group's committed offset before a transaction that committed more is
    applied to it) routes copies: a partition applies each input record once, by the input
    partition and offset the router wrote on it, and checkpoints where it stands."""
    from types import SimpleNamespace

    from processors.kafka_source import KafkaCounts, Partition

    unit = SimpleNamespace(counts=KafkaCounts())
    part = Partition(pipeline=None, engine=None, producer=None)  # type: ignore[arg-type]

    def routed(src: bytes | None, offset: int) -> Any:
        return SimpleNamespace(headers=[("src", src)] if src else [], offset=offset, value=b"")

    def fresh(records: list[Any]) -> list[int]:
        return [r.offset for r in KafkaUnit._fresh(unit, part, records)]  # type: ignore[arg-type]

    assert fresh([routed(b"0:10", 0), routed(b"0:11", 1), routed(b"1:5", 2)]) == [0, 1, 2]
    # input partition 0 routed again from 10, then on; partition 1's next record
    again = [routed(b"0:10", 3), routed(b"0:11", 4), routed(b"0:12", 5), routed(b"1:5", 6),
             routed(b"1:6", 7)]  # fmt: skip
    assert fresh(again) == [5, 7]
    assert unit.counts.routed_again == 3 and part.sources == {0: 12, 1: 6}
    # records a router did not mark (a unit reading the forwarders' topic) all count
    assert fresh([routed(None, 8), routed(None, 9), routed(b"x", 10)]) == [8, 9, 10]


class Sites:
    """`count` cloudlets' outboxes and forwarders (each its own site), to one topic."""

    def __init__(self, work: Path, bootstrap: str, topic: str, count: int) -> None:
        self.outboxes = [Outbox(OutboxSettings(path=work / f"outbox-{i}", fsync="never"))
                         for i in range(count)]  # fmt: skip
        self.forwarders = [
            Forwarder(o, ForwarderSettings.model_validate({
                "site": f"s{i:02d}", "commands": False, "batch": 500,
                "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "linger_ms": 5},
            })).start()
            for i, o in enumerate(self.outboxes)
        ]  # fmt: skip

    def write(self, site: int, readings: list[tuple[StreamKey, SensorUpdate]]) -> None:
        self.outboxes[site].write(readings)

    def drain(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while any(o.depth() for o in self.outboxes):
            assert time.monotonic() < deadline, "the forwarders did not drain"
            time.sleep(0.1)

    def stop(self) -> None:
        for f in self.forwarders:
            f.stop()


async def _committed(bootstrap: str, topic: str) -> int:
    """How many records of `topic` a `read_committed` reader sees."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        count = len(described[0].get("partitions") or []) if described else 0
    finally:
        await admin.close()
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                              isolation_level="read_committed")  # fmt: skip
    await reader.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(count)]
        if not tps:
            return 0
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        seen = 0
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                break  # a transaction still open: counted next time
            seen += sum(len(rs) for rs in (await reader.getmany(timeout_ms=500)).values())
        return seen
    finally:
        await reader.stop()


def _routed(bootstrap: str, total: int, timeout: float = 120, group: str = "city") -> None:
    """Wait until `total` records are in the units' by-key topic, committed (event time moves
    across sites only as fast as the slowest partition is read: the test keeps the sites'
    minutes in order, as a watermark delay would in the field)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if asyncio.run(_committed(bootstrap, f"{group}.by-key")) >= total:
                return
        except (Exception, asyncio.CancelledError):  # a broker going away mid-read: again
            pass
        assert time.monotonic() < deadline, "the router did not take every record"
        time.sleep(0.3)


async def _create_topic(bootstrap: str, name: str, partitions: int, replicas: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, replicas)])
    finally:
        await admin.close()


def _windows(cloud: CloudService) -> list[dict[str, Any]]:
    return cloud.store.history("city", "pm25_1m", limit=1000).updates


def _check(cloud: CloudService, expected: dict[int, dict[str, Any]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(_windows(cloud)) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    got = {u["lastUpdate"]: {c: v["current-value"] for c, v in u["channels"].items()}
           for u in _windows(cloud)}  # fmt: skip
    assert got == expected
    assert len(_windows(cloud)) == len(expected)  # each window once


def _cloud(work: Path, bootstrap: str, updates: str, derived: str) -> CloudService:
    return CloudService(CloudSettings.model_validate({
        "port": 0, "store": f"sqlite:///{work / 'cloud.db'}", "public": ["*"],
        "kafka": {"bootstrap_servers": bootstrap, "topic": updates, "topics": [derived],
                  "group": f"cloud-{updates}"},
    })).start()  # fmt: skip


def _unit_config(
    work: Path,
    objects: Path,
    bootstrap: str,
    updates: str,
    name: str,
    group: str = "city",
    **extra: Any,
) -> Path:
    path = work / f"{name}.yaml"
    path.write_bytes(orjson.dumps({
        "name": name, "objects": [str(objects)], **extra,
        "input": {"kafka": {"bootstrap_servers": bootstrap, "topic": updates, "group": group,
                            "outputs": f"{updates}.derived", "checkpoint_every": "300ms",
                            "transaction_timeout": "8s"}},
    }))  # fmt: skip
    return path


def test_two_instances_compute_a_cross_site_flow_once(kafka: Kafka, tmp_path: Path) -> None:
    """Ten sites' forwarders; two instances of a unit whose flow averages every station of
    the city (key none: repartitioned by group). Every window once, exactly the average."""
    sites, stations, minutes = 10, 2, 4
    updates = "air-2i"
    asyncio.run(_create_topic(kafka.bootstrap_servers, updates, 4, 1))
    objects = _objects(tmp_path / "objects", sites, stations)
    cloud = _cloud(tmp_path, kafka.bootstrap_servers, updates, f"{updates}.derived")
    units = [KafkaUnit(UnitConfig.load(_unit_config(tmp_path, objects, kafka.bootstrap_servers,
                                                    updates, name, http={"port": 0}))).start()
             for name in ("city-a", "city-b")]  # fmt: skip
    feed = Sites(tmp_path, kafka.bootstrap_servers, updates, sites)
    try:
        assert units[0].repartition and units[0].ready.wait(60) and units[1].ready.wait(60)
        for m in range(minutes):
            for s in range(sites):
                feed.write(s, [_reading(s, j, m, k) for j in range(stations) for k in range(6)])
            feed.drain()
            _routed(kafka.bootstrap_servers, (m + 1) * sites * stations * 6)
        feed.write(0, [_reading(0, 0, minutes + 4, 0)])  # closes the windows before it
        feed.drain()
        _check(cloud, _expected(sites, stations, minutes), 60)
        assert sum(u.counts.derived for u in units) >= minutes
        assert all(u.alive for u in units) and cloud.alive
        for u in units:  # its counts on /metrics, ready on /readyz
            assert u.status is not None
            base = f"http://127.0.0.1:{u.status.port}"
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as ready:
                assert ready.status == 200
            with urllib.request.urlopen(f"{base}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            counted = (
                f'cloudlet_kafka_records_total{{unit="{u.config.name}"}} {u.counts.consumed}.0'
            )
            assert counted in text and "cloudlet_partitions_owned" in text
    finally:
        feed.stop()
        for u in units:
            u.stop()
        cloud.stop()


async def _fence(bootstrap: str, transactional_ids: list[str]) -> None:
    """What an instance cut off from the group for a moment does when it takes a partition
    again: a producer of the partition's transactional id started (fencing its owner)."""
    from aiokafka import AIOKafkaProducer

    for transactional_id in transactional_ids:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
        await producer.start()
        await producer.stop()


def test_a_partition_fenced_while_still_assigned_is_taken_again(
    kafka: Kafka, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The one instance of a unit holds every partition; another producer of each partition's
    transactional id starts mid-stream (as an instance cut off from the group for a moment
    does, taking again what it held). The group still assigns them all here: the unit takes
    them again from their last checkpoints, and every window is stored once, exact (before,
    the fenced partitions were left unread until a rebalance that never came)."""
    sites, stations, minutes = 4, 2, 4
    updates, group = "air-fenced", "fenced"
    asyncio.run(_create_topic(kafka.bootstrap_servers, updates, 2, 1))
    objects = _objects(tmp_path / "objects", sites, stations)
    cloud = _cloud(tmp_path, kafka.bootstrap_servers, updates, f"{updates}.derived")
    config = _unit_config(tmp_path, objects, kafka.bootstrap_servers, updates, "fenced-a",
                          group=group)  # fmt: skip
    unit = KafkaUnit(UnitConfig.load(config)).start()
    feed = Sites(tmp_path, kafka.bootstrap_servers, updates, sites)
    try:
        assert unit.repartition and unit.ready.wait(60)
        assert unit.counts.assigned == [0, 1]
        restored = unit.counts.restored
        for m in range(minutes):
            for s in range(sites):
                feed.write(s, [_reading(s, j, m, k) for j in range(stations) for k in range(6)])
            feed.drain()
            _routed(kafka.bootstrap_servers, (m + 1) * sites * stations * 6, group=group)
            if m == 1:
                time.sleep(1.0)  # checkpoints of both partitions written
                ids = [f"{group}.{group}.by-key.{p}" for p in (0, 1)]
                asyncio.run(_fence(kafka.bootstrap_servers, ids))
        feed.write(0, [_reading(0, 0, minutes + 4, 0)])
        feed.drain()
        _check(cloud, _expected(sites, stations, minutes), 60)
        # taken again from its checkpoint: the partition all the records go to (key none: one
        # group); the other, idle, has nothing to write, so it does not learn of its fence
        assert unit.counts.restored >= restored + 1
        assert unit.counts.assigned == [0, 1] and unit.alive
    finally:
        feed.stop()
        unit.stop()
        cloud.stop()
    gc.collect()  # aiokafka's unread future of the fenced transaction: not logged as an error
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
            and "never retrieved" in r.getMessage()] == []  # fmt: skip
    assert any("fenced while still assigned here" in r.getMessage() for r in caplog.records)


def test_a_take_or_a_router_that_fails_or_hangs_is_tried_again(
    kafka: Kafka,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kafka answering nothing, or an error, where a unit takes a partition, makes its router
    or writes its outputs (faults injected around the real client: a coordinator that never
    answers, as a broker dying under it makes aiokafka wait for ever; a checkpoints' reader
    that loses its broker; a transaction that fails). Each step gives up within
    `transaction_timeout`, says so, and is tried again: every window is stored once, exact.
    Before, the router waited for ever with nothing said, a take that failed in the group's
    callback left its partition unread, and a failed transaction stopped the unit."""
    from aiokafka.errors import KafkaConnectionError

    sites, stations, minutes = 4, 2, 3
    updates, group = "air-faulty", "faulty"
    asyncio.run(_create_topic(kafka.bootstrap_servers, updates, 2, 1))
    objects = _objects(tmp_path / "objects", sites, stations)
    cloud = _cloud(tmp_path, kafka.bootstrap_servers, updates, f"{updates}.derived")
    config = _unit_config(tmp_path, objects, kafka.bootstrap_servers, updates, "faulty-a",
                          group=group)  # fmt: skip
    doc = orjson.loads(config.read_bytes())
    doc["input"]["kafka"]["transaction_timeout"] = "2s"
    config.write_bytes(orjson.dumps(doc))
    router, saved, emit = KafkaUnit._router_producer, KafkaUnit._saved, KafkaUnit._emit
    hung: list[int] = []
    failed: list[int] = []
    lost: list[int] = []

    async def router_hanging(self: KafkaUnit, tp: Any) -> Any:
        if len(hung) < 3:  # the first three starts: the coordinator never answers
            hung.append(tp.partition)
            await asyncio.sleep(3600)
        return await router(self, tp)

    async def saved_failing(self: KafkaUnit) -> Any:
        if not failed:  # the first take: the checkpoints' reader loses its broker
            failed.append(1)
            raise KafkaConnectionError("no connection to the checkpoints' broker")
        return await saved(self)

    async def emit_failing(self: KafkaUnit, producer: Any, derived: Any) -> None:
        if not lost:  # the first outputs: the broker is lost past the client's retries
            lost.append(len(derived))
            raise KafkaConnectionError("the partition leader went away")
        await emit(self, producer, derived)

    monkeypatch.setattr(KafkaUnit, "_emit", emit_failing)
    monkeypatch.setattr(KafkaUnit, "_router_producer", router_hanging)
    monkeypatch.setattr(KafkaUnit, "_saved", saved_failing)
    unit = KafkaUnit(UnitConfig.load(config)).start()
    feed = Sites(tmp_path, kafka.bootstrap_servers, updates, sites)
    try:
        assert unit.repartition and unit.ready.wait(60)
        for m in range(minutes):
            for s in range(sites):
                feed.write(s, [_reading(s, j, m, k) for j in range(stations) for k in range(6)])
            feed.drain()
            _routed(kafka.bootstrap_servers, (m + 1) * sites * stations * 6, 60, group=group)
        feed.write(0, [_reading(0, 0, minutes + 4, 0)])
        feed.drain()
        _check(cloud, _expected(sites, stations, minutes), 60)
        assert len(hung) == 3 and failed == [1] and len(lost) == 1
        assert unit.counts.assigned == [0, 1] and unit.alive
    finally:
        feed.stop()
        unit.stop()
        cloud.stop()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("its router is made again at the next fetch" in m for m in said) == 3, said
    assert sum(" not taken (KafkaConnectionError" in m for m in said) == 1, said
    assert sum("its transaction failed (KafkaConnectionError" in m for m in said) == 1, said


def test_a_step_given_up_ends_though_it_absorbs_the_cancellation() -> None:
    """aiokafka answers the cancellation of a transaction by aborting it, and waits for the
    abort (shielded) without a bound: with its coordinator gone, for ever. Such a step, as
    aiokafka's transaction context is: `asyncio.timeout` (one cancellation) is still waiting
    3 s past its budget (as it was against a real broker frozen mid-transaction, 6 runs of 6);
    the unit's bound (`_within`: cancelled until it ends) gives up within its budget and a
    second. The cluster test met this: a partition silent for minutes after a broker was
    killed, its unit unable to stop. One that never ends is left to end on its own, said."""
    from processors.kafka_source import _abandoned, _within

    async def transaction(aborts: list[str]) -> None:
        abort: asyncio.Future[None] = asyncio.get_running_loop().create_future()  # never ends
        try:
            await asyncio.sleep(3600)  # a produce request to a broker that does not answer
        except asyncio.CancelledError:
            aborts.append("abort")
            await asyncio.shield(abort)  # aiokafka's abort_transaction
            raise

    async def stubborn(released: asyncio.Event) -> None:
        while not released.is_set():  # every cancellation absorbed, until the test ends
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    async def scenario() -> tuple[bool, float, list[str], float]:
        aborts: list[str] = []

        async def one_cancellation() -> None:
            async with asyncio.timeout(0.2):
                await transaction(aborts)

        plain = asyncio.ensure_future(one_cancellation())
        absorbed = not (await asyncio.wait({plain}, timeout=3.2))[0]
        plain.cancel()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await _within(transaction(aborts), 0.2)
        took = time.monotonic() - started
        started, released = time.monotonic(), asyncio.Event()
        with pytest.raises(TimeoutError):
            await _within(stubborn(released), 0.1, every=0.1)
        left = time.monotonic() - started
        assert len(_abandoned) == 1  # kept until it ends
        released.set()
        for task in list(_abandoned):
            task.cancel()
            await asyncio.wait({task}, timeout=5)
        assert not _abandoned
        return absorbed, took, aborts, left

    absorbed, took, aborts, left = asyncio.run(scenario())
    assert absorbed  # what the unit's bound is for
    assert aborts == ["abort", "abort"]
    assert 0.2 <= took < 0.2 + 1.5, took
    assert 0.1 + 0.9 <= left < 0.1 + 3, left  # ten more cancellations, 0.1 s apart


@pytest.mark.infra
def test_a_unit_stops_within_its_budget_while_the_broker_is_frozen(
    kafka: Kafka, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while the only broker is frozen (SIGSTOP: requests hang, nothing refuses):
    the unit stops within `stop_timeout` and a margin and says what it could not finish."""
    updates = "air-frozen"
    asyncio.run(_create_topic(kafka.bootstrap_servers, updates, 2, 1))
    objects = _objects(tmp_path / "objects", 2, 1)
    config = _unit_config(tmp_path, objects, kafka.bootstrap_servers, updates, "city-f")
    doc = orjson.loads(config.read_bytes())
    doc["input"]["kafka"].update(group="frozen", stop_timeout="2s")
    config.write_bytes(orjson.dumps(doc))
    unit = KafkaUnit(UnitConfig.load(config)).start()
    feed = Sites(tmp_path, kafka.bootstrap_servers, updates, 2)
    assert kafka.process is not None
    try:
        assert unit.ready.wait(60)
        feed.write(0, [_reading(0, 0, 0, k) for k in range(6)])
        feed.drain()
        deadline = time.monotonic() + 30
        while unit.counts.consumed < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert unit.counts.consumed == 6
        kafka.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        unit.stop()
        took = time.monotonic() - started
        assert took < 2 + 2 + 1.0, took
        said = caplog.text
        assert "did not finish in time" in said or "not stopped cleanly" in said, said[-2000:]
    finally:
        kafka.process.send_signal(signal.SIGCONT)
        feed.stop()
        unit.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """Three Kafka nodes in KRaft mode: replication factor 3, min.insync.replicas 2."""
    nodes = KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"), 3).start()
    try:
        yield nodes
    finally:
        nodes.stop()


def _instance(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cloudlet.entry", "unit", "run", str(config)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


@pytest.mark.infra  # brokers and processes dying: the compiled pass only
def test_a_cross_site_flow_survives_a_killed_instance_and_a_killed_broker(
    cluster: KafkaCluster, tmp_path: Path
) -> None:
    """Twenty sites' forwarders into a replicated topic; two instances (processes) of the
    cloud-tier unit. One instance is SIGKILLed mid-stream (its partitions and their state go
    to the other), a third joins, then one of the three Kafka nodes is killed: every window is
    stored once, with exactly the average of every station's readings."""
    sites, stations, minutes = 20, 2, 6
    bootstrap = cluster.bootstrap_servers
    updates = "air-cluster"
    asyncio.run(_create_topic(bootstrap, updates, 6, 3))
    objects = _objects(tmp_path / "objects", sites, stations)
    cloud = _cloud(tmp_path, bootstrap, updates, f"{updates}.derived")
    logs = tmp_path / "instances.log"
    configs = [_unit_config(tmp_path, objects, bootstrap, updates, f"city-{n}") for n in "abc"]
    instances = [_instance(configs[0], logs), _instance(configs[1], logs)]
    feed = Sites(tmp_path, bootstrap, updates, sites)
    try:
        for m in range(minutes):
            for s in range(sites):
                feed.write(s, [_reading(s, j, m, k) for j in range(stations) for k in range(6)])
            feed.drain()
            _routed(bootstrap, (m + 1) * sites * stations * 6)
            if m == 1:
                instances[0].send_signal(signal.SIGKILL)  # mid-stream, no goodbye
                instances[0].wait(10)
            if m == 2:
                instances.append(_instance(configs[2], logs))  # a rebalance again
            if m == 3:
                cluster.kill(2)  # one broker of three: min.insync.replicas 2 still met
            time.sleep(1.0)
        feed.write(0, [_reading(0, 0, minutes + 4, 0)])
        feed.drain()
        _check(cloud, _expected(sites, stations, minutes), 180)
        assert all(p.poll() is None for p in instances[1:]), logs.read_text()[-3000:]
    except AssertionError:
        print(logs.read_text()[-5000:])
        raise
    finally:
        feed.stop()
        for p in instances:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
        cloud.stop()
        if not cluster.nodes[2].running:
            cluster.resume(2)
