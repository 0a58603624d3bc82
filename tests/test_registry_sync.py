"""The fleet's registry from the cloud to a running cloudlet, over the real Kafka and Mosquitto:
an object registered through the cloud's API while a site's unit runs has its updates accepted
there within 5 s, one of another site's is not, and a removed one is refused again; the local
copy is what a cloudlet starts from when the link is down; changes made at a site cut off
reach the cloud when the link returns, settled by the rule of `cloud_sync.local_registry`."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.local_registry import LocalRegistry
from cloud_sync.registry_sync import RegistryFollower
from cloudlet.rig import Kafka, Mosquitto
from cloudlet.unit_file import UnitFile
from cloudlet.units import CloudletUnit
from streams import SensorUpdate, StreamKey
from streams.transport.mqtt import MqttSettings
from tests.test_registry_api import call
from tests.test_unit import Collector, DeviceFleet

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

T0 = int(time.time() * 1000)
PROBE = {"streams": {"data": {"channels": {"t": {"type": "number"}}}}}


def _letters(got: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [b["reason"] for t, b in got if t.startswith("cloudlet/dead-letter")]


def _cloud_and_site(kafka: Kafka, mosquitto: Mosquitto, tmp_path: Path, n: str,
                    provision: bool = False) -> tuple[CloudService, CloudletUnit]:  # fmt: skip
    """The cloud (its API, its registry's publisher) and a site's unit following the
    registry (topics of their own), both started; `provision`: the site's key on both sides,
    and the follower making the objects' device identities on the site's broker."""
    registry_topic, updates = f"registry-{n}", f"updates-{n}"
    cloud = CloudService(CloudSettings.model_validate({
        "port": 0, "store": f"sqlite:///{tmp_path / 'cloud.db'}",
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": updates,
                  "group": f"cloud-{n}", "registry_topic": registry_topic,
                  "registry_changes_topic": f"changes-{n}"},
        "tokens": [{"token": "ops-secret", "objects": ["*"], "register": ["*"], "name": "ops"}],
        "site_keys": [{"name": "farm-1", "token": f"farm-1-key-{n}"}] if provision else [],
    })).start()  # fmt: skip
    admin = mosquitto.admin_settings()
    provisioning = {"site_key": {"token": f"farm-1-key-{n}"},
                    "admin": {"url": admin.url, "username": admin.username,
                              "password": admin.password.get_secret_value()
                              if admin.password else None}}  # fmt: skip
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "s1.yaml").write_text("id: s1\nstreams: {data: {channels: {t: {type: number}}}}\n")
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": f"u-sync-{n}", "objects": ["objects"], "mqtt": {"url": mosquitto.url},
        "reload": "200ms", "outbox": {"path": "outbox"},
        "forward": {"site": "farm-1", "commands": False, "registry": "registry",
                    "registry_topic": registry_topic, "registry_changes_topic": f"changes-{n}",
                    **({"provision": provisioning} if provision else {}),
                    "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": updates}},
    }))  # fmt: skip
    return cloud, CloudletUnit(UnitFile.load(path)).start()


@pytest.mark.kafka
def test_the_clouds_registry_publisher_outlives_its_store_failing(
    kafka: Kafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store under the cloud's registry fails (a PostgreSQL restart, a disk error): the
    publisher retries rather than ending its thread (which took the cloud service down), and
    what was registered meanwhile goes out once the store answers."""
    n = uuid.uuid4().hex[:8]
    cloud = CloudService(CloudSettings.model_validate({
        "port": 0, "store": f"sqlite:///{tmp_path / 'cloud.db'}",
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": f"updates-{n}",
                  "group": f"cloud-{n}", "registry_topic": f"registry-{n}",
                  "registry_changes_topic": f"changes-{n}"},
        "tokens": [{"token": "ops-secret", "objects": ["*"], "register": ["*"], "name": "ops"}],
    })).start()  # fmt: skip
    assert cloud.publisher is not None
    registry, failures = cloud.publisher.registry, [3]
    pending = registry.pending

    def failing() -> Any:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return pending()

    monkeypatch.setattr(registry, "pending", failing)
    try:
        assert call("POST", f"{cloud.url}/", "ops-secret", {"id": "probe", **PROBE})[0] == 201
        deadline = time.monotonic() + 30
        while cloud.publisher.sent < 1:
            assert time.monotonic() < deadline, "the registration was not published"
            assert cloud.publisher.alive and cloud.alive
            time.sleep(0.1)
        assert failures == [0] and cloud.publisher.alive and cloud.alive
    finally:
        cloud.stop()


