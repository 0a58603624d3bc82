"""Actuation: rules, commands with ids, device status reports, the SDK and `cloudlet act`."""

from __future__ import annotations

import itertools
import json
import queue
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from edge_objects.fleet import DeviceFleet
from edge_objects.sdk import EdgeObject, OfflineBufferFull
from processors.config import UnitConfig
from processors.engine import engine_of
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.actuation import Actuation, ActuationError, ActuationStatus, StatusReport, checked
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings, connect, make_client
from tests.test_cli import run

OBJECTS = scenario_dir("irrigation") / "objects"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000 + 6 * 3_600_000  # 06:00 UTC


def _dry_morning(minutes: int, moisture: float = 15.0) -> list[tuple[StreamKey, SensorUpdate]]:
    """Field 1 dry, the others wet, mild weather, no rain: only field 1 needs water."""
    out: list[tuple[StreamKey, SensorUpdate]] = []
    for m in range(minutes):
        t = T0 + m * 60_000
        for f in range(1, 5):
            value = moisture if f == 1 else 35.0
            out.append(
                (
                    StreamKey(f"field-{f}-soil", "soil"),
                    SensorUpdate({"moisture": value, "temperature": 15.0}, t),
                )
            )
        out.append((StreamKey("rain-gauge-1", "rain"), SensorUpdate({"mm": 0.0}, t)))
        out.append(
            (
                StreamKey("weather-1", "weather"),
                SensorUpdate({"temperature": 20.0, "sunlight": 400.0}, t),
            )
        )
    return out


def test_a_rule_commands_the_dry_fields_valve_once_per_interval() -> None:
    engine = engine_of(Catalog.load([OBJECTS]), clock=lambda: 0.0)
    result = engine.process(_dry_morning(150))
    commands = [(a.so, a.action, a.parameters, a.issued_at - T0) for a in result.actuations]
    # the first 10-minute window closes at 06:10 and field 1 is dry: open its valve; again an
    # hour later (min_interval 1h), and never the wet fields' valves
    assert commands[0] == ("field-1-valve", "open", {"minutes": 20}, 600_000 - 1)
    assert [c[0] for c in commands] == ["field-1-valve"] * len(commands)
    gaps = [b[3] - a[3] for a, b in itertools.pairwise(commands)]
    assert len(commands) == 3 and all(g >= 3_600_000 for g in gaps)
    assert len({a.id for a in result.actuations}) == 3  # each command has its own id
    assert engine.snapshot()["rules"] == [
        ["water-dry-fields", "field-1-valve", commands[-1][3] + T0]
    ]


def test_commands_are_checked_against_the_declared_actions() -> None:
    valve = Catalog.load([OBJECTS]).registry.get("field-1-valve")
    assert checked(valve, "open", {"minutes": 5}, at=1).so == "field-1-valve"
    with pytest.raises(ActuationError) as info:
        checked(valve, "explode", {}, at=1)
    assert str(info.value) == (
        "service object 'field-1-valve' has no action 'explode' (its actions: open, close)"
    )


def test_rule_errors_are_reported_when_loading(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "id: s\ncustomFields: {valve: v}\nstreams: {data: {channels: {t: {type: number}}}}\n"
        "---\nid: v\nstreams: {state: {channels: {open: {type: boolean}}}}\n"
        "actions: [{name: open}]\n"
    )
    (tmp_path / "r.flows.yaml").write_text(
        "rules:\n"
        "  a: {when: s/data, if: 't', act: {so: v, action: open}}\n"
        "  b: {when: s/data, if: 't > 1', act: {so: '{customFields.valve}', action: shut}}\n"
        "  c: {when: s/data, if: 't > 1', act: {so: '{customFields.pump}', action: open}}\n"
        "  d: {when: x/y, if: 'true', act: {so: v, action: open}}\n"
    )
    problems = [str(p).split(": ", 1)[1] for p in Catalog.check([tmp_path])[1]]
    assert problems == [
        "rules.a.if: on s/data: if must give a boolean, but gives a number in 't'",
        "rules.b.act: on s/data: 'v' has no action 'shut' (its actions: open)",
        "rules.c.act.so: on s/data: {customFields.pump} names nothing (a customField that is"
        " not a string?)",
        "rules.d.when: when x/y matches no stream",
    ]


