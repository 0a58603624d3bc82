"""Simulators and fault injection: the signals' shape, every reading accounted for under
faults, scaled scenarios that load, and `cloudlet simulate` driving a unit over Mosquitto."""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from edge_objects.faults import FaultInjector
from edge_objects.simulator import Simulator, load, scale
from edge_objects.smart_city import SmartCityModel
from processors.config import UnitConfig
from processors.engine import engine_of
from processors.unit import Unit
from streams import Registry, SensorUpdate, StreamKey, TopicScheme, decode
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings
from tests.test_cli import CLOUDLET
from tests.test_unit import Collector

CITY = scenario_dir("smart-city")
START = "2026-03-02T06:00:00+00:00"  # a Monday morning
START_MS = int(datetime.fromisoformat(START).timestamp() * 1000)


def _city(seed: int = 1) -> SmartCityModel:
    return SmartCityModel(Registry.load([CITY / "objects"]), seed=seed, start_ms=START_MS)


def test_traffic_has_rush_hours_and_bays_fill_by_day() -> None:
    model = _city()
    by_hour: dict[int, list[float]] = {}
    occupied: dict[int, list[bool]] = {}
    for _ in range(24 * 60):  # a day, a reading a minute
        for key, update in model.step(60):
            hour = int((update.last_update - START_MS) / 3_600_000 + 6) % 24
            if key.stream == "traffic":
                by_hour.setdefault(hour, []).append(update.channels["vehicles"])  # type: ignore[arg-type]
            if key.stream == "occupancy":
                occupied.setdefault(hour, []).append(update.channels["occupied"])  # type: ignore[arg-type]
    mean = {h: sum(v) / len(v) for h, v in by_hour.items()}
    assert mean[8] > 1.5 * mean[12] > 4 * mean[3]
    assert mean[18] > 1.3 * mean[14]
    share = {h: sum(v) / len(v) for h, v in occupied.items()}
    assert share[13] > 0.75 and share[3] < 0.45


def test_the_same_seed_gives_the_same_run() -> None:
    a, b, c = _city(7), _city(7), _city(8)
    run = [a.step(60) for _ in range(30)]
    assert run == [b.step(60) for _ in range(30)]
    assert run != [c.step(60) for _ in range(30)]


def test_faults_lose_no_reading() -> None:
    model = _city(3)
    injector = FaultInjector(random.Random(4), 0.3, TopicScheme())
    readings: list[tuple[StreamKey, SensorUpdate]] = []
    sent = []
    for _ in range(60):
        step = model.step(60)
        readings += step
        sent += injector.apply(step)
    sent += injector.release()
    good = Counter()
    order: dict[str, list[int]] = {}
    for s in sent:
        if s.kind in ("update", "duplicate", "out_of_order", "replayed"):
            doc = decode(s.payload)
            good[(s.topic, doc["lastUpdate"])] += 1
            order.setdefault(s.topic, []).append(doc["lastUpdate"])
    expected = Counter((f"{k.so}/streams/{k.stream}", u.last_update) for k, u in readings)
    gaps = injector.injected["gap"]
    duplicates = injector.injected["duplicate"]
    assert gaps > 0 and duplicates > 0
    assert injector.injected["out_of_order"] > 0 and injector.injected["offline"] > 0
    # every reading was sent, but for the gaps; the duplicates twice
    assert sum((expected - good).values()) == gaps
    assert sum((good - expected).values()) == duplicates
    assert any(times != sorted(times) for times in order.values())  # some out of order


@pytest.mark.parametrize(("scenario", "devices", "objects"), [("smart-city", 200, 201),
                                                               ("irrigation", 42, 42)])  # fmt: skip
def test_a_scaled_scenario_loads(tmp_path: Path, scenario: str, devices: int, objects: int) -> None:
    path = scale(scenario, scenario_dir(scenario), devices, tmp_path / "scaled")
    catalog, problems = Catalog.check([path])
    assert problems == []
    assert len(catalog.registry) == objects
    simulation = load(scenario, path, seed=1, start_ms=START_MS)
    assert len(simulation.model.device_ids) == devices
    assert {k.so for k, _ in simulation.model.step(60)} <= set(catalog.registry.objects)


def _simulate(broker: Mosquitto, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [CLOUDLET, "simulate", "smart-city", "--mqtt", broker.url, "--start", START,
         "--rate", "20", "--speed", "1200", *args],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout[done.stdout.index("{") :])  # type: ignore[no-any-return]


def _unit(broker: Mosquitto, tmp_path: Path, name: str) -> Unit:
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({"name": name, "objects": [str(CITY / "objects")],
                                   "mqtt": {"url": broker.url}}))  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    assert unit.runtime.connected.wait(10)
    return unit