@pytest.mark.kafka
@pytest.mark.mqtt
def test_an_object_registered_in_the_cloud_is_taken_by_a_running_site(
    kafka: Kafka, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    n = uuid.uuid4().hex[:8]
    cloud, site = _cloud_and_site(kafka, mosquitto, tmp_path, n)
    collector = Collector(mosquitto, f"collector-sync-{n}")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id=f"fleet-sync-{n}").start()
    sent = [0]

    def accepted(so: str, within: float) -> float | None:
        """Publish `so`'s updates until one is echoed: how long it took, or None."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            sent[0] += 1
            fleet.publish(StreamKey(so, "data"), SensorUpdate({"t": 1.0}, T0 + sent[0]))
            got = collector.take(lambda g: bool(g), timeout=0.25)
            if any(t == f"{so}/streams/data/updates" for t, _ in got):
                return time.monotonic() - started
        return None

    try:
        assert site.unit.runtime.connected.wait(10)
        assert site.follower is not None and site.follower.ready.wait(30)
        fleet.publish(StreamKey("probe", "data"), SensorUpdate({"t": 1.0}, T0))
        assert _letters(collector.take(_letters)) == ["unknown_object"]

        status, made = call("POST", f"{cloud.url}/?site=farm-1", "ops-secret",
                            {"id": "probe", **PROBE})  # fmt: skip
        assert status == 201, made
        registered = time.monotonic()
        took = accepted("probe", 10)
        assert took is not None and took < 5, took  # within 5 s of its registration
        while call("GET", f"{cloud.url}/probe/streams/data/lastUpdate", "ops-secret")[0] != 200:
            assert time.monotonic() - registered < 5, "not stored in the cloud within 5 s"
            time.sleep(0.05)
        assert (tmp_path / "registry" / "probe.json").exists()  # the site's local copy

        assert call("POST", f"{cloud.url}/?site=farm-2", "ops-secret",
                    {"id": "elsewhere", **PROBE})[0] == 201  # fmt: skip
        assert call("POST", f"{cloud.url}/", "ops-secret", {"id": "everywhere", **PROBE})[0] == 201
        assert accepted("everywhere", 10) is not None  # no site: every cloudlet has it
        assert not (tmp_path / "registry" / "elsewhere.json").exists()

        assert call("DELETE", f"{cloud.url}/probe", "ops-secret")[0] == 204
        deadline = time.monotonic() + 10
        while (tmp_path / "registry" / "probe.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # the unit's reload
        collector.take(lambda g: False, timeout=0.3)  # what was in flight
        fleet.publish(StreamKey("probe", "data"), SensorUpdate({"t": 2.0}, T0 + 10_000))
        assert _letters(collector.take(_letters)) == ["unknown_object"]
        assert site.unit.alive and cloud.alive
    finally:
        fleet.stop()
        collector.close()
        site.stop()
        cloud.stop()


def test_a_record_that_cannot_be_read_is_skipped_and_counted(tmp_path: Path) -> None:
    follower = RegistryFollower(tmp_path / "registry", "farm-1", "127.0.0.1:9", "g")
    for bad in (b"", b"{", b'{"no": "id"}', b'{"id": "../etc/passwd", "descriptor": {}}',
                b'{"id": 7}'):  # fmt: skip
        follower.apply(bad)
    follower.apply(b'{"id": "ok", "version": 1, "site": null, "descriptor": {"id": "ok"}}')
    assert (follower.refused, follower.applied) == (5, 1)
    copy = tmp_path / "registry"
    assert sorted(p.name for p in copy.iterdir() if not p.name.startswith(".")) == ["ok.json"]


@pytest.mark.kafka
@pytest.mark.mqtt
def test_a_registration_made_while_kafka_is_down_reaches_the_site_when_it_returns(
    own_kafka: Kafka, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    n = uuid.uuid4().hex[:8]
    cloud, site = _cloud_and_site(own_kafka, mosquitto, tmp_path, n)
    copy = tmp_path / "registry"
    try:
        assert site.follower is not None and site.follower.ready.wait(30)
        assert call("POST", f"{cloud.url}/", "ops-secret", {"id": "before", **PROBE})[0] == 201
        deadline = time.monotonic() + 10
        while not (copy / "before.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (copy / "before.json").exists()
        own_kafka.stop()  # the link drops: the cloud's API still takes registrations
        assert call("POST", f"{cloud.url}/", "ops-secret", {"id": "during", **PROBE})[0] == 201
        time.sleep(2)
        assert not (copy / "during.json").exists()  # the site has what it had
        assert (copy / "before.json").exists()
        own_kafka.resume()  # the link is back: what waited goes
        deadline = time.monotonic() + 60
        while not (copy / "during.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (copy / "during.json").exists()
        assert orjson.loads((copy / "during.json").read_bytes()) == {"id": "during", **PROBE}
        assert site.unit.alive and cloud.alive
    finally:
        site.stop()
        cloud.stop()


def _until(condition: Any, within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.kafka
@pytest.mark.mqtt
def test_changes_made_at_a_site_cut_off_reach_the_cloud_and_conflicts_are_settled(
    own_kafka: Kafka, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Cut off, the site registers an object, changes one the cloud changes too, and removes
    a third; the cloud changes the shared one. When the link returns: the site's new object
    and removal are the fleet's; for the shared one the cloud's version stands (it was changed
    there since the version the site changed), is back in the site's copy, and the site's
    change is in the object's history as a conflict."""
    n = uuid.uuid4().hex[:8]
    cloud, site = _cloud_and_site(own_kafka, mosquitto, tmp_path, n)
    copy = LocalRegistry(tmp_path / "registry")
    with_h = {"streams": {"data": {"channels": {"t": {"type": "number"},
                                                "h": {"type": "number"}}}}}  # fmt: skip
    with_p = {"streams": {"data": {"channels": {"t": {"type": "number"},
                                                "p": {"type": "number"}}}}}  # fmt: skip
    collector = Collector(mosquitto, f"collector-offline-{n}")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id=f"fleet-offline-{n}").start()
    try:
        assert site.follower is not None and site.follower.ready.wait(30)
        for so in ("shared", "old"):
            assert call("POST", f"{cloud.url}/?site=farm-1", "ops-secret",
                        {"id": so, **PROBE})[0] == 201  # fmt: skip
        assert _until(lambda: copy.version("shared") == 1 and copy.version("old") == 1)

        own_kafka.stop()  # the site is cut off
        copy.change("local-new", PROBE, by="tech")
        copy.change("shared", with_h, by="tech")
        copy.change("old", None, by="tech")
        changed = call("PUT", f"{cloud.url}/shared", "ops-secret", {"id": "shared", **with_p})
        assert changed[0] == 200
        # offline, the site's unit takes its own registration (hot reload of its copy)
        deadline, echoed = time.monotonic() + 10, False
        while not echoed and time.monotonic() < deadline:
            fleet.publish(StreamKey("local-new", "data"), SensorUpdate({"t": 1.0}, T0))
            echoed = any(t == "local-new/streams/data/updates"
                         for t, _ in collector.take(lambda g: bool(g), timeout=0.5))  # fmt: skip
        assert echoed

        own_kafka.resume()  # the link returns
        assert _until(lambda: call("GET", f"{cloud.url}/local-new", "ops-secret")[0] == 200)
        _, made = call("GET", f"{cloud.url}/local-new", "ops-secret")
        assert made["streams"] == PROBE["streams"]
        assert _until(lambda: call("GET", f"{cloud.url}/old", "ops-secret")[0] == 404)
        _, shared = call("GET", f"{cloud.url}/shared", "ops-secret")
        assert shared["streams"] == with_p["streams"]  # the cloud's version stands ...
        assert _until(lambda: copy.descriptor("shared") == {"id": "shared", **with_p})
        assert copy.version("shared") == 2 and copy.pending() == []  # ... and is the site's
        _, history = call("GET", f"{cloud.url}/shared/history", "ops-secret")
        assert [(h["version"], h["action"], h["by"]) for h in history] == [
            (1, "create", "ops"),
            (2, "update", "ops"),
            (None, "conflict", "tech@farm-1"),
        ]
        assert history[-1]["descriptor"] == {"id": "shared", **with_h}  # kept, not lost
        _, history = call("GET", f"{cloud.url}/local-new/history", "ops-secret")
        assert [(h["version"], h["action"], h["by"]) for h in history] == [
            (1, "create", "tech@farm-1")
        ]
        assert _until(lambda: copy.version("local-new") == 1)  # the cloud's answer came back
        assert cloud.publisher is not None
        assert cloud.publisher.settled == {"accepted": 2, "conflict": 1}
        assert site.unit.alive and cloud.alive
    finally:
        fleet.stop()
        collector.close()
        site.stop()
        cloud.stop()


