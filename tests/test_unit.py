"""Processing units over the real Mosquitto: config, metrics and health, sink and state,
a SIGKILL mid-stream losing nothing, and replicas sharing a subscription."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from edge_objects.fleet import DeviceFleet
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from processors.config import ConfigError, UnitConfig
from processors.engine import engine_of
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings, connect, make_client
from tests.test_cli import CLOUDLET
from tests.test_processors import OBJECTS

IRRIGATION = scenario_dir("irrigation")
T0 = 1_700_006_400_000


def _config(tmp_path: Path, broker: Mosquitto, **extra: Any) -> Path:
    doc = {
        "name": extra.pop("name", "unit-test"),
        "objects": [str(extra.pop("objects", IRRIGATION / "objects"))],
        "mqtt": {"url": broker.url},
        **extra,
    }
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps(doc))  # JSON is YAML
    return path


class Collector:
    """An MQTT client that records every update and dead letter the units publish."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.messages: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        ready = threading.Event()
        self.client = make_client(MqttSettings(url=broker.url), name)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("+/streams/+/updates", 1), ("cloudlet/dead-letter/#", 1)]
        )
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, orjson.loads(m.payload))
        )
        connect(self.client, MqttSettings(url=broker.url), persistent=False)
        self.client.loop_start()
        assert ready.wait(10)

    def take(self, until: Any, timeout: float = 60) -> list[tuple[str, dict[str, Any]]]:
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while not until(got) and time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=0.2))
            except queue.Empty:
                pass
        return got

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _readings(steps: int, seed: int = 3) -> list[tuple[StreamKey, SensorUpdate]]:
    site = IrrigationSite.load(IRRIGATION / "site.yaml")
    model = IrrigationModel(site, seed=seed, start_ms=T0)
    return [r for _ in range(steps) for r in model.step(60)]


def _raw_updates(got: list[tuple[str, dict[str, Any]]], streams: set[str]) -> set[tuple[str, int]]:
    return {
        (topic.split("/")[0] + "/" + topic.split("/")[2], body["lastUpdate"])
        for topic, body in got
        if topic.endswith("/updates") and topic.split("/")[2] in streams
    }


def _missing(
    got: list[tuple[str, dict[str, Any]]], everything: set[tuple[str, int]], log: Path,
    alive: bool,
) -> str:  # fmt: skip
    """What a restart test lacks, said briefly enough to read in a CI log: how many updates
    never came out, the first and last of them, the dead letters' reasons, the unit's log."""
    missing = sorted(everything - _raw_updates(got, {"soil", "state", "rain", "weather"}))
    if not missing:
        return ""
    reasons: dict[str, int] = defaultdict(int)
    for topic, body in got:
        if topic.startswith("cloudlet/dead-letter/"):
            reasons[str(body.get("reason"))] += 1
    lines = log.read_text(errors="replace").splitlines()
    return (
        f"{len(missing)} of {len(everything)} updates never came out (first {missing[0]},"
        f" last {missing[-1]}); {len(got)} messages collected; dead letters {dict(reasons)};"
        f" the restarted unit {'was still running' if alive else 'had exited'} at the end;"
        " its log:\n" + "\n".join(lines[-40:])
    )


def test_config_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "unit.yaml"
    path.write_text(
        "name: 'bad name'\nobjects: []\nmqtt: {url: 'http://x'}\ncheckpoint: {every: soon}\n"
        "colour: red\n"
    )
    with pytest.raises(ConfigError) as info:
        UnitConfig.load(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}: name: unit name 'bad name' must be 1-64 letters, digits, '_', '.' or '-' (it"
        " is the MQTT client id and the state file's name)",
        f"{path}: objects: List should have at least 1 item after validation, not 0",
        f"{path}: mqtt.url: broker url 'http://x' must look like mqtt://host:1883 or"
        " mqtts://host:8883 (credentials may go before the host: mqtt://user:secret@host:1883)",
        f"{path}: checkpoint.every: 'soon' is not a duration (write e.g. 500ms, 30s, 10m, 1h or"
        " 2d)",
        f"{path}: colour: Extra inputs are not permitted",
    ]


def test_relative_paths_and_the_shared_subscription(tmp_path: Path) -> None:
    path = tmp_path / "unit.yaml"
    path.write_text(
        "name: u1\nobjects: [objects/]\nshare_group: field\nstate_dir: state\n"
        "sink: {sqlite: out/results.db}\n"
    )
    config = UnitConfig.load(path)
    assert config.objects == [tmp_path / "objects"]
    assert config.state_dir == tmp_path / "state"
    assert config.sink is not None and config.sink.sqlite == tmp_path / "out/results.db"
    assert config.subscription == "$share/field/+/streams/+"


@pytest.mark.mqtt
def test_a_unit_processes_publishes_stores_and_reports(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = _config(
        tmp_path, mosquitto, name="u-metrics", http={"port": 0}, state_dir="state",
        sink={"sqlite": "results.db"}, checkpoint={"every": "100ms", "messages": 10_000},
    )  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-metrics")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-metrics").start()
    try:
        assert unit.runtime.connected.wait(10)
        readings = _readings(15)  # 15 minutes of a 10-device site: one 10-minute window fires
        for key, update in readings:
            fleet.publish(key, update)
        fleet.publish_raw("field-1-soil/streams/soil", b'{"channels": 1}', "bad")
        got = collector.take(
            lambda g: len(_raw_updates(g, {"soil", "state", "rain", "weather"})) >= 150
        )
        assert len(_raw_updates(got, {"soil", "state", "rain", "weather"})) == 150
        base = f"http://127.0.0.1:{unit.status.port}"  # type: ignore[union-attr]
        assert urllib.request.urlopen(f"{base}/healthz").status == 200
        assert urllib.request.urlopen(f"{base}/readyz").status == 200
        deadline = time.monotonic() + 10
        while unit.runtime.published.messages < 151 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        for line in (
            'cloudlet_messages_received_total{unit="u-metrics"} 151.0',
            'cloudlet_updates_accepted_total{unit="u-metrics"} 150.0',
            'cloudlet_updates_rejected_total{reason="missing_last_update",unit="u-metrics"} 1.0',
            'cloudlet_dead_letters_total{unit="u-metrics"} 1.0',
            'cloudlet_mqtt_connected{unit="u-metrics"} 1.0',
        ):
            assert line in metrics, [m for m in metrics.splitlines() if "_total{" in m]
        assert 'cloudlet_batch_seconds_count{unit="u-metrics"}' in metrics
    finally:
        fleet.stop()
        collector.close()
        unit.stop()
    db = sqlite3.connect(tmp_path / "results.db")
    streams = dict(db.execute("SELECT stream, count(*) FROM results GROUP BY stream").fetchall())
    assert streams["soil"] == 60 and streams["moisture_10min"] == 4
    assert (tmp_path / "state" / "u-metrics.state").exists()