@pytest.mark.mqtt
def test_simulated_city_through_a_unit_gives_the_flows_values(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    steps = 20  # 20-minute steps: each step closes the previous vehicles-per-minute window
    unit = _unit(mosquitto, tmp_path, "u-simulate")
    collector = Collector(mosquitto, "collector-simulate")
    try:
        summary = _simulate(mosquitto, "--steps", str(steps), "--seed", "5", "--faults", "0.1",
                            "--fault", "truncated", "--fault", "wrong_type",
                            "--fault", "unknown_object")  # fmt: skip
        faults = summary["faults"]
        got = collector.take(lambda g: len([t for t, _ in g if "dead-letter" in t])
                             >= sum(faults.values()) and len(g) >= steps * 12)  # fmt: skip
        got += collector.take(lambda g: False, timeout=1)
    finally:
        collector.close()
        unit.stop()
    model = _city(5)
    readings = [r for _ in range(steps) for r in model.step(60)]
    engine = engine_of(Catalog.load([CITY / "objects"]), clock=lambda: 0.0)
    expected = {(k.so, u.last_update): u.channels for k, u in engine.process(readings).derived
                if k.stream == "vehicles_1m"}  # fmt: skip
    seen = {(t.split("/")[0], b["lastUpdate"]): {c: v["current-value"]
                                                  for c, v in b["channels"].items()}
            for t, b in got if t.endswith("/vehicles_1m/updates")}  # fmt: skip
    assert seen == expected and len(seen) == 3 * (steps - 1)
    letters = Counter(b["reason"] for t, b in got if "dead-letter" in t)
    reasons = {"truncated": "malformed", "wrong_type": "wrong_type",
               "unknown_object": "unknown_object"}  # fmt: skip
    assert letters == Counter({reasons[f]: n for f, n in faults.items()})
    assert summary["sent"]["update"] == steps * 12 and summary["delivered"] is True


@pytest.mark.mqtt
def test_stream_faults_are_absorbed_or_dead_lettered_never_lost(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    unit = _unit(mosquitto, tmp_path, "u-simulate-stream")
    collector = Collector(mosquitto, "collector-simulate-stream")
    try:
        summary = _simulate(mosquitto, "--steps", "30", "--seed", "9", "--faults", "0.2",
                            "--fault", "duplicate", "--fault", "out_of_order",
                            "--fault", "offline", "--fault", "gap")  # fmt: skip
        sent = sum(n for kind, n in summary["sent"].items())
        got = collector.take(lambda g: len([t for t, _ in g
                                            if t.split("/")[2] in ("traffic", "occupancy", "air")
                                            and t.endswith("/updates")]) >= sent)  # fmt: skip
        got += collector.take(lambda g: False, timeout=1)
    finally:
        collector.close()
        unit.stop()
    raw = [t for t, _ in got if t.endswith("/updates")
           and t.split("/")[2] in ("traffic", "occupancy", "air")]  # fmt: skip
    assert len(raw) == sent  # duplicates, late and replayed readings all came through
    late = [b for t, b in got if "dead-letter" in t]
    assert all(b["reason"] == "late" for b in late)
    assert summary["faults"]["gap"] > 0 and summary["sent"].get("replayed", 0) > 0
    assert unit.metrics.late.value == len(late)  # counted, as every late update is


@pytest.mark.mqtt
def test_simulated_valves_obey_the_irrigation_rule(mosquitto: Mosquitto, tmp_path: Path) -> None:
    irrigation = scenario_dir("irrigation")
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({"name": "u-simulate-valves", "http": {"port": 0},
                                   "objects": [str(irrigation / "objects")],
                                   "mqtt": {"url": mosquitto.url}}))  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    simulation = load("irrigation", irrigation / "objects", seed=1, start_ms=START_MS)
    simulator = Simulator(simulation, MqttSettings(url=mosquitto.url),
                          client_id="simulate-valves").start()  # fmt: skip
    try:
        assert unit.runtime.connected.wait(10)
        for _ in range(40):  # 10-minute steps; the windows close and the rule fires
            simulator.step(600)
            time.sleep(0.05)
            if simulator.valve_openings:
                break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            c["status"] == "done" for c in unit.runtime.actuations.recent(100)
        ):
            time.sleep(0.1)
        assert simulator.finish()
    finally:
        simulator.stop()
        unit.stop()
    assert sum(simulator.valve_openings.values()) >= 1
    commands = unit.runtime.actuations.recent(100)
    assert any(c["status"] == "done" and c["so"].endswith("-valve") for c in commands)


@pytest.mark.mqtt
@pytest.mark.infra  # descriptors and the network thread, not the kernels: the compiled pass only
def test_ten_thousand_simulated_devices(tmp_path: Path) -> None:
    """`cloudlet simulate irrigation --devices 10000`: about 5,000 valves, a connection each
    (they take commands), all on one network thread polling with epoll: paho's select() could
    not watch a descriptor above 1023 (the simulation failed at about 700 devices). Every
    reading of two steps acknowledged by the broker. And `--write-only` writes the
    descriptors only."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 12_000  # the broker's connections and ours (it inherits the limit)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this machine allows {hard} open files; the test needs {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    written = subprocess.run(
        [CLOUDLET, "simulate", "irrigation", "--devices", "10000", "--write-only",
         "--objects-dir", str(tmp_path / "only")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    assert "descriptors for 10000 devices" in written.stdout
    assert len(Catalog.load([tmp_path / "only" / "objects"]).registry) >= 10_000
    broker = Mosquitto(tmp_path / "broker", superuser=True).start()
    try:
        done = subprocess.run(
            [CLOUDLET, "simulate", "irrigation", "--devices", "10000", "--objects-dir",
             str(tmp_path / "objects"), "--mqtt", broker.url, "--steps", "2", "--rate", "4"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        broker.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = orjson.loads(done.stdout[done.stdout.index("{") :])
    assert summary["devices"] >= 10_000 and summary["delivered"] is True
    assert summary["sent"]["update"] == 2 * summary["devices"]