@pytest.mark.kafka
@pytest.mark.mqtt
def test_the_mqtt_credentials_of_a_create_let_the_device_post_at_its_site_until_removed(
    kafka: Kafka, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The answer to a create carries the object's MQTT credentials at its site; the site's
    follower makes the identity on its broker (from the site's key: no secret on Kafka); the
    device connects with them and its updates are accepted; removed, it is cut off."""
    from tests.test_security import DENIED, probe

    n = uuid.uuid4().hex[:8]
    cloud, site = _cloud_and_site(kafka, mosquitto, tmp_path, n, provision=True)
    collector = Collector(mosquitto, f"collector-creds-{n}")
    so = f"probe-{n}"
    try:
        assert site.follower is not None and site.follower.ready.wait(30)
        started = time.monotonic()
        status, made = call("POST", f"{cloud.url}/?site=farm-1", "ops-secret", {"id": so, **PROBE})
        assert status == 201, made
        mqtt = made["mqtt"]
        assert (mqtt["username"], mqtt["client_id"], mqtt["site"]) == (so, so, "farm-1")
        assert len(mqtt["password"]) == 43  # 256 bits
        raw = (tmp_path / "cloud.db").read_bytes()
        assert mqtt["password"].encode() not in raw  # never kept in the cloud
        device_settings = MqttSettings(url=mosquitto.plain_url, username=so,
                                       password=mqtt["password"])  # fmt: skip
        device = None
        while time.monotonic() - started < 10:  # the identity is made within seconds
            device = probe(device_settings, so, timeout=2)
            if device.connack == 0:
                break
            device.stop()
            time.sleep(0.3)
        assert device is not None and device.connack == 0, "the identity was never made"
        took = time.monotonic() - started
        try:
            echoed = False
            while not echoed and time.monotonic() - started < 15:
                device.publish(f"{so}/streams/data",
                               orjson.dumps({"channels": {"t": {"current-value": 1.5}},
                                             "lastUpdate": T0}))  # fmt: skip
                got = collector.take(lambda g: bool(g), timeout=0.5)
                echoed = any(t == f"{so}/streams/data/updates" for t, _ in got)
            assert echoed and took < 5, took  # posting within 5 s of the create
            assert device.publish("other/streams/data") == DENIED  # only its own streams
            assert call("DELETE", f"{cloud.url}/{so}", "ops-secret")[0] == 204
            assert device.disconnected.wait(10)  # cut off once the site has the removal
        finally:
            device.stop()
        assert probe(device_settings, so, timeout=5).connack == DENIED
        # another site's object, or one without a site: no credentials the cloud could give
        _, other = call(
            "POST", f"{cloud.url}/?site=farm-2", "ops-secret", {"id": f"o-{n}", **PROBE}
        )
        assert other["mqtt"] is None
        assert site.follower.identity_failures == 0 and site.unit.alive and cloud.alive
    finally:
        collector.close()
        site.stop()
        cloud.stop()


def test_an_identity_the_broker_did_not_make_is_tried_again(tmp_path: Path) -> None:
    """The follower's identities: derived from the site key and the record's nonce, made
    once, tried again after a failure (never the thread's end), removed with the object."""
    import asyncio

    from cloud_sync.local_registry import device_secret
    from cloud_sync.registry_sync import record

    calls: list[tuple[str, str | None]] = []
    broker_up = [False]

    def identities(so: str, secret: str | None) -> None:
        calls.append((so, secret))
        if not broker_up[0]:
            raise ConnectionRefusedError("the broker is away")

    follower = RegistryFollower(tmp_path / "registry", "farm-1", "127.0.0.1:9", "g",
                                site_key=b"k", identities=identities)  # fmt: skip
    follower.apply(record("p1", 1, "farm-1", {"id": "p1", **PROBE}, "n1"))
    follower.apply(record("p2", 1, "farm-2", {"id": "p2", **PROBE}, "n2"))  # another site's
    asyncio.run(follower._provision())
    assert calls == [("p1", device_secret(b"k", "p1", "n1"))]
    assert follower.identity_failures == 1
    asyncio.run(follower._provision())  # not before 5 s
    assert len(calls) == 1
    broker_up[0], follower._retry_at = True, 0.0
    asyncio.run(follower._provision())
    asyncio.run(follower._provision())  # made once
    assert calls[1:] == [("p1", device_secret(b"k", "p1", "n1"))]
    follower.apply(record("p1", 2, "farm-1", {"id": "p1", **PROBE}, "n1"))  # same identity
    asyncio.run(follower._provision())
    assert len(calls) == 2
    follower.apply(record("p1", 3, "farm-1", None))
    asyncio.run(follower._provision())
    assert calls[2:] == [("p1", None)] and follower.copy.identity("p1") is None


def test_a_record_the_sites_flows_cannot_run_is_not_taken(tmp_path: Path) -> None:
    """The follower checks each change against the unit's objects and flows: one that would
    break a flow is refused (the copy keeps the object as it was: a unit restarting still
    starts); the rest of the batch is taken."""
    from cloud_sync.registry_sync import record

    site_objects = tmp_path / "objects"
    site_objects.mkdir()
    (site_objects / "avg.flows.yaml").write_text(
        "flows:\n  t-avg:\n    from: probe/data\n    key: none\n    window: {tumbling: 1m}\n"
        "    aggregates: {t: avg(t)}\n    into: probe/t_1m\n"
    )
    copy = tmp_path / "registry"
    follower = RegistryFollower(copy, "farm-1", "127.0.0.1:9", "g",
                                checked=[site_objects, copy])  # fmt: skip
    follower.apply(record("probe", 1, "farm-1", {"id": "probe", **PROBE}))
    assert (follower.applied, follower.refused) == (1, 0)
    no_t = {"id": "probe", "streams": {"data": {"channels": {"h": {"type": "number"}}}}}
    follower.apply_all([record("probe", 2, "farm-1", no_t),
                        record("other", 1, "farm-1", {"id": "other", **PROBE})])  # fmt: skip
    assert (follower.applied, follower.refused) == (2, 1)
    assert orjson.loads((copy / "probe.json").read_bytes()) == {"id": "probe", **PROBE}
    assert (copy / "other.json").exists()
    follower.apply(record("probe", 3, "farm-1", None))  # removing it breaks the flow too
    assert (copy / "probe.json").exists() and follower.refused == 2
    from streams.catalog import Catalog

    assert Catalog.check([site_objects, copy])[1] == []  # what a restarting unit reads
