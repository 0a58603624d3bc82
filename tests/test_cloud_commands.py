"""Actuation from the cloud, end to end over the real Kafka and Mosquitto: the API's command
reaches the valve through its cloudlet, and the valve's reports come back to the API."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from cloud_sync.cloud import CloudService, CloudSettings
from cloudlet.demo import scenario_dir
from cloudlet.rig import Kafka, Mosquitto
from cloudlet.unit_file import UnitFile
from cloudlet.units import CloudletUnit
from edge_objects.sdk import EdgeObject
from streams.actuation import Actuation
from streams.transport.mqtt import MqttSettings, connect, make_client

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

IRRIGATION = scenario_dir("irrigation") / "objects"


def call(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data, {"Authorization": f"Bearer {token}",
                                                 "Content-Type": "application/json"},
                                     method=method)  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


@pytest.mark.kafka
@pytest.mark.mqtt
def test_a_command_from_the_cloud_opens_the_valve_and_reports_back(
    mosquitto: Mosquitto, kafka: Kafka, tmp_path: Path
) -> None:
    topics = {"commands": "test.commands", "status": "test.command-status"}
    cloud = CloudService(CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0,
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": "test.updates",
                  "group": "cloud-commands", "commands": topics},
        "tokens": [{"token": "farmer", "objects": ["field-*"], "actuate": ["field-*-valve"]},
                   {"token": "viewer", "objects": ["field-*"]}],
    })).start()  # fmt: skip
    unit = _unit_with_relay(tmp_path, mosquitto, kafka, topics, "u-commands", "test.updates")
    opened: list[dict[str, Any]] = []
    valve = EdgeObject("field-1-valve", MqttSettings(url=mosquitto.url), client_id="valve-cloud")

    @valve.action("open")
    def open_(parameters: dict[str, Any]) -> str:
        opened.append(parameters)
        return f"open for {parameters['minutes']} minutes"

    valve.start()
    try:
        assert unit.relay is not None and unit.relay.ready.wait(30)
        assert valve.connected.wait(10) and unit.unit.runtime.connected.wait(10)
        valve.publish("state", {"open": False})  # the cloud learns which cloudlet has it
        deadline = time.monotonic() + 30
        while cloud.store.site_of("field-1-valve") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"{cloud.url}/objects/field-1-valve/actions/open"
        status, body = call("POST", url, "viewer", {"parameters": {"minutes": 5}})
        assert (status, body["error"]) == (403, "this token may not send commands to"
                                                " 'field-1-valve'")  # fmt: skip
        status, body = call("POST", url, "farmer", {"parameters": {"minutes": 5}})
        assert status == 202 and body["site"] == "farm-1", body
        command_id = body["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = call("GET", f"{cloud.url}/commands/{command_id}", "farmer")[1]
            if state["status"] == "done":
                break
            time.sleep(0.2)
        assert state["status"] == "done"
        assert [h["status"] for h in state["history"]] == ["submitted", "accepted", "done"]
        assert state["history"][-1]["message"] == "open for 5 minutes"
        assert opened == [{"minutes": 5}]
        bad = call("POST", f"{cloud.url}/objects/field-1-valve/actions/explode", "farmer", {})
        assert bad[0] == 202
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = call("GET", f"{cloud.url}/commands/{bad[1]['id']}", "farmer")[1]
            if state["status"] == "failed":
                break
            time.sleep(0.2)
        assert state["history"][-1]["message"] == (
            "'field-1-valve' has no action 'explode' (its actions: open, close)"
        )
    finally:
        valve.stop()
        unit.stop()
        cloud.stop()


@pytest.mark.kafka
@pytest.mark.mqtt
def test_bad_commands_cost_themselves_never_the_relay_or_the_device(
    mosquitto: Mosquitto, kafka: Kafka, tmp_path: Path
) -> None:
    topics = {"commands": "poison.commands", "status": "poison.command-status"}
    unit = _unit_with_relay(tmp_path, mosquitto, kafka, topics, "u-poison", "poison.updates")
    opened: list[dict[str, Any]] = []
    valve = EdgeObject("field-1-valve", MqttSettings(url=mosquitto.url), client_id="valve-poison")
    valve.action("open")(lambda parameters: opened.append(parameters) or "opened")
    valve.start()
    raw = make_client(MqttSettings(url=mosquitto.url), "poison-commander")
    connect(raw, MqttSettings(url=mosquitto.url), persistent=False)
    raw.loop_start()
    try:
        assert unit.relay is not None and unit.relay.ready.wait(30)
        assert valve.connected.wait(10)
        now = int(time.time() * 1000)
        # straight to the device: an id no topic can hold, a time that is not one
        for body in ({"id": "a#b", "action": "open", "parameters": {}, "issuedAt": now},
                     {"id": "c1", "action": "open", "parameters": {}, "issuedAt": "soon"},
                     [1, 2], {"id": ["x"], "action": "open"}):  # fmt: skip
            raw.publish("field-1-valve/actions", orjson.dumps(body), qos=1).wait_for_publish(10)
        raw.publish("field-1-valve/actions", orjson.dumps(
            {"id": "good-1", "action": "open", "parameters": {"minutes": 1}, "issuedAt": now}),
            qos=1).wait_for_publish(10)  # fmt: skip
        _until(lambda: opened == [{"minutes": 1}])
        assert valve.ignored == 4 and valve.healthy
        # through the cloud's command topic: records the relay cannot read, then a good one
        poison = [
            {"site": "farm-1", "so": ["field-1-valve"], "id": "p1", "action": "open",
             "issuedAt": now},
            {"site": "farm-1", "so": "field-1-valve", "id": "p#2", "action": "open",
             "issuedAt": now},
            {"site": "farm-1", "so": "field-1-valve", "id": "p3", "action": "open",
             "issuedAt": "soon"},
            "not a command",
        ]  # fmt: skip
        good = {"site": "farm-1", "so": "field-1-valve", "id": "good-2", "action": "open",
                "parameters": {"minutes": 2}, "issuedAt": now}  # fmt: skip
        produce(kafka, topics["commands"], [orjson.dumps(p) for p in [*poison, good]] + [b"\xff"],
                key=b"farm-1")  # fmt: skip
        _until(lambda: opened == [{"minutes": 1}, {"minutes": 2}])
        _until(lambda: unit.relay is not None and unit.relay.refused == 5)
        assert unit.relay.alive and unit.unit.alive and valve.healthy
    finally:
        raw.loop_stop()
        raw.disconnect()
        valve.stop()
        unit.stop()


def _unit_with_relay(tmp_path: Path, mosquitto: Mosquitto, kafka: Kafka,
                     topics: dict[str, str], name: str, updates: str) -> CloudletUnit:  # fmt: skip
    """A unit of site farm-1 with its outbox, forwarder and command relay, started."""
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": name, "objects": [str(IRRIGATION)], "mqtt": {"url": mosquitto.url},
        "outbox": {"path": "outbox"},
        "forward": {"site": "farm-1", "command_topics": topics,
                    "kafka": {"bootstrap_servers": kafka.bootstrap_servers,
                              "topic": updates, "linger_ms": 1}},
    }))  # fmt: skip
    return CloudletUnit(UnitFile.load(path)).start()


def produce(kafka: Kafka, topic: str, values: list[bytes], key: bytes | None = None) -> None:
    """Write `values` to `topic`, each acknowledged."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        for v in values:
            await producer.send_and_wait(topic, v, key=key)
        await producer.stop()

    asyncio.run(run())


