"""Faults with exact accounting: the broker restarting (gracefully or killed) while a unit
holds processed but unacknowledged messages, the disk filling up under the outbox, a poison
record in front of the cloud service's consumer and a PostgreSQL connection killed under it."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from edge_objects.fleet import DeviceFleet
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from processors.config import UnitConfig
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.catalog import Catalog
from streams.mqtt import MqttSettings

IRRIGATION = scenario_dir("irrigation")
T0 = 1_700_006_400_000


def _readings(steps: int) -> list[tuple[StreamKey, SensorUpdate]]:
    site = IrrigationSite.load(IRRIGATION / "site.yaml")
    model = IrrigationModel(site, seed=11, start_ms=T0)
    return [r for _ in range(steps) for r in model.step(60)]


@pytest.mark.mqtt
@pytest.mark.parametrize("how", ["restart", "kill"])
def test_broker_restarts_redeliver_nothing_twice(tmp_path: Path, how: str) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": f"u-broker-{how}", "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": broker.url, "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5},
        "state_dir": "state", "sink": {"sqlite": "results.db"},
        # messages stay processed but unacknowledged for seconds: what a reconnect redelivers
        "checkpoint": {"every": "8s", "messages": 100000},
    }))  # fmt: skip
    readings = _readings(90)  # 900 updates, 9 ten-minute windows per field
    reference = Catalog.load([IRRIGATION / "objects"]).engine(clock=lambda: 0.0).process(readings)
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
            while unit.runtime.published.messages + len(unit.runtime._unacked) < (
                (rounds + 1) * 300
            ) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert unit.runtime._unacked, "nothing held for a checkpoint: the test proves nothing"
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
