"""Live load through the broker configuration the project ships: devices publishing QoS 1
faster than a unit takes them, and the broker dropping nothing (its queue for the unit's
session has no limit; the unit acknowledges only once its outputs are safe)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from cloudlet.rig.process import free_port
from tests.test_cli import CLOUDLET

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

IRRIGATION = scenario_dir("irrigation")
RATE = 40_000  # messages per second, all devices together
# the whole suite also runs on the pure-Python twins: a shorter load there
SECONDS = 5 if os.environ.get("CLOUDLET_NO_EXTENSIONS") == "1" else 20
FIELDS = ["field-1-soil", "field-2-soil", "field-3-soil", "field-4-soil"]


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    found = re.search(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _feed(broker: Mosquitto, topic: str, rate: int, seconds: int, start_ms: int) -> int:
    """`rate` messages a second on `topic` for `seconds`, through the broker's own C client
    (paced here: each 10 ms, what is due); the number sent."""
    pub = subprocess.Popen(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), *broker.cli_auth, "-q", "1",
         "-t", topic, "-l"], stdin=subprocess.PIPE,
    )  # fmt: skip
    assert pub.stdin is not None
    sent = 0
    began = time.monotonic()
    while sent < rate * seconds:
        elapsed = time.monotonic() - began
        due = min(int(elapsed * rate) + rate // 100, rate * seconds)
        lines = b"".join(
            b'{"channels":{"moisture":{"current-value":%d}},"lastUpdate":%d}\n'
            % (i % 60, start_ms + i * 1000)
            for i in range(sent, due)
        )
        pub.stdin.write(lines)
        pub.stdin.flush()
        sent = due
        time.sleep(0.01)
    pub.stdin.close()
    assert pub.wait(120) == 0
    return sent


@pytest.mark.mqtt
@pytest.mark.timeout(900)
def test_live_load_loses_nothing_through_the_shipped_broker_config(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", superuser=True).start()
    port = free_port()
    config = tmp_path / "unit.yaml"
    config.write_bytes(orjson.dumps({
        "name": "u-load", "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": broker.url}, "http": {"port": port}, "checkpoint": {"every": "1s"},
        "state_dir": "state",
    }))  # fmt: skip
    log = tmp_path / "unit.log"
    unit = subprocess.Popen([CLOUDLET, "unit", "run", str(config)], stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))  # fmt: skip
    try:
        end = time.monotonic() + 30
        while b"subscription" not in log.read_bytes():
            assert time.monotonic() < end and unit.poll() is None, log.read_text()
            time.sleep(0.1)
        start_ms = int(time.time() * 1000) - 30 * 86_400_000  # readings of the past month
        counts: list[int] = []
        began = time.monotonic()
        feeders = [
            threading.Thread(target=lambda t=topic: counts.append(
                _feed(broker, t, RATE // len(FIELDS), SECONDS, start_ms)))
            for topic in (f"{so}/streams/soil" for so in FIELDS)
        ]  # fmt: skip
        for f in feeders:
            f.start()
        for f in feeders:
            f.join()
        sent = sum(counts)
        achieved = sent / (time.monotonic() - began)
        assert sent == RATE * SECONDS
        end = time.monotonic() + 600
        while (got := _metric(port, "cloudlet_messages_received_total")) < sent:
            assert time.monotonic() < end and unit.poll() is None, f"the unit got {got} of {sent}"
            time.sleep(0.5)
        print(f"\n{sent} messages offered at {achieved:.0f}/s, all received")
        assert _metric(port, "cloudlet_messages_received_total") == sent
        assert _metric(port, "cloudlet_updates_accepted_total") == sent
        assert _metric(port, "cloudlet_dead_letters_total") == 0
    finally:
        unit.terminate()
        unit.wait(30)
        broker.stop()