@pytest.mark.mqtt
def test_the_irrigation_loop_over_the_broker(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A dry field -> the unit's rule -> a command with an id -> the valve's handler -> status
    reports, queryable on the unit."""
    config = tmp_path / "unit.yaml"
    config.write_bytes(orjson.dumps({
        "name": "u-act", "objects": [str(OBJECTS)], "mqtt": {"url": mosquitto.url},
        "http": {"port": 0},
    }))  # fmt: skip
    unit = Unit(UnitConfig.load(config)).start()
    opened = queue.SimpleQueue[dict[str, object]]()
    valve = EdgeObject("field-1-valve", MqttSettings(url=mosquitto.url))

    @valve.action("open")
    def open_valve(parameters: dict[str, object]) -> str:
        opened.put(parameters)
        return f"open for {parameters['minutes']} minutes"

    valve.start()
    sensors = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-act").start()
    try:
        assert unit.runtime.connected.wait(10) and valve.connected.wait(10)
        for key, update in _dry_morning(11):
            sensors.publish(key, update)
        assert opened.get(timeout=20) == {"minutes": 20}
        base = f"http://127.0.0.1:{unit.status.port}"  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        entry: dict[str, object] = {}
        while time.monotonic() < deadline:
            recent = json.load(urllib.request.urlopen(f"{base}/actuations"))
            if recent and recent[-1]["status"] == "done":
                entry = json.load(urllib.request.urlopen(f"{base}/actuations/{recent[-1]['id']}"))
                break
            time.sleep(0.1)
        assert entry["so"] == "field-1-valve" and entry["action"] == "open"
        assert [(h["status"], h["message"]) for h in entry["history"]] == [  # type: ignore[union-attr]
            ("accepted", None),
            ("done", "open for 20 minutes"),
        ]
    finally:
        sensors.stop()
        valve.stop()
        unit.stop()


@pytest.mark.mqtt
def test_cloudlet_act_follows_the_device_status(mosquitto: Mosquitto) -> None:
    valve = EdgeObject("field-2-valve", MqttSettings(url=mosquitto.url))

    @valve.action("close")
    def close(parameters: dict[str, object]) -> str:
        raise RuntimeError("valve stuck")

    @valve.action("open")
    def open_(parameters: dict[str, object]) -> str:
        return "opened"

    valve.start()
    try:
        assert valve.connected.wait(10)
        args = ["act", "field-2-valve", "--objects", str(OBJECTS), "--mqtt", mosquitto.url]
        done = run(*args[:2], "open", *args[2:], "--param", "minutes=5", "--wait", "10")
        assert done.returncode == 0, done.stderr
        lines = [line.split(" ", 1)[1] for line in done.stdout.splitlines()]
        assert lines == [
            "field-2-valve open {'minutes': 5}: submitted",
            "accepted",
            "done (opened)",
        ]
        failed = run(*args[:2], "close", *args[2:], "--wait", "10")
        assert failed.returncode == 1
        assert failed.stdout.splitlines()[-1].endswith("failed (RuntimeError: valve stuck)")
        unknown = run(*args[:2], "explode", *args[2:])
        assert (unknown.returncode, unknown.stderr) == (
            1,
            "error: service object 'field-2-valve' has no action 'explode' (its actions: open,"
            " close)\n",
        )
    finally:
        valve.stop()


def test_status_reports_and_commands_round_trip() -> None:
    command = Actuation("v", "open", {"minutes": 3}, "abc", 5)
    assert Actuation.from_json("v", command.to_json()) == command
    report = StatusReport("abc", ActuationStatus.DONE, 7, "ok")
    assert StatusReport.from_json(report.to_json()) == report
    with pytest.raises(ActuationError, match="a command needs a string id"):
        Actuation.from_json("v", b'{"action": "open"}')


def test_the_offline_buffer_replays_in_order_after_the_broker_returns(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", superuser=True).start()
    received: queue.SimpleQueue[int] = queue.SimpleQueue()
    subscriber = make_client(MqttSettings(url=broker.url), "buffer-subscriber")
    subscriber.on_connect = lambda c, *_: c.subscribe("probe/streams/data", qos=1)
    subscriber.on_message = lambda _c, _u, m: received.put(orjson.loads(m.payload)["lastUpdate"])
    connect(subscriber, MqttSettings(url=broker.url), persistent=True)
    subscriber.loop_start()
    device = EdgeObject(
        "probe", MqttSettings(url=broker.url, reconnect_max_delay=1), buffer_limit=100
    )
    device.start()
    try:
        assert device.connected.wait(10)
        time.sleep(0.3)
        broker.stop()
        deadline = time.monotonic() + 5
        while device.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        times = [T0 + i for i in range(100)]
        for t in times:
            device.publish("data", {"t": 1}, last_update=t)
        with pytest.raises(OfflineBufferFull, match="the offline buffer is full"):
            device.publish("data", {"t": 1}, last_update=T0 + 100)
        broker.start()  # same port, same persistence: both sessions come back
        got = [received.get(timeout=30) for _ in times]
        assert got == times  # every buffered update, in order
    finally:
        device.stop()
        subscriber.loop_stop()
        broker.stop()
