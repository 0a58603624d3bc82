"""Keyed scale-out at a site (`processors.partitions`) on the real Mosquitto: replicas of a
unit with windows, composite streams and rules split the objects by group, and partitions
move between replicas with their state when replicas come and go, mid-stream."""

from __future__ import annotations

import queue
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloudlet.rig import Mosquitto
from cloudlet.rig.process import free_port
from edge_objects.fleet import DeviceFleet
from processors.config import ConfigError, UnitConfig
from processors.partitions import Partitions
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.catalog import Catalog
from streams.colocation import colocated, partition_of, partitions
from streams.transport.mqtt import MqttSettings, connect, make_client
from tests.test_cli import CLOUDLET
from tests.test_unit import IRRIGATION, T0, Collector, _readings

DERIVED = ("moisture_10min", "rain_1h", "irrigate")
Got = list[tuple[str, dict[str, Any]]]


class Outputs(Collector):
    """Every update, dead letter and command the units publish (`take`, `close`: a
    Collector's)."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.messages: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        settings = MqttSettings(url=broker.url)
        self.client = make_client(settings, name)
        subscribed = queue.SimpleQueue[bool]()
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("+/streams/+/updates", 1), ("cloudlet/dead-letter/#", 1), ("+/actions", 1)]
        )
        self.client.on_subscribe = lambda *_: subscribed.put(True)
        self.client.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, orjson.loads(m.payload))
        )
        connect(self.client, settings, persistent=False)
        self.client.loop_start()
        assert subscribed.get(timeout=10)


def _results(got: Got) -> list[tuple[str, str]]:
    """The windows, composite streams and commands, comparable between runs (a command's
    id and time are its own)."""
    out = []
    for topic, body in got:
        if topic.endswith("/actions"):
            what = {"action": body.get("action"), "parameters": body.get("parameters")}
            out.append((topic, orjson.dumps(what, option=orjson.OPT_SORT_KEYS).decode()))
        elif topic.endswith("/updates") and topic.split("/")[2] in DERIVED:
            out.append((topic, orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()))
    return sorted(out)


def _config(
    work: Path, broker: Mosquitto, name: str, file: str | None = None, **extra: Any
) -> UnitConfig:
    objects = work / "objects"
    if not objects.exists():
        shutil.copytree(IRRIGATION / "objects", objects)
    doc = {"name": name, "objects": [str(objects)], "mqtt": {"url": broker.url},
           "checkpoint": {"every": "200ms"}, **extra}  # fmt: skip
    path = work / f"{file or name}.yaml"
    path.write_bytes(orjson.dumps(doc))
    return UnitConfig.load(path)


def _echoed(key: StreamKey, update: SensorUpdate) -> Callable[[Got], bool]:
    topic = f"{key.so}/streams/{key.stream}/updates"
    return lambda g: any(t == topic and b["lastUpdate"] == update.last_update for t, b in g)


def _wait(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert what()


def _single(broker: Mosquitto, work: Path, readings: list[tuple[StreamKey, SensorUpdate]],
            name: str) -> list[tuple[str, str]]:  # fmt: skip
    """What one unit (no partitions) makes of the readings."""
    unit = Unit(_config(work, broker, name)).start()
    outputs = Outputs(broker, f"outputs-{name}")
    fleet = DeviceFleet(MqttSettings(url=broker.url), client_id=f"fleet-{name}").start()
    try:
        _wait(lambda: unit.runtime.ready)
        for key, update in readings:
            fleet.publish(key, update)
        got = outputs.take(_echoed(*readings[-1]))
        got += outputs.take(lambda g: False, timeout=1.5)
    finally:
        fleet.stop()
        outputs.close()
        unit.stop()
    return _results(got)


def _owned(unit: Unit) -> set[int]:
    assert isinstance(unit.runtime, Partitions)
    return set(unit.runtime.owned)


def test_partitions_keep_what_a_flow_joins_together() -> None:
    """The irrigation site's soil probes read the rain gauge and the weather station (their
    composite streams' groups), and one flow reads the rain gauge: one group, one partition.
    Each valve is alone (a rule commands it; a rule joins nothing)."""
    catalog = Catalog.load([IRRIGATION / "objects"])
    by_group = colocated(catalog)
    parts = partitions(by_group, 8)
    site = ["field-1-soil", "field-2-soil", "field-3-soil", "field-4-soil", "rain-gauge-1",
            "weather-1"]  # fmt: skip
    assert parts[partition_of("field-1-soil", 8)] == site
    assert sorted(so for objects in parts.values() for so in objects) == sorted(by_group)
    assert partition_of("field-1-soil", 8) == partition_of("field-1-soil", 8) == 4  # stable


def test_a_unit_splits_by_partitions_or_by_messages_not_both(tmp_path: Path) -> None:
    path = tmp_path / "u.yaml"
    path.write_text(f"name: u\nobjects: [{IRRIGATION / 'objects'}]\nshare_group: g\n"
                    "partitions: {count: 8}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="keep partitions for a unit with windows"):
        UnitConfig.load(path)


@pytest.mark.mqtt
def test_two_then_three_then_two_replicas_give_exactly_the_single_units_results(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The irrigation site's readings through one unit, and through replicas of it with
    partitions: two, a third joining mid-stream (its group's partition moves, state and
    session, while devices keep sending), then one stopping mid-stream (moved again). Every
    window, composite stream and valve command: the same, value for value, none twice."""
    readings = _readings(90)
    cuts = [len(readings) // 3, 2 * len(readings) // 3]
    phases = [readings[: cuts[0]], readings[cuts[0] : cuts[1]], readings[cuts[1] :]]

    def replicated() -> tuple[list[tuple[str, str]], list[set[int]]]:
        work = tmp_path / "replicas"
        config = _config(work, mosquitto, "irr", partitions={"count": 8})
        a = Unit(config, replica="a").start()
        b = Unit(config, replica="b").start()
        outputs = Outputs(mosquitto, "outputs-replicas")
        fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-replicas").start()
        site = partition_of("field-1-soil", 8)
        c: Unit | None = None
        owners = []
        live = [a, b]
        try:
            _wait(lambda: a.runtime.ready and b.runtime.ready)
            owners.append(_owned(a))
            assert _owned(a) | _owned(b) == {0, 2, 4, 6, 7} and not _owned(a) & _owned(b)
            gauge = a.metrics.registry.get_sample_value
            assert gauge("cloudlet_partitions_owned", {"unit": "irr-a"}) == len(_owned(a))
            assert gauge("cloudlet_partition_members", {"unit": "irr-a"}) == 2
            assert site in _owned(a)  # sorted members [irr-a, irr-b]: 4 mod 2 = 0
            for key, update in phases[0]:
                fleet.publish(key, update)
            got = outputs.take(_echoed(*phases[0][-1]))
            c = Unit(config, replica="c").start()  # joins while the devices go on
            live.append(c)
            for key, update in phases[1][: len(phases[1]) // 2]:
                fleet.publish(key, update)
            _wait(lambda: c is not None and site in _owned(b) and a.runtime.ready
                  and b.runtime.ready and c.runtime.ready)  # fmt: skip
            owners.append(_owned(b))
            for key, update in phases[1][len(phases[1]) // 2 :]:
                fleet.publish(key, update)
            got += outputs.take(_echoed(*phases[1][-1]))
            live.remove(b)
            b.stop()  # leaves mid-stream: [irr-a, irr-c], the site's partition back to a
            for key, update in phases[2]:
                fleet.publish(key, update)
            _wait(lambda: site in _owned(a) and a.runtime.ready and c is not None
                  and c.runtime.ready)  # fmt: skip
            owners.append(_owned(a))
            got += outputs.take(_echoed(*phases[2][-1]))
            got += outputs.take(lambda g: False, timeout=1.5)
            assert a.alive and c.alive
        finally:
            fleet.stop()
            outputs.close()
            for unit in live:
                unit.stop()
        return _results(got), owners

    expected = _single(mosquitto, tmp_path / "single", readings, "irr-single")
    got, owners = replicated()
    assert len({t for t, _ in expected if "/moisture_10min/" in t}) == 4  # every field's
    assert any(t.endswith("/actions") for t, _ in expected)  # valves were commanded
    assert len(expected) > 100
    missing = sorted(set(expected) - set(got))[:5]
    extra = sorted(set(got) - set(expected))[:5]
    assert got == expected, f"missing {missing}, extra {extra}, owners {owners}"


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _owners(broker: Mosquitto, unit: str) -> dict[int, str]:
    """Each partition's owner, as the retained messages say."""
    found: dict[int, str] = {}
    settings = MqttSettings(url=broker.url)
    client = make_client(settings, f"owners-{time.monotonic_ns()}")
    client.on_connect = lambda c, *_: c.subscribe(f"cloudlet/units/{unit}/partitions/+/owner")
    client.on_message = lambda _c, _u, m: found.__setitem__(int(m.topic.split("/")[4]),
                                                            m.payload.decode())  # fmt: skip
    connect(client, settings, persistent=False)
    client.loop_start()
    time.sleep(0.5)
    client.loop_stop()
    client.disconnect()
    return {p: owner for p, owner in found.items() if owner}


@pytest.mark.mqtt
def test_a_replica_killed_mid_stream_loses_nothing_and_counts_nothing_twice(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Two replica processes; the one running the site's partition is SIGKILLed mid-stream,
    its snapshot a moment old and messages in flight. The broker fires its will, the other
    takes the partition's session (what was not acknowledged comes again) and its snapshot:
    the windows, composites and commands are the single unit's, value for value (outputs the
    killed one published without acknowledging may come twice, identical)."""
    readings = _readings(60)
    half = len(readings) // 2
    expected = _single(mosquitto, tmp_path / "single", readings, "irk-single")
    work = tmp_path / "replicas"
    ports = {"a": free_port(), "b": free_port()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for replica, port in ports.items():
        config = _config(work, mosquitto, "irk", f"irk-{replica}", partitions={"count": 8},
                         mqtt={"url": mosquitto.url, "keepalive": 5},
                         http={"host": "127.0.0.1", "port": port})  # fmt: skip
        procs[replica] = subprocess.Popen(
            [CLOUDLET, "unit", "run", config.source, "--replica", replica],
            stdout=subprocess.DEVNULL, stderr=(work / f"{replica}.log").open("ab"),
        )  # fmt: skip
    outputs = Outputs(mosquitto, "outputs-kill")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-kill").start()
    site = partition_of("field-1-soil", 8)
    try:
        _wait(lambda: all(_ready(p) for p in ports.values()), timeout=60)
        _wait(lambda: len(_owners(mosquitto, "irk")) == 5)
        assert _owners(mosquitto, "irk")[site] == "irk-a"
        for key, update in readings[:half]:
            fleet.publish(key, update)
        got = outputs.take(lambda g: len([t for t, _ in g if "/moisture_10min/" in t]) >= 8)
        procs["a"].kill()  # SIGKILL: no snapshot, no acknowledgement, no goodbye
        procs["a"].wait(10)
        for key, update in readings[half:]:
            fleet.publish(key, update)
        got += outputs.take(_echoed(*readings[-1]), timeout=90)
        got += outputs.take(lambda g: False, timeout=1.5)
        assert _owners(mosquitto, "irk")[site] == "irk-b"
        assert procs["b"].poll() is None
    finally:
        fleet.stop()
        outputs.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                assert proc.wait(30) == 0
    results = _results(got)
    assert len(results) > len(set(expected)) // 2
    missing = sorted(set(expected) - set(results))[:5]
    extra = sorted(set(results) - set(expected))[:5]
    assert set(results) == set(expected), f"missing {missing}, extra {extra}"


@pytest.mark.mqtt
def test_a_registry_change_reaches_every_partition_and_keeps_the_windows(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Hot reload with partitions: an object added mid-stream gets a partition (someone
    subscribes to it and its readings are accepted), and the windows, composite streams and
    commands of the others are the single unit's, value for value: each partition was
    snapshotted and restored into engines built from the new registry."""
    readings = _readings(60)
    half = len(readings) // 2
    expected = _single(mosquitto, tmp_path / "single", readings, "irh-single")
    work = tmp_path / "replicas"
    config = _config(work, mosquitto, "irh", partitions={"count": 8}, reload="200ms")
    units = [Unit(config, replica=r).start() for r in ("a", "b")]
    outputs = Outputs(mosquitto, "outputs-reload")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-reload").start()
    hive = StreamKey("hive-7", "weight")
    try:
        _wait(lambda: all(u.runtime.ready for u in units))
        for key, update in readings[:half]:
            fleet.publish(key, update)
        got = outputs.take(_echoed(*readings[half - 1]))
        (work / "objects" / "hive-7.yaml").write_text(
            "id: hive-7\nstreams: {weight: {channels: {kg: {type: number}}}}\n"
        )
        heard: Got = []
        deadline = time.monotonic() + 30
        while not heard and time.monotonic() < deadline:  # until its partition runs
            fleet.publish(hive, SensorUpdate({"kg": 41.0}, T0))
            took = outputs.take(lambda g: any(t.startswith("hive-7/") for t, _ in g), 1.0)
            heard = [m for m in took if m[0].startswith("hive-7/")]
            got += took
        assert heard and heard[0][1]["channels"] == {"kg": {"current-value": 41.0}}
        owner = [u for u in units if partition_of("hive-7", 8) in _owned(u)]
        assert len(owner) == 1
        # a replica holding every partition holds the unit's inbox_bytes in all (8 MiB)
        shares = {rt._inbox.memory for u in units for rt in u.runtime.owned.values()}
        assert shares == {1 << 20}
        for key, update in readings[half:]:
            fleet.publish(key, update)
        got += outputs.take(_echoed(*readings[-1]))
        got += outputs.take(lambda g: False, timeout=1.5)
        sample = "cloudlet_registry_reloads_total"
        reloads = [u.metrics.registry.get_sample_value(sample, {"unit": u.instance})
                   for u in units]  # fmt: skip
        assert reloads == [1.0, 1.0]
    finally:
        fleet.stop()
        outputs.close()
        for unit in units:
            unit.stop()
    results = _results(got)
    missing, extra = sorted(set(expected) - set(results)), sorted(set(results) - set(expected))
    assert results == expected, f"missing {missing[:5]}, extra {extra[:5]}"


def test_membership_reads_only_what_is_its_own() -> None:
    """A stray message on the coordination topics (a partition named otherwise) costs itself
    only: the view goes on."""
    from types import SimpleNamespace

    from processors.partitions import Membership, PartitionTopics
    from streams.topics import TopicScheme

    changes: list[int] = []
    m = Membership(MqttSettings(url="mqtt://127.0.0.1:1"), PartitionTopics(TopicScheme(), "u"),
                   "u-a", lambda: changes.append(1))  # fmt: skip

    def msg(topic: str, payload: bytes) -> Any:
        return SimpleNamespace(topic=topic, payload=payload)

    m._on_messages([msg("cloudlet/units/u/partitions/x/owner", b"u-b"),
                    msg("cloudlet/units/u/partitions/3/owner", b"u-b"),
                    msg("cloudlet/units/u/members/u-b", b"1")])  # fmt: skip
    assert m.view() == (["u-b"], {3: "u-b"}) and changes == [1]


@pytest.mark.mqtt
def test_an_object_regrouped_by_a_reload_is_processed_by_its_new_partition_only(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """s1 and s2 in partitions 0 and 2; a flow added that averages across both puts s2 in
    s1's partition. Its old partition's session leaves s2's topics (the subscriptions are in
    the snapshot): a reading of s2 is echoed once, not once per partition."""
    objects = tmp_path / "objects"
    objects.mkdir()
    for so in ("s1", "s2"):
        (objects / f"{so}.yaml").write_text(
            f"id: {so}\nstreams: {{data: {{channels: {{t: {{type: number}}}}}}}}\n"
        )
    doc = {"name": "rg", "objects": [str(objects)], "mqtt": {"url": mosquitto.url},
           "partitions": {"count": 4}, "reload": "200ms"}  # fmt: skip
    (tmp_path / "rg.yaml").write_bytes(orjson.dumps(doc))
    unit = Unit(UnitConfig.load(tmp_path / "rg.yaml"), replica="a").start()
    outputs = Outputs(mosquitto, "outputs-regroup")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-regroup").start()
    s2 = StreamKey("s2", "data")
    try:
        _wait(lambda: unit.runtime.ready and _owned(unit) == {0, 2})
        (objects / "all.flows.yaml").write_text(
            "flows:\n  both:\n    from: 's*/data'\n    key: none\n    window: {tumbling: 1m}\n"
            "    aggregates: {n: count()}\n    into: s1/n_1m\n"
        )
        _wait(lambda: _owned(unit) == {0} and unit.runtime.ready)
        fleet.publish(s2, SensorUpdate({"t": 1.0}, T0))
        got = outputs.take(lambda g: False, timeout=2.0)
        present: queue.SimpleQueue[bool] = queue.SimpleQueue()
        probe = make_client(MqttSettings(url=mosquitto.url), "rg-p02")  # s2's old partition
        probe.on_connect = lambda _c, _u, flags, *_: present.put(flags.session_present)
        connect(probe, MqttSettings(url=mosquitto.url), persistent=True)
        probe.loop_start()
        old_session = present.get(timeout=10)
        probe.loop_stop()
        probe.disconnect()
    finally:
        fleet.stop()
        outputs.close()
        unit.stop()
    echoes = [b for t, b in got if t == "s2/streams/data/updates"]
    assert [e["lastUpdate"] for e in echoes] == [T0]
    assert old_session is False  # ended: nothing of s2 queued there, to come out late