def _until(condition: Any, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_the_relay_checks_commands_against_the_registry_in_force(tmp_path: Path) -> None:
    """After a hot reload the relay knows the objects the unit has now (not those it started
    with): a command to an object added since is carried out, one removed since refused."""
    objects = tmp_path / "objects"
    objects.mkdir()
    valve = "id: %s\nstreams: {state: {channels: {open: {type: boolean}}}}\nactions: [name: open]\n"
    (objects / "v1.yaml").write_text(valve % "v1")
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": "u-relay-reload", "objects": ["objects"], "mqtt": {"url": "mqtt://127.0.0.1:9"},
        "outbox": {"path": "outbox"},
        "forward": {"site": "farm-1", "kafka": {"bootstrap_servers": "127.0.0.1:9"}},
    }))  # fmt: skip
    unit = CloudletUnit(UnitFile.load(path))  # not started: nothing connects
    assert unit.relay is not None and unit.unit.watcher is not None
    now = int(time.time() * 1000)
    open_v2 = Actuation("v2", "open", {}, issued_at=now)
    assert unit.relay._problem(open_v2) == "this cloudlet has no service object 'v2'"
    (objects / "v2.yaml").write_text(valve % "v2")
    (objects / "v1.yaml").unlink()
    assert unit.unit.watcher.check()
    unit.unit.runtime._swap()  # what the worker does between two batches
    assert unit.relay._problem(open_v2) is None
    assert unit.relay._problem(Actuation("v1", "open", {}, issued_at=now)) == (
        "this cloudlet has no service object 'v1'")  # fmt: skip
    if unit.outbox is not None:
        unit.outbox.close()
