"""TLS and passwords end to end: a real Mosquitto with a TLS listener (its own CA) and a
password file; a unit, devices and the SDK connect with the CA and their credentials, and a
wrong password or an unknown CA is refused."""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from cloudlet.rig.process import free_port
from edge_objects.fleet import DeviceFleet
from edge_objects.sdk import EdgeObject
from processors.config import UnitConfig
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.transport.mqtt import MqttSettings, connect, make_client
from tests.test_cli import CLOUDLET
from tests.test_unit import wait_ready

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

IRRIGATION = scenario_dir("irrigation") / "objects"
T0 = 1_700_006_400_000
USERS = {"unit": "unit-secret", "device": "device-secret", "reader": "reader-secret"}


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), tls=True, users=USERS).start()
    try:
        yield broker
    finally:
        broker.stop()


def settings(broker: Mosquitto, user: str, password: str | None = None,
             ca: bool = True) -> MqttSettings:  # fmt: skip
    return MqttSettings(url=broker.url, username=user, password=password or USERS[user],
                        tls_ca=broker.ca_file if ca else None)  # fmt: skip


@pytest.mark.mqtt
def test_a_unit_and_devices_over_tls_with_passwords(secure: Mosquitto, tmp_path: Path) -> None:
    assert secure.url.startswith("mqtts://") and secure.ca_file is not None
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": "u-tls", "objects": [str(IRRIGATION)],
        "mqtt": {"url": secure.url, "username": "unit", "password": USERS["unit"],
                 "tls_ca": str(secure.ca_file)},
    }))  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    got: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    ready = threading.Event()
    reader = make_client(settings(secure, "reader"), "reader-tls")
    reader.on_connect = lambda c, *_: c.subscribe("+/streams/+/updates", 1)
    reader.on_subscribe = lambda *_: ready.set()
    reader.on_message = lambda _c, _u, m: got.put((m.topic, orjson.loads(m.payload)))
    connect(reader, settings(secure, "reader"), persistent=False)
    reader.loop_start()
    fleet = DeviceFleet(settings(secure, "device"), client_id="fleet-tls").start()
    valve = EdgeObject("field-1-valve", settings(secure, "device"), client_id="valve-tls")
    valve.action("open")(lambda parameters: "opening")
    valve.start()
    try:
        assert unit.runtime.connected.wait(10) and ready.wait(10)
        assert fleet.connected.wait(10) and valve.connected.wait(10)
        fleet.publish(StreamKey("field-1-soil", "soil"),
                      SensorUpdate({"moisture": 30.0, "temperature": 15.0}, T0))  # fmt: skip
        topic, body = got.get(timeout=10)
    finally:
        valve.stop()
        fleet.stop()
        reader.loop_stop()
        unit.stop()
    assert topic == "field-1-soil/streams/soil/updates" and body["lastUpdate"] == T0


@pytest.mark.mqtt
@pytest.mark.parametrize(("password", "ca"), [("wrong", True), (None, False)])
def test_a_wrong_password_or_an_unknown_ca_is_refused(
    secure: Mosquitto, password: str | None, ca: bool
) -> None:
    fleet = DeviceFleet(settings(secure, "device", password, ca), client_id=f"fleet-{ca}").start()
    try:
        assert not fleet.connected.wait(3)
    finally:
        fleet.stop()


@pytest.mark.mqtt
def test_a_unit_process_over_tls_has_openssl(secure: Mosquitto, tmp_path: Path) -> None:
    """`cloudlet unit run` keeps OpenSSL out of a unit that has no use for it; one whose broker
    is mqtts:// has it from the start, and connects."""
    port = free_port()
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": "u-tls-process", "objects": [str(IRRIGATION)], "http": {"port": port},
        "mqtt": {"url": secure.url, "username": "unit", "password": USERS["unit"],
                 "tls_ca": str(secure.ca_file)},
    }))  # fmt: skip
    log = tmp_path / "unit.log"
    unit = subprocess.Popen([CLOUDLET, "unit", "run", str(path)], stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"))  # fmt: skip
    try:
        wait_ready(unit, port, log)
        assert "libssl" in Path(f"/proc/{unit.pid}/maps").read_text()
    finally:
        unit.terminate()
    assert unit.wait(30) == 0, log.read_text()