def _unit_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [CLOUDLET, "unit", "run", str(config), "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.mqtt
def test_sigkill_mid_stream_loses_no_update_and_no_window_state(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = _config(
        tmp_path, mosquitto, name="u-kill", state_dir="state",
        checkpoint={"every": "200ms", "messages": 100},
    )  # fmt: skip
    readings = _readings(120)  # two hours: 1200 updates, 12 windows per field
    reference = engine_of(Catalog.load([IRRIGATION / "objects"]), clock=lambda: 0.0).process(
        readings
    )
    expected = {
        (k.so, u.last_update): u.channels["moisture"]
        for k, u in reference.derived
        if k.stream == "moisture_10min"
    }
    everything = {(f"{k.so}/{k.stream}", u.last_update) for k, u in readings}
    raw_streams = {"soil", "state", "rain", "weather"}

    def windows(got: list[tuple[str, dict[str, Any]]]) -> dict[tuple[str, int], set[float]]:
        seen: dict[tuple[str, int], set[float]] = defaultdict(set)
        for topic, body in got:
            if topic.endswith("/moisture_10min/updates"):
                seen[(topic.split("/")[0], body["lastUpdate"])].add(
                    body["channels"]["moisture"]["current-value"]
                )
        return seen

    collector = Collector(mosquitto, "collector-kill")
    log = tmp_path / "unit.log"
    unit = _unit_process(path, log)
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-kill").start()
    try:
        deadline = time.monotonic() + 30
        while b"subscription" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # subscribed once, so the broker keeps a session for it
        for key, update in readings[:700]:
            fleet.publish(key, update)
        got = collector.take(lambda g: len(_raw_updates(g, {"soil"})) >= 100)
        # a checkpoint on disk, so the restart has window state to restore (on a loaded
        # machine the first 400 messages may all be one batch, not yet checkpointed)
        snapshot = tmp_path / "state" / "u-kill.state"
        deadline = time.monotonic() + 10
        while not snapshot.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        unit.send_signal(signal.SIGKILL)  # mid-stream, while messages are in flight
        unit.wait(10)
        for key, update in readings[700:]:
            fleet.publish(key, update)  # queued by the broker for the unit's session
        assert fleet.flush(30)
        unit = _unit_process(path, log)
        got += collector.take(
            lambda g: (
                _raw_updates(got + g, raw_streams) >= everything
                and windows(got + g).keys() >= expected.keys()
            ),
            timeout=90,
        )
    finally:
        fleet.stop()
        alive = unit.poll() is None
        unit.send_signal(signal.SIGTERM)
        assert unit.wait(30) == 0
        collector.close()
    # every device update came out (at least once: those processed but not yet
    # checkpointed when the unit died were processed again after the restart)
    assert not (report := _missing(got, everything, log, alive)), report
    # and every window carries exactly what an uninterrupted run computes
    seen = windows(got)
    assert {k: v.pop() if len(v) == 1 else v for k, v in seen.items()} == expected
    assert b'"restored state from' in log.read_bytes()


@pytest.mark.mqtt
def test_replicas_share_a_subscription_without_loss_or_double_processing(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = _config(
        tmp_path, mosquitto, name="u-shared", share_group="shared",
        objects=Path(__file__).parent / "data" / "servioticy",
    )  # fmt: skip
    config = UnitConfig.load(path)
    replicas = [Unit(config, replica=r).start() for r in ("a", "b")]
    collector = Collector(mosquitto, "collector-shared")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-shared").start()
    device = "1396461657731411aa73c28444ecf9a8c803e62312fd1"
    try:
        for r in replicas:
            assert r.runtime.connected.wait(10)
        sent = {T0 + i for i in range(2000)}
        for t in sorted(sent):
            fleet.publish(StreamKey(device, "data"), SensorUpdate({"temperature": 20.0}, t))
        got = collector.take(lambda g: len(g) >= 2000, timeout=60)
        got += collector.take(lambda g: False, timeout=1)  # and then nothing more
    finally:
        fleet.stop()
        collector.close()
        for r in replicas:
            r.stop()
    raw = [b["lastUpdate"] for t, b in got if t == f"{device}/streams/data/updates"]
    assert sorted(raw) == sorted(sent)  # each once: none lost, none processed twice
    shares = [r.runtime.published.updates for r in replicas]
    assert sum(shares) == 2000 and min(shares) > 0, shares


@pytest.mark.mqtt
def test_processors_in_a_unit_publish_dead_letter_and_count(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "objects.yaml").write_text(OBJECTS)
    path = _config(
        tmp_path, mosquitto, name="u-plugins", objects=tmp_path / "objects", http={"port": 0},
        processors=[
            {"use": "threshold", "from": "s1/data", "into": "alert",
             "config": {"value": "t", "high": 40, "low": 30}},
            {"use": "tests.test_processors:Running", "name": "running", "from": "s1/data",
             "into": "total"},
        ],
    )  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-plugins")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-plugins").start()
    values = [35, 45, -5, 20, 10]
    try:
        assert unit.runtime.connected.wait(10)
        for i, v in enumerate(values):
            fleet.publish(StreamKey("s1", "data"), SensorUpdate({"t": v}, T0 + i))
        got = collector.take(lambda g: len(g) >= len(values) + 3 + 4 + 1)
        got += collector.take(lambda g: False, timeout=0.5)
        base = f"http://127.0.0.1:{unit.status.port}"  # type: ignore[union-attr]
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    finally:
        fleet.stop()
        collector.close()
        unit.stop()

    def stream(name: str) -> list[tuple[int, Any]]:
        return [
            (body["lastUpdate"] - T0, {c: v["current-value"] for c, v in body["channels"].items()})
            for topic, body in got
            if topic == f"s1/streams/{name}/updates"
        ]

    assert stream("alert") == [(0, {"active": False, "value": 35.0}),
                               (1, {"active": True, "value": 45.0}),
                               (2, {"active": False, "value": -5.0})]  # fmt: skip
    assert stream("total") == [(0, {"total": 35}), (1, {"total": 80}), (3, {"total": 100}),
                               (4, {"total": 110})]  # fmt: skip
    letters = [body for topic, body in got if topic.startswith("cloudlet/dead-letter/")]
    assert [(d["reason"], orjson.loads(d["payload"])["lastUpdate"]) for d in letters] == [
        ("processor_failed", T0 + 2)
    ]
    for line in (
        'cloudlet_processor_updates_total{outcome="received",processor="running",unit="u-plugins"}'
        " 5.0",
        'cloudlet_processor_updates_total{outcome="failed",processor="running",unit="u-plugins"}'
        " 1.0",
        'cloudlet_processor_updates_total{outcome="emitted",processor="threshold",unit="u-plugins"}'
        " 3.0",
        'cloudlet_updates_rejected_total{reason="processor_failed",unit="u-plugins"} 1.0',
    ):
        assert line in metrics, [m for m in metrics.splitlines() if "processor" in m]


@pytest.mark.mqtt
def test_killed_between_snapshot_and_acks_nothing_counts_twice(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The narrowest window: the snapshot is on disk, the acknowledgements never left. The
    broker redelivers those messages; the restored state already holds them."""
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "objects.yaml").write_text(OBJECTS)
    path = _config(
        tmp_path, mosquitto, name="u-covered", objects=tmp_path / "objects", state_dir="state",
        checkpoint={"every": "1h", "messages": 10},
        processors=[{"use": "tests.test_processors:Running", "from": "s1/data", "into": "total"}],
    )  # fmt: skip
    config = UnitConfig.load(path)
    key = StreamKey("s1", "data")
    first = Unit(config).start()
    first.runtime._client.ack = lambda *_args, **_kw: None  # the acknowledgements never leave
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-covered").start()
    collector = Collector(mosquitto, "collector-covered")
    try:
        assert first.runtime.connected.wait(10)
        for i in range(10):
            fleet.publish(key, SensorUpdate({"t": i + 1}, T0 + i))
        got = collector.take(lambda g: len([t for t, _ in g if "/total/" in t]) >= 10)
        deadline = time.monotonic() + 10
        while first.metrics.checkpoints.value < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.runtime.state = None  # "die": no final checkpoint...
        first.runtime._stopping.set()  # ... and no acknowledgement ever
        first.runtime._worker.join(5)
        first.runtime._client.stop()
        second = Unit(config).start()
        try:
            assert second.runtime.connected.wait(10)
            fleet.publish(key, SensorUpdate({"t": 100}, T0 + 10))
            got += collector.take(lambda g: any(b["lastUpdate"] == T0 + 10 for t, b in g
                                                if "/total/" in t))  # fmt: skip
            skipped = second.metrics.redelivered.value
        finally:
            second.stop()
    finally:
        fleet.stop()
        collector.close()
    totals = [b["channels"]["total"]["current-value"] for t, b in got if "/total/" in t]
    assert totals == [sum(range(1, n + 1)) for n in range(1, 11)] + [155]
    assert skipped == 10


@pytest.mark.mqtt
def test_a_unit_can_leave_the_echo_of_device_updates_out(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = _config(tmp_path, mosquitto, name="u-no-echo", republish={"updates": False})
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-no-echo")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-no-echo").start()
    try:
        assert unit.runtime.connected.wait(10)
        for key, update in _readings(15):  # one 10-minute window of four fields fires
            fleet.publish(key, update)
        got = collector.take(lambda g: len([t for t, _ in g if "moisture_10min" in t]) >= 4)
        got += collector.take(lambda g: False, timeout=0.5)
    finally:
        fleet.stop()
        collector.close()
        unit.stop()
    streams = {t.split("/")[2] for t, _ in got}
    assert "moisture_10min" in streams and "irrigate" in streams  # derived: published
    assert not streams & {"soil", "state", "rain", "weather"}  # device updates: not echoed


@pytest.mark.mqtt
def test_a_unit_can_echo_a_batch_per_stream(mosquitto: Mosquitto, tmp_path: Path) -> None:
    path = _config(tmp_path, mosquitto, name="u-batch-echo", republish={"batch": True},
                   batch_size=1000)  # fmt: skip
    config = UnitConfig.load(path)
    first = Unit(config).start()  # its session exists from now on, and keeps what arrives
    assert first.runtime.connected.wait(10)
    first.stop()
    collector = Collector(mosquitto, "collector-batch-echo")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-batch-echo").start()
    readings = _readings(15)
    raw = ("soil", "state", "rain", "weather")

    def echoed_count(g: list[tuple[str, Any]]) -> int:
        return sum(len(b) if isinstance(b, list) else 1 for t, b in g if t.split("/")[2] in raw)

    unit = Unit(config)
    try:
        for key, update in readings:  # queued on the broker while the unit is away
            fleet.publish(key, update)
        assert fleet.flush(10)
        unit.start()
        got = collector.take(lambda g: echoed_count(g) >= 150)
    finally:
        fleet.stop()
        collector.close()
        unit.stop()
    echoed = [(t, b) for t, b in got if t.split("/")[2] in raw]
    times = sorted((t.split("/")[0], u["lastUpdate"]) for t, b in echoed
                   for u in (b if isinstance(b, list) else [b]))  # fmt: skip
    assert times == sorted((k.so, u.last_update) for k, u in readings)
    assert any(isinstance(b, list) and len(b) > 1 for _, b in echoed)  # batched per stream


@pytest.mark.mqtt
def test_a_qos_0_echo_is_not_waited_for(mosquitto: Mosquitto, tmp_path: Path) -> None:
    path = _config(tmp_path, mosquitto, name="u-qos0", republish={"qos": 0})
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-qos0")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-qos0").start()
    try:
        assert unit.runtime.connected.wait(10)
        for key, update in _readings(15):
            fleet.publish(key, update)
        got = collector.take(lambda g: len(_raw_updates(g, {"soil", "state", "rain",
                                                            "weather"})) >= 150)  # fmt: skip
        deadline = time.monotonic() + 10
        while unit.runtime.published.messages < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = unit.runtime._client.outstanding
    finally:
        fleet.stop()
        collector.close()
        unit.stop()
    assert len(_raw_updates(got, {"soil", "state", "rain", "weather"})) == 150
    assert waiting == 0  # QoS 0 echoes never count as waiting for the broker


def _batches(unit: Unit, name: str, at_most: float) -> tuple[float, float]:
    """(batches, those of at most `at_most` messages) the unit has processed."""
    registry = unit.runtime.metrics.registry
    count = registry.get_sample_value("cloudlet_batch_messages_count", {"unit": name}) or 0.0
    small = registry.get_sample_value(
        "cloudlet_batch_messages_bucket", {"unit": name, "le": str(float(at_most))}
    )
    return count, small or 0.0


@pytest.mark.mqtt
def test_batches_follow_the_traffic(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Batching adapts: while traffic is light each message is a batch of its own, processed
    as soon as it comes (nothing waits to fill a batch); a backlog goes in full batches."""
    path = _config(tmp_path, mosquitto, name="u-adaptive", batch_size=100)
    readings = _readings(30)  # 300 device messages
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-adaptive").start()
    unit = Unit(UnitConfig.load(path)).start()
    try:
        assert unit.runtime.connected.wait(10)
        for i, (key, update) in enumerate(readings[:5]):  # light: one message at a time
            fleet.publish(key, update)
            deadline = time.monotonic() + 10
            while unit.runtime.published.messages <= i and time.monotonic() < deadline:
                time.sleep(0.01)
        assert _batches(unit, "u-adaptive", 1) == (5.0, 5.0)
        unit.stop()
        for key, update in readings[5:]:  # heavy: a backlog waits for the unit
            fleet.publish(key, update)
        assert fleet.flush(30)
        unit = Unit(UnitConfig.load(path)).start()
        deadline = time.monotonic() + 30
        while unit.runtime.published.messages < 295 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unit.runtime.published.messages == 295
        batches, up_to_50 = _batches(unit, "u-adaptive", 50)
        assert _batches(unit, "u-adaptive", 100) == (batches, batches)  # none over batch_size
        assert batches - up_to_50 >= 2  # full batches: 295 messages in a handful of batches
        assert batches <= 20
    finally:
        fleet.stop()
        unit.stop()


@pytest.mark.mqtt
def test_a_linger_gathers_light_traffic_into_batches(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """With `linger`, a batch not full waits that long after its first message for more:
    messages 20 ms apart go in batches of several, not one each; a lone message is still
    processed, once its linger is over."""
    path = _config(tmp_path, mosquitto, name="u-linger", batch_size=100, linger=400)
    readings = _readings(1)  # 10 device messages
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-linger").start()
    unit = Unit(UnitConfig.load(path)).start()
    try:
        assert unit.runtime.connected.wait(10)
        started = time.monotonic()
        key, update = readings[0]  # alone: processed after its linger, not before
        fleet.publish(key, update)
        deadline = time.monotonic() + 10
        while unit.runtime.published.messages < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert unit.runtime.published.messages == 1
        assert time.monotonic() - started >= 0.4
        assert _batches(unit, "u-linger", 1) == (1.0, 1.0)
        for key, update in readings[1:]:  # nine, 20 ms apart: well within one linger
            fleet.publish(key, update)
            time.sleep(0.02)
        deadline = time.monotonic() + 10
        while unit.runtime.published.messages < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert unit.runtime.published.messages == 10
        batches, single = _batches(unit, "u-linger", 1)
        assert single == 1.0  # only the lone message was a batch of its own
        assert batches <= 3  # the nine in one batch, two at most if the host stalls
    finally:
        fleet.stop()
        unit.stop()


@pytest.mark.mqtt
def test_a_linger_ends_when_the_batch_is_full_by_its_bytes(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A batch full by `batch_bytes` goes at once, however long its linger: 30 messages of
    about 100 bytes against 1,024 bytes a batch and a linger of a second, most of them are
    processed well within that second (the broker's confirmations of their echoes are
    taken in the worker's next turn, so they wait for the last batch's linger)."""
    path = _config(tmp_path, mosquitto, name="u-linger-bytes", batch_size=100,
                   batch_bytes=1024, linger="1s")  # fmt: skip
    readings = _readings(3)  # 30 device messages, about 3,000 bytes
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-linger-b").start()
    unit = Unit(UnitConfig.load(path)).start()
    try:
        assert unit.runtime.connected.wait(10)
        started = time.monotonic()
        for key, update in readings:
            fleet.publish(key, update)
        registry, labels = unit.runtime.metrics.registry, {"unit": "u-linger-bytes"}
        while time.monotonic() - started < 10:  # messages taken into batches
            taken = registry.get_sample_value("cloudlet_batch_messages_sum", labels) or 0.0
            if taken >= 20:
                break
            time.sleep(0.005)
        assert time.monotonic() - started < 0.7  # full batches did not wait their second
        deadline = time.monotonic() + 10
        while unit.runtime.published.messages < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert unit.runtime.published.messages == 30  # the last, not full, after its linger
    finally:
        fleet.stop()
        unit.stop()


RELOAD_OBJECTS = """\
id: s%d
streams: {data: {channels: {t: {type: number}}}}
"""
RELOAD_FLOW = """\
flows:
  minute:
    from: "s*/data"
    window: {tumbling: 1m}
    aggregates: {avg: avg(t), n: count()}
    into: "{so}/t_1m"
"""


def _reloads(unit: Unit, name: str, metric: str = "cloudlet_registry_reloads_total") -> float:
    return unit.runtime.metrics.registry.get_sample_value(metric, {"unit": name}) or 0.0


@pytest.mark.mqtt
def test_a_running_unit_takes_registry_changes_without_a_restart(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Hot reload: an object added to the folder is accepted within seconds, one removed is
    refused `unknown_object`, a changed stream takes its new channels, a file with a problem
    is not taken (the unit runs what it had), and the windows of the flow, whose definition
    did not change, carry on as if nothing happened."""
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "s1.yaml").write_text(RELOAD_OBJECTS % 1)
    (objects / "minute.flows.yaml").write_text(RELOAD_FLOW)
    path = _config(tmp_path, mosquitto, name="u-reload", objects=objects, reload="200ms")
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-reload")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-reload").start()
    s1, s3 = StreamKey("s1", "data"), StreamKey("s3", "data")

    def wait_for(what: Any) -> None:
        deadline = time.monotonic() + 5  # "within seconds"
        while not what() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert what()

    def letter(got: list[tuple[str, dict[str, Any]]]) -> list[str]:
        return [body["reason"] for topic, body in got if topic.startswith("cloudlet/dead")]

    try:
        assert unit.runtime.connected.wait(10)
        for i in range(3):  # s1's first minute, before any change
            fleet.publish(s1, SensorUpdate({"t": float(i)}, T0 + i * 1000))
        fleet.publish(s3, SensorUpdate({"t": 5.0}, T0 + 3000))
        assert letter(collector.take(lambda g: letter(g))) == ["unknown_object"]

        (objects / "s3.yaml").write_text(RELOAD_OBJECTS % 3)  # added
        wait_for(lambda: _reloads(unit, "u-reload") == 1)
        fleet.publish(s3, SensorUpdate({"t": 5.0}, T0 + 4000))
        got = collector.take(lambda g: any(t == "s3/streams/data/updates" for t, _ in g))
        assert [b["channels"] for t, b in got if t == "s3/streams/data/updates"] == [
            {"t": {"current-value": 5.0}}]  # fmt: skip
        fleet.publish(s1, SensorUpdate({"t": 1.0, "h": 2.0}, T0 + 2500))
        assert letter(collector.take(lambda g: letter(g))) == ["unknown_channel"]
        (objects / "s1.yaml").write_text(  # changed: a channel more
            "id: s1\nstreams: {data: {channels: {t: {type: number}, h: {type: number}}}}\n"
        )
        wait_for(lambda: _reloads(unit, "u-reload") == 2)
        for i in range(3, 6):  # s1's minute goes on in the windows it had
            fleet.publish(s1, SensorUpdate({"t": float(i), "h": 1.0}, T0 + i * 1000))
        got = collector.take(lambda g: len([t for t, _ in g if t.startswith("s1/")]) >= 3)
        assert [b["channels"]["h"] for t, b in got if t == "s1/streams/data/updates"] == [
            {"current-value": 1.0}] * 3  # fmt: skip

        (objects / "s3.yaml").write_text("id: s3\nstreams: {data: {channels: {t: {type: bogus}}}}")
        wait_for(lambda: _reloads(unit, "u-reload", "cloudlet_registry_reload_failures_total"))
        (objects / "s3.yaml").unlink()  # removed
        wait_for(lambda: _reloads(unit, "u-reload") == 3)
        fleet.publish(s3, SensorUpdate({"t": 6.0}, T0 + 7000))
        assert letter(collector.take(lambda g: letter(g))) == ["unknown_object"]

        fleet.publish(s1, SensorUpdate({"t": 0.0}, T0 + 120_000))  # the minute closes
        got = collector.take(lambda g: any(t == "s1/streams/t_1m/updates" for t, _ in g))
        minute = [b["channels"] for t, b in got if t == "s1/streams/t_1m/updates"]
        assert minute == [{"avg": {"current-value": 2.5}, "n": {"current-value": 6}}]
        assert not [t for t, _ in got if t.startswith("s3/")]  # its window went with it
        assert unit.alive
    finally:
        fleet.stop()
        collector.close()
        unit.stop()


@pytest.mark.mqtt
def test_the_windows_are_identical_with_and_without_a_hot_reload_of_an_unrelated_object(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The irrigation site's readings through a unit twice: once as they are, once with an
    unrelated object added and then removed mid-stream (two hot reloads). Every window the
    flows close, every composite stream computed from them: the same, value for value."""
    readings = _readings(70)
    half = len(readings) // 2
    derived = ("moisture_10min", "rain_1h", "irrigate")

    def run(name: str, reload: bool) -> list[tuple[str, str]]:
        objects = tmp_path / name / "objects"
        shutil.copytree(IRRIGATION / "objects", objects)
        unit = Unit(UnitConfig.load(_config(tmp_path / name, mosquitto, name=name,
                                            objects=objects, reload="200ms"))).start()  # fmt: skip
        collector = Collector(mosquitto, f"collector-{name}")
        fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id=f"fleet-{name}").start()

        def echoed(key: StreamKey, update: SensorUpdate) -> Any:
            topic = f"{key.so}/streams/{key.stream}/updates"
            return lambda g: any(t == topic and b["lastUpdate"] == update.last_update
                                 for t, b in g)  # fmt: skip

        try:
            assert unit.runtime.connected.wait(10)
            for key, update in readings[:half]:
                fleet.publish(key, update)
            got = collector.take(echoed(*readings[half - 1]))
            if reload:
                (objects / "hive-7.yaml").write_text(
                    "id: hive-7\nstreams: {weight: {channels: {kg: {type: number}}}}\n"
                )
                deadline = time.monotonic() + 10
                while _reloads(unit, name) < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                fleet.publish(StreamKey("hive-7", "weight"), SensorUpdate({"kg": 41.0}, T0))
            for key, update in readings[half : half + 100]:
                fleet.publish(key, update)
            got += collector.take(echoed(*readings[half + 99]))
            if reload:
                (objects / "hive-7.yaml").unlink()
                deadline = time.monotonic() + 10
                while _reloads(unit, name) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _reloads(unit, name) == 2
            for key, update in readings[half + 100 :]:
                fleet.publish(key, update)
            got += collector.take(echoed(*readings[-1]))
            got += collector.take(lambda g: False, timeout=1.0)  # what the last ones derived
        finally:
            fleet.stop()
            collector.close()
            unit.stop()
        return sorted((t, orjson.dumps(b, option=orjson.OPT_SORT_KEYS).decode())
                      for t, b in got if t.split("/")[2] in derived)  # fmt: skip

    plain, reloaded = run("u-windows-plain", False), run("u-windows-reloaded", True)
    assert len({t for t, _ in plain if "/moisture_10min/" in t}) == 4  # every field's windows
    assert len(plain) > 100 and reloaded == plain


@pytest.mark.mqtt
def test_without_a_state_store_a_sigkill_loses_no_update(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Outputs go out without waiting for the broker; the inputs are acknowledged only once
    the broker has every output they produced. Killed mid-stream, the unit loses nothing: the
    broker redelivers what was not acknowledged, and each update comes out at least once."""
    path = _config(tmp_path, mosquitto, name="u-kill-nostate")
    readings = _readings(120)
    everything = {(f"{k.so}/{k.stream}", u.last_update) for k, u in readings}
    raw_streams = {"soil", "state", "rain", "weather"}
    collector = Collector(mosquitto, "collector-kill-nostate")
    log = tmp_path / "unit.log"
    unit = _unit_process(path, log)
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-kill-nostate").start()
    try:
        deadline = time.monotonic() + 30
        while b"subscription" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # subscribed once, so the broker keeps a session for it
        for key, update in readings[:700]:
            fleet.publish(key, update)
        got = collector.take(lambda g: len(_raw_updates(g, {"soil"})) >= 100)
        unit.send_signal(signal.SIGKILL)  # outputs and acknowledgements in flight
        unit.wait(10)
        for key, update in readings[700:]:
            fleet.publish(key, update)
        assert fleet.flush(30)
        unit = _unit_process(path, log)
        got += collector.take(lambda g: _raw_updates(got + g, raw_streams) >= everything,
                              timeout=90)  # fmt: skip
    finally:
        fleet.stop()
        alive = unit.poll() is None
        unit.send_signal(signal.SIGTERM)
        assert unit.wait(30) == 0
        collector.close()
    assert not (report := _missing(got, everything, log, alive)), report


@pytest.mark.mqtt
@pytest.mark.parametrize("per", ["message", "update", "kernel failing"])
def test_the_echo_follows_the_device_messages(
    mosquitto: Mosquitto, tmp_path: Path, per: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default each device message is echoed as one message: a single update as itself, a
    list or a columnar batch as the list of its updates (ServIoTicy's batch form); `per:
    update` echoes every update on its own. Either way, every accepted update, in order; and
    so if the echo kernel fails (the pure-Python way then)."""
    # each variant its own clients: a unit's persistent session must not meet another's
    name = per.replace(" ", "-")
    if per == "kernel failing":
        from streams import kernels

        def broken(*_: Any) -> Any:
            raise RuntimeError("a bug of the echo kernel")

        monkeypatch.setattr(kernels, "echo_updates", broken)
        per = "message"
    path = _config(tmp_path, mosquitto, name=f"u-echo-{name}", republish={"per": per},
                   batch_size=100)  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, f"collector-echo-{name}")
    sender = make_client(MqttSettings(url=mosquitto.url), f"sender-echo-{name}")
    sent = threading.Event()
    sender.on_connect = lambda *_: sent.set()
    connect(sender, MqttSettings(url=mosquitto.url), persistent=False)
    sender.loop_start()
    assert sent.wait(10)
    topic = "rain-gauge-1/streams/rain"
    docs = [
        {"lastUpdate": [T0, T0 + 1, T0 + 2], "channels": {"mm": [0.5, 1.0, 0.0]}},
        [{"channels": {"mm": {"current-value": 2.5}}, "lastUpdate": T0 + 3},
         {"channels": {"mm": {"current-value": 3}}, "lastUpdate": T0 + 4}],
        {"channels": {"mm": {"current-value": 0.25}}, "lastUpdate": T0 + 5},
    ]  # fmt: skip
    try:
        assert unit.runtime.connected.wait(10)
        for doc in docs:
            sender.publish(topic, orjson.dumps(doc), qos=1).wait_for_publish(10)
        got = collector.take(lambda g: len(_flat(g, topic)) >= 6)
    finally:
        sender.loop_stop()
        sender.disconnect()
        collector.close()
        unit.stop()
    echoed = [b for t, b in got if t == topic + "/updates"]
    shapes = [len(b) if isinstance(b, list) else 1 for b in echoed]
    assert shapes == ([3, 2, 1] if per == "message" else [1] * 6)
    assert [(u["lastUpdate"], u["channels"]["mm"]["current-value"]) for u in _flat(got, topic)] == [
        (T0, 0.5),
        (T0 + 1, 1.0),
        (T0 + 2, 0.0),
        (T0 + 3, 2.5),
        (T0 + 4, 3),
        (T0 + 5, 0.25),
    ]


def _flat(got: list[tuple[str, Any]], topic: str) -> list[dict[str, Any]]:
    """The updates echoed on `topic`'s updates, lists unrolled."""
    bodies = [b for t, b in got if t == topic + "/updates"]
    return [u for b in bodies for u in (b if isinstance(b, list) else [b])]


@pytest.mark.mqtt
def test_a_long_message_is_echoed_in_lists_the_broker_takes(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The echo of a message of many readings is cut into lists of at most the unit's payload
    limit (and half the broker's packet size): every reading echoed, in order, none refused."""
    path = _config(tmp_path, mosquitto, name="u-echo-long", max_payload=3000)
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-echo-long")
    sender = make_client(MqttSettings(url=mosquitto.url), "sender-echo-long")
    sent = threading.Event()
    sender.on_connect = lambda *_: sent.set()
    connect(sender, MqttSettings(url=mosquitto.url), persistent=False)
    sender.loop_start()
    topic = "rain-gauge-1/streams/rain"
    values = [i / 4 for i in range(150)]
    doc = {"lastUpdate": [T0 + i for i in range(150)], "channels": {"mm": values}}
    try:
        assert sent.wait(10) and unit.runtime.connected.wait(10)
        assert len(orjson.dumps(doc)) <= 3000
        sender.publish(topic, orjson.dumps(doc), qos=1).wait_for_publish(10)
        got = collector.take(lambda g: len(_flat(g, topic)) >= 150)
    finally:
        sender.loop_stop()
        sender.disconnect()
        collector.close()
        unit.stop()
    bodies = [orjson.dumps(b) for t, b in got if t == topic + "/updates"]
    assert len(bodies) > 1 and all(len(b) <= 3000 + 200 for b in bodies)
    assert [u["channels"]["mm"]["current-value"] for u in _flat(got, topic)] == values
    assert not [t for t, _ in got if t.startswith("cloudlet/dead-letter")]


def test_a_unit_process_bounds_its_malloc_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two glibc arenas in a unit process (a lower peak with 100-reading messages); the
    operator's `MALLOC_ARENA_MAX` wins; nothing to do where the C library is not glibc."""
    import platform

    from cloudlet.unit_run import bound_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert bound_malloc_arenas() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert bound_malloc_arenas() is False


def wait_ready(unit: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30) -> None:
    """Until the unit process on `port` answers /readyz with 200; its log if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline and unit.poll() is None, log.read_text()
        time.sleep(0.1)


SSL_PLUGIN = """
import ssl  # a plug-in that needs OpenSSL (an HTTPS lookup, say)

from pydantic import BaseModel

from processors.plugin import Batch, Output, Processor, Setup


class Moist(Processor[BaseModel]):
    def setup(self, ctx: Setup) -> None:
        ctx.produces({"moisture": "number"})

    def process(self, batch: Batch, out: Output) -> None:
        for key, update in batch:
            out.emit(key, {"moisture": update.channels["moisture"]}, update.last_update)
"""


TOO_LONG = b"x" * 70_000  # past 64 KiB: dead-lettered as an excerpt with its SHA-256
PYTHONPATH = os.environ.get("PYTHONPATH", "")


@pytest.mark.mqtt
@pytest.mark.parametrize("plugin", [False, True], ids=["plain", "plugin"])
def test_a_unit_process_loads_openssl_only_when_its_file_needs_it(
    mosquitto: Mosquitto, tmp_path: Path, plugin: bool
) -> None:
    """A unit whose file configures no TLS, no Kafka and no plug-in runs without OpenSSL (4 MB
    less at rest): it processes, echoes, dead-letters (a SHA-256 of the payload, `hashlib`'s
    own) and serves its status as ever. One with a plug-in, whose code may need it, has it."""
    from cloudlet.rig.process import free_port

    (tmp_path / "ssl_plugin.py").write_text(SSL_PLUGIN)
    port = free_port()
    name = f"u-openssl-{plugin}"
    extra: dict[str, Any] = {"processors": [{"use": "ssl_plugin:Moist", "from": "field-1-soil/soil",
                                             "into": "moist"}]} if plugin else {}  # fmt: skip
    token = "t" * 32  # its /metrics compared in constant time without OpenSSL's hmac
    http = {"port": port, "token": {"token": token}}
    path = _config(tmp_path, mosquitto, name=name, http=http, **extra)
    log = tmp_path / "unit.log"
    unit = subprocess.Popen(
        [CLOUDLET, "unit", "run", str(path)], stdout=subprocess.DEVNULL, stderr=log.open("ab"),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), PYTHONPATH])},
    )  # fmt: skip
    collector = Collector(mosquitto, f"collector-{name}")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id=f"fleet-{name}").start()
    try:
        wait_ready(unit, port, log)
        maps = Path(f"/proc/{unit.pid}/maps").read_text()
        fleet.publish(StreamKey("field-1-soil", "soil"),
                      SensorUpdate({"moisture": 30.0, "temperature": 15.0}, T0))  # fmt: skip
        fleet.publish_raw("field-1-soil/streams/soil", TOO_LONG, "too-long")
        want = {"field-1-soil/streams/soil/updates", "cloudlet/dead-letter/field-1-soil/soil"}
        if plugin:
            want.add("field-1-soil/streams/moist/updates")
        got = collector.take(lambda g: want <= {t for t, _ in g})
        url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url)
        asked = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        metrics = urllib.request.urlopen(asked).read().decode()
    finally:
        fleet.stop()
        collector.close()
        unit.terminate()
    assert unit.wait(30) == 0, log.read_text()
    assert want <= {t for t, _ in got}, (got, log.read_text())
    dead = [b for t, b in got if t.startswith("cloudlet/dead-letter/")]
    assert dead[0]["payloadSha256"] == hashlib.sha256(TOO_LONG).hexdigest()
    assert f'cloudlet_messages_received_total{{unit="{name}"}} 2.0' in metrics
    assert ("libcrypto" in maps, "libssl" in maps) == (plugin, plugin)


def test_what_in_a_unit_file_needs_openssl(tmp_path: Path) -> None:
    from cloudlet.unit_file import UnitFile
    from cloudlet.unit_run import needs_openssl

    def reason(**doc: Any) -> str | None:
        path = tmp_path / "unit.yaml"
        path.write_bytes(orjson.dumps({"name": "u", "objects": [str(OBJECTS)], **doc}))
        return needs_openssl(UnitFile.load(path))

    builtins = [{"use": "window", "from": "s1/data", "into": "w",
                 "config": {"size": "1m", "aggregates": {"n": "count(t)"}}}]  # fmt: skip
    assert reason() is None
    assert (
        reason(processors=builtins, sink={"sqlite": "r.db"}, http={"token": {"token": "x" * 32}})
        is None
    )
    assert reason(mqtt={"url": "mqtts://broker:8883"}) == "its broker connection uses TLS"
    assert reason(mqtt={"url": "mqtt://broker", "tls_ca": "ca.pem"}) == (
        "its broker connection uses TLS"
    )
    assert reason(processors=[{"use": "tests.test_processors:Running", "from": "s1/data"}]) == (
        "its plug-ins (tests.test_processors:Running) may"
    )
    kafka = {"bootstrap_servers": "127.0.0.1:9092"}

    def forward(**more: Any) -> str | None:
        return reason(outbox={"path": "outbox"}, forward={"site": "s", **more})

    assert forward(kafka=kafka) is None  # aiokafka on a plain connection imports no ssl
    assert forward(store="sqlite:///cloud.db") is None
    assert forward(kafka={**kafka, "security_protocol": "SASL_SSL"}) == (
        "its Kafka connection is SASL_SSL"
    )
    assert forward(kafka={**kafka, "security_protocol": "SASL_PLAINTEXT"}) == (
        "its Kafka connection is SASL_PLAINTEXT"
    )
    assert forward(kafka=kafka, registry="fleet") == (
        "it follows the registry (aiokafka's admin client imports ssl)"
    )
    assert forward(store="postgresql://cloud@db/cloud") == "its store is not SQLite"
    assert forward(kafka=kafka, command_mqtt={"url": "mqtts://broker"}) == (
        "its command relay's broker connection uses TLS"
    )
    admin = {"url": "mqtt://broker", "username": "admin", "password": "x"}
    provision = {"site_key": {"token": "k" * 32}, "admin": admin}
    assert forward(kafka=kafka, provision=provision) == "it provisions device identities"
    assert reason(input={"kafka": {"bootstrap_servers": "127.0.0.1:9092"}}) == "it reads Kafka"


def _overruns(unit: Unit, name: str) -> float:
    registry = unit.runtime.metrics.registry
    sample = registry.get_sample_value("cloudlet_receive_maximum_overrun_total", {"unit": name})
    return sample or 0.0


def test_what_the_broker_sends_beyond_the_receive_maximum_is_counted_and_said(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT v5 flow control: the broker may hold at most our receive maximum of QoS 1
    messages unacknowledged with us. What it sends beyond is counted exactly (QoS 0 never is)
    and said in the log, once a minute (not started: the batches are handed in directly)."""
    from streams.kernels._frames_py import Publish

    def batch(ids: range, qos: int = 1) -> list[Any]:
        return [Publish("s/streams/data", b"{}", qos, False, i if qos else 0, None, 0)
                for i in ids]  # fmt: skip

    path = _config(tmp_path, mosquitto, name="u-overrun",
                   mqtt={"url": mosquitto.url, "receive_maximum": 10})  # fmt: skip
    unit = Unit(UnitConfig.load(path))
    runtime = unit.runtime
    runtime._hold(batch(range(1, 9)))  # 8 held: within the quota
    assert _overruns(unit, "u-overrun") == 0 and "beyond" not in caplog.text
    runtime._hold(batch(range(9, 16)) + batch(range(5), qos=0))  # 15 held: 5 beyond
    assert _overruns(unit, "u-overrun") == 5
    assert "beyond this unit's receive maximum (10): 15 held" in caplog.text
    runtime._hold(batch(range(16, 19)))  # already over: each one beyond
    assert _overruns(unit, "u-overrun") == 8
    assert caplog.text.count("beyond this unit's receive maximum") == 1  # once a minute
    runtime._acknowledge(len(runtime._unacked))  # nothing processed through _unacked here
    runtime._held.clear()
    runtime._hold(batch(range(1, 11)))  # acknowledged since: 10 held, the quota again
    assert _overruns(unit, "u-overrun") == 8


@pytest.mark.mqtt
def test_a_backlog_beyond_a_small_receive_maximum_is_drained_once(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A backlog queued for a unit whose receive maximum is 10, drained through the real
    Mosquitto: every message processed once, none dead-lettered; whatever the broker sent
    beyond the quota (Debian's Mosquitto 2.0.11 does, acknowledgements coming in bulk) is
    on /metrics exactly when the log says it."""
    path = _config(tmp_path, mosquitto, name="u-small-quota", batch_size=200,
                   mqtt={"url": mosquitto.url, "receive_maximum": 10})  # fmt: skip
    readings = _readings(100)  # 1,000 device messages
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-quota").start()
    unit = Unit(UnitConfig.load(path)).start()  # its session, subscribed
    try:
        assert unit.runtime.connected.wait(10)
        unit.stop()
        for key, update in readings:
            fleet.publish(key, update)
        assert fleet.flush(30)
        unit = Unit(UnitConfig.load(path)).start()
        deadline = time.monotonic() + 60
        while unit.runtime.published.messages < len(readings) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unit.runtime.published.messages == len(readings)
        registry = unit.runtime.metrics.registry
        labels = {"unit": "u-small-quota"}
        assert not registry.get_sample_value("cloudlet_dead_letters_total", labels)
        overrun = _overruns(unit, "u-small-quota")
        said = "beyond this unit's receive maximum (10)" in caplog.text
        print(f"the broker sent {overrun:.0f} messages beyond the quota")
        assert said is (overrun > 0), (overrun, caplog.text[-2000:])
    finally:
        fleet.stop()
        unit.stop()


@pytest.mark.mqtt
def test_what_arrives_beyond_inbox_bytes_waits_on_disk_and_is_processed_in_order(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A unit whose worker is held up while the broker keeps sending (a receive maximum of
    65,535, as a broker overrunning a smaller one would): past `inbox_bytes` what arrives
    waits in an unlinked file in state_dir, memory stays within the limit and one socket
    read, and every message is then processed once, each stream's updates in the order the
    devices sent them (the echo shows it), none dead-lettered."""
    state = tmp_path / "state"
    mqtt = {"url": mosquitto.url, "receive_maximum": 65535}
    path = _config(tmp_path, mosquitto, name="u-spill", inbox_bytes=1 << 20,
                   state_dir=str(state), mqtt=mqtt)  # fmt: skip
    readings = _readings(400)  # 4,000 device messages, about 1.3 MB as the inbox counts
    collector = Collector(mosquitto, "collector-spill")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-spill").start()
    unit = Unit(UnitConfig.load(path))
    runtime = unit.runtime
    gate = threading.Event()
    process = runtime._process

    def held_up(batch: list[Any]) -> Any:
        gate.wait(60)
        return process(batch)

    runtime._process = held_up  # type: ignore[method-assign]
    unit.start()
    registry = runtime.metrics.registry
    labels = {"unit": "u-spill"}
    try:
        assert runtime.connected.wait(10)
        for key, update in readings:
            fleet.publish(key, update)
        assert fleet.flush(30)
        deadline, peak, depths = time.monotonic() + 30, 0, [-1.0]
        while time.monotonic() < deadline:  # everything received, the worker still held
            peak = max(peak, runtime._inbox.held_bytes)
            depths.append(registry.get_sample_value("cloudlet_inbox_depth", labels) or 0.0)
            if len(depths) > 50 and depths[-50] == depths[-1] > 0:
                break  # the same for half a second
            time.sleep(0.01)
        spilled = registry.get_sample_value("cloudlet_inbox_spilled_total", labels)
        assert spilled and spilled > 500, (spilled, depths[-1])
        assert registry.get_sample_value("cloudlet_inbox_spill_bytes", labels) is not None
        assert peak <= (1 << 20) + 300_000  # the limit, and one read of the socket
        assert [p.name for p in state.iterdir() if "inbox" in p.name] == []  # unlinked
        gate.set()
        raw = {"soil", "state", "rain", "weather"}  # the devices' own streams, echoed
        echoed: set[tuple[str, int]] = set()
        looked = [0]  # how many of what came were looked at (take asks after each one)

        def all_echoed(got: list[tuple[str, dict[str, Any]]]) -> bool:
            echoed.update(_raw_updates(got[looked[0] :], raw))
            looked[0] = len(got)
            return len(echoed) >= len(readings)

        got = collector.take(all_echoed)
        assert runtime.published.updates == len(readings)
        assert not registry.get_sample_value("cloudlet_dead_letters_total", labels)
        times: dict[str, list[int]] = defaultdict(list)
        for topic, body in got:
            if topic.endswith("/updates") and topic.split("/")[2] in raw:
                times[topic].append(body["lastUpdate"])
        assert sum(map(len, times.values())) == len(readings)
        assert all(t == sorted(t) for t in times.values())  # each stream in order
        assert runtime._inbox.spill_bytes == 0
    finally:
        gate.set()
        fleet.stop()
        collector.close()
        unit.stop()


def test_a_full_sqlite_sink_is_a_full_disk_and_nothing_else_is(tmp_path: Path) -> None:
    """The runtime waits out a full disk (not ready, acknowledging nothing) whether the
    OS says so or SQLite does; it knows SQLite's code without importing SQLite (a unit
    without a SQLite sink does not load it), and any other error still stops the write."""
    import errno

    from processors.runtime import _disk_full

    db = sqlite3.connect(tmp_path / "small.db", isolation_level=None)
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 3")  # the database's own disk: three pages
    with pytest.raises(sqlite3.OperationalError) as full:
        for _ in range(10):
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 4096,))
    assert full.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    assert _disk_full(full.value)
    assert _disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert _disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    with pytest.raises(sqlite3.OperationalError) as other:
        db.execute("SELECT * FROM missing")
    assert not _disk_full(other.value)
    assert not _disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not _disk_full(ValueError("a bug"))
    db.close()
