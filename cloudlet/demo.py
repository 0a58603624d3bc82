"""`cloudlet demo irrigation|smart-city`: the whole chain on one machine.

Simulated devices (with faults) -> MQTT (a real Mosquitto the rig starts, or `--mqtt URL`) ->
a processing unit, run as a local process with `cloudlet unit run` and a generated unit file
(the scenario's objects and flows, its outbox) -> the outbox -> cloud objects (SQLite in the
demo's directory, or through a real Kafka with `--kafka`) -> the REST API and the dashboard.

An observer subscribed like any MQTT client counts what the unit publishes, and the summary
checks that every update sent arrived, that every malformed message was rejected for the
right reason, and that the cloud store holds what the unit forwarded.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families

from cloud_sync.cloud import CloudService, CloudSettings
from cloudlet.rig import Mosquitto
from cloudlet.rig.process import free_port
from cloudlet.security import AuditLog
from edge_objects.faults import Fault
from edge_objects.simulator import SCENARIOS, Simulator, load
from streams import Registry, TopicScheme
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings, connect, make_client

# What each scenario must produce: derived streams (and, for irrigation, commands to valves).
EXPECTED = {
    "irrigation": ["moisture_10min", "rain_1h", "irrigate"],
    "smart-city": ["vehicles_1m", "congestion", "free_1m", "pm25_1h"],
}


def scenario_dir(name: str) -> Path:
    return Path(str(files("cloudlet") / "scenarios" / name))


@dataclass
class DemoSettings:
    scenario: str = "irrigation"
    mqtt_url: str | None = None
    duration: float | None = None
    rate: float = 2.0  # simulation steps per real second
    speed: float = 600.0  # simulated seconds per real second
    faults: float = 0.02  # chance that a reading is faulty
    seed: int = 1
    steps: int | None = None  # stop after this many simulation steps
    kafka: str | None = None  # bootstrap servers: forward through Kafka instead of directly
    port: int = 8000  # the dashboard's; 0 picks a free one
    workdir: Path | None = None  # kept; a temporary one is removed at the end unless `keep`
    keep: bool = False
    fault_kinds: list[str] | None = None  # default: every kind


@dataclass
class Observed:
    """What an ordinary MQTT subscriber sees come out of the cloudlet."""

    updates: int = 0
    derived: Counter[str] = field(default_factory=Counter)  # by stream id
    dead_letters: Counter[str] = field(default_factory=Counter)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)  # object -> when it last posted
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, topics: TopicScheme, registry: Registry, msg: mqtt.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        with self.lock:
            if msg.topic.startswith(topics.dead_letter_filter[:-1]):
                self.dead_letters[body["reason"]] += 1
                return
            so, _, stream = msg.topic.removeprefix(topics.root).split("/")[:3]
            known = registry.objects.get(so)
            if (so, stream) in registry.produced or (
                known is not None and stream in known.streams and known.streams[stream].derived
            ):
                self.derived[stream] += 1
            else:
                self.updates += 1
                self.heard[so] = time.monotonic()
            self.latest[f"{so} / {stream}"] = body

    def online(self, within: float) -> int:
        """The devices whose updates came out in the last `within` seconds."""
        since = time.monotonic() - within
        with self.lock:
            return sum(1 for at in self.heard.values() if at >= since)

    @property
    def total(self) -> int:
        with self.lock:
            return self.updates + sum(self.derived.values()) + sum(self.dead_letters.values())


def unit_metrics(url: str) -> dict[str, float]:
    """A unit's counters, summed over their labels (and by reason for rejections)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.endswith("_created"):
                continue
            reason = sample.labels.get("reason")
            key = f"{name}:{reason}" if reason else name
            out[key] = out.get(key, 0.0) + sample.value
    return out


# What the scenarios' alert streams raise in the cloud (cloud_sync.alarms)
ALARMS: dict[str, list[dict[str, str]]] = {
    "smart-city": [
        {"name": "congestion", "from": "junction-*/congestion", "when": "congested",
         "severity": "minor"},
        {"name": "pm25", "from": "air-*/pm25_alert", "when": "alert", "severity": "major"},
    ],
}  # fmt: skip


class Demo:
    """Starts the pieces, runs the simulation, and stops everything in reverse order."""

    def __init__(self, settings: DemoSettings, progress: Callable[[str], None]) -> None:
        if settings.scenario not in SCENARIOS:
            raise ValueError(
                f"unknown scenario {settings.scenario!r} (available: {', '.join(SCENARIOS)})"
            )
        self.settings = settings
        self.progress = progress
        self.topics = TopicScheme()
        self.observed = Observed()
        self.started = time.monotonic()
        self.home = scenario_dir(settings.scenario)
        self.temporary = settings.workdir is None and not settings.keep
        self.workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="cloudlet-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog.load([self.home / "objects"])
        self.registry = self.catalog.registry
        self.broker: Mosquitto | None = None
        self.unit: subprocess.Popen[bytes] | None = None
        self.unit_port = free_port()
        # a name (so an MQTT session) of its own: a broker shared with earlier runs may still
        # hold their sessions' queued messages
        self.unit_name = f"{settings.scenario}-unit-{os.getpid()}-{int(time.time()) % 100000}"
        self.observer_name = f"{settings.scenario}-observer-{os.getpid()}"
        self.device_secrets: dict[str, str] = {}
        self.relay_settings: MqttSettings | None = None  # the command relay's identity
        self.cloud: CloudService | None = None
        self.simulator: Simulator | None = None
        self._observer: mqtt.Client | None = None
        self.metrics: dict[str, float] = {}

    # start -------------------------------------------------------------------------------

    def _unit_file(self, mqtt_settings: MqttSettings) -> Path:
        store = f"sqlite:///{self.workdir / 'cloud.db'}"
        forward: dict[str, Any] = {"site": f"demo-{self.settings.scenario}", "batch": 1000}
        if self.settings.kafka:
            forward["kafka"] = {"bootstrap_servers": self.settings.kafka,
                                "topic": f"cloudlet.demo.{self.settings.scenario}",
                                "linger_ms": 5}  # fmt: skip
            relay = self.relay_settings
            if relay is not None and relay.username and relay.password:
                secret = relay.password.get_secret_value()
                forward["command_mqtt"] = {"url": relay.url, "username": relay.username,
                                           "password": secret}  # fmt: skip
            elif mqtt_settings.username is not None:
                forward["commands"] = False  # --mqtt with one account: no relay identity
        else:
            forward["store"] = store
        mqtt: dict[str, Any] = {"url": mqtt_settings.url}
        if mqtt_settings.username is not None and mqtt_settings.password is not None:
            mqtt |= {"username": mqtt_settings.username,
                     "password": mqtt_settings.password.get_secret_value()}  # fmt: skip
        doc = {
            "name": self.unit_name,
            "objects": [str(self.home / "objects")],
            "mqtt": mqtt,
            "state_dir": "state",
            "checkpoint": {"every": "1s", "messages": 2000},
            "http": {"host": "127.0.0.1", "port": self.unit_port},
            "outbox": {"path": "outbox",
                       "streams": [{"match": f"*/{s}", "priority": 0}
                                   for s in ("irrigate", "congestion", "full", "pm25_alert")]},
            "forward": forward,
        }  # fmt: skip
        path = self.workdir / "unit.yaml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a secret
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(doc))  # JSON is YAML
        return path

    def start(self) -> None:
        url = self.settings.mqtt_url
        unit_settings = observer_settings = MqttSettings(url=url or "mqtt://127.0.0.1")
        if url is None:
            self.progress("starting Mosquitto on a free loopback port (identities and ACLs on)")
            self.broker = Mosquitto(self.workdir / "mosquitto").start()
            url = self.broker.plain_url
            unit_settings, observer_settings = self._provision(self.broker)
        mqtt_settings = MqttSettings(url=url)
        self.progress(f"broker {mqtt_settings.url}; {len(self.registry)} service objects loaded")
        self._observe(observer_settings)
        self.progress("starting the processing unit (cloudlet unit run)")
        log = (self.workdir / "unit.log").open("ab")
        self.unit = subprocess.Popen(
            [sys.executable, "-m", "cloudlet.entry", "unit", "run",
             str(self._unit_file(unit_settings)), "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._wait(lambda: self._ready(f"http://127.0.0.1:{self.unit_port}/readyz"), 60,
                   "the processing unit to be ready")  # fmt: skip
        self.progress("starting cloud objects and the dashboard")
        cloud = {
            "store": f"sqlite:///{self.workdir / 'cloud.db'}",
            "port": self.settings.port, "public": ["*"],
            "dashboard": str(self.home / "dashboard.yaml"),
            "units": [f"http://127.0.0.1:{self.unit_port}/metrics"],
            "alarms": ALARMS.get(self.settings.scenario, []),
        }  # fmt: skip
        if self.settings.kafka:
            cloud["kafka"] = {"bootstrap_servers": self.settings.kafka,
                              "topic": f"cloudlet.demo.{self.settings.scenario}",
                              "group": f"cloudlet-demo-{os.getpid()}"}  # fmt: skip
        try:
            self.cloud = CloudService(CloudSettings.model_validate(cloud)).start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(
                    f"port {self.settings.port} (the dashboard's) is in use: choose another"
                    " with --port, or --port 0 for a free one"
                ) from None
            raise
        self.progress("starting the simulated devices")
        # yesterday morning, replayed fast until the simulated clock meets the real one
        start = (datetime.now(UTC) - timedelta(days=1)).replace(
            hour=6, minute=0, second=0, microsecond=0
        )
        simulation = load(self.settings.scenario, self.home / "objects", seed=self.settings.seed,
                          start_ms=int(start.timestamp() * 1000))  # fmt: skip
        self.simulator = Simulator(
            simulation, mqtt_settings, faults=self.settings.faults,
            fault_kinds=self.settings.fault_kinds, seed=self.settings.seed,
            client_id=f"cloudlet-demo-devices-{os.getpid()}", credentials=self.device_secrets,
        ).start()  # fmt: skip
        self.progress(f"{len(simulation.model.device_ids)} simulated devices online")

    def _provision(self, broker: Mosquitto) -> tuple[MqttSettings, MqttSettings]:
        """Identities on the demo's own broker, as an operator makes them with `cloudlet
        device sync` and `cloudlet role add`: one per device (the simulators log in as
        their devices), the unit, and a viewer for the observer."""
        ids = broker.identities(audit=AuditLog(self.workdir / "audit.jsonl"))
        with ids.admin:
            devices = ids.sync_devices(self.registry.objects)
            unit = ids.add_role("unit", self.unit_name)
            if self.settings.kafka:  # the unit's command relay connects on its own
                relay = ids.add_role("relay", f"{self.unit_name}-relay")
                self.relay_settings = MqttSettings(url=relay.url(broker.plain_url))
            viewer = ids.add_role("viewer", self.observer_name)
        self.device_secrets = {so: c.secret for so, c in devices.items()}
        self.progress(f"{len(devices)} device identities, a unit and a viewer account")
        return (MqttSettings(url=unit.url(broker.plain_url)),
                MqttSettings(url=viewer.url(broker.plain_url)))  # fmt: skip

    def _observe(self, settings: MqttSettings) -> None:
        subscribed = threading.Event()
        self._observer = make_client(settings, settings.username or self.observer_name)

        def on_connect(client: mqtt.Client, *_: object) -> None:
            client.subscribe([(self.topics.updates_filter, 1), (self.topics.dead_letter_filter, 1)])

        self._observer.on_connect = on_connect
        self._observer.on_subscribe = lambda *_: subscribed.set()
        self._observer.on_message = lambda _c, _u, m: self.observed.on_message(
            self.topics, self.registry, m
        )
        connect(self._observer, settings, persistent=False)
        self._observer.loop_start()
        if not subscribed.wait(15):
            raise RuntimeError(f"could not subscribe at {settings.url} within 15 s")

    @staticmethod
    def _ready(url: str) -> bool:
        try:
            return bool(urllib.request.urlopen(url, timeout=1).status == 200)
        except OSError:
            return False

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.unit is not None and self.unit.poll() is not None:
                raise RuntimeError(f"the unit exited ({self.unit.returncode}); see"
                                   f" {self.workdir / 'unit.log'}")  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    # run ---------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool], on_tick: Callable[[], None]) -> None:
        assert self.simulator is not None

        def tick() -> None:
            self.refresh()
            on_tick()

        self.simulator.run(rate=self.settings.rate, speed=self.settings.speed,
                           duration=self.settings.duration, steps=self.settings.steps,
                           should_stop=should_stop, on_step=tick)  # fmt: skip

    def refresh(self) -> None:
        try:
            self.metrics = unit_metrics(f"http://127.0.0.1:{self.unit_port}/metrics")
        except OSError:
            pass

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until everything sent was processed, published and stored; False on timeout."""
        assert self.simulator is not None
        self.simulator.finish(timeout)
        # what the broker refused (a device posting for another object) never reaches the unit
        sent = sum(self.simulator.fleet.sent.values()) - sum(self.simulator.fleet.refused.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            m = self.metrics
            published = (m.get("cloudlet_updates_accepted_total", 0)
                         + m.get("cloudlet_updates_derived_total", 0)
                         + m.get("cloudlet_dead_letters_total", 0))  # fmt: skip
            if (m.get("cloudlet_messages_received_total", 0) >= sent
                    and self.observed.total >= published
                    and m.get("cloudlet_outbox_depth", 1) == 0
                    and m.get("cloudlet_forwarded_records_total", 0)
                    >= m.get("cloudlet_outbox_written_total", 0)):  # fmt: skip
                return True
            time.sleep(0.2)
        return False

    def _stored(self) -> int:
        return self.cloud.store.count() if self.cloud is not None else 0

    def stop(self) -> None:
        if self.simulator is not None:
            self.simulator.stop()
        if self.unit is not None and self.unit.poll() is None:
            self.unit.terminate()
            try:
                self.unit.wait(30)
            except subprocess.TimeoutExpired:
                self.unit.kill()
        if self.cloud is not None:
            self.cloud.stop()
        if self._observer is not None:
            self._observer.loop_stop()
            self._observer.disconnect()
        if self.broker is not None:
            self.broker.stop()
        if self.temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # results -----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        assert self.simulator is not None and self.cloud is not None
        self.refresh()
        m = self.metrics
        sent = dict(self.simulator.fleet.sent)
        refused = dict(self.simulator.fleet.refused)
        malformed = {f.value for f in Fault}
        good = sum(n for kind, n in sent.items() if kind not in malformed)
        # With identities on, a device posting for an unknown object is refused by the broker;
        # every other fault reaches the unit and becomes a dead letter with its reason.
        expected_letters = Counter({Fault(k).expected_reason.value: n - refused.get(k, 0)
                                    for k, n in sent.items() if k in malformed})  # fmt: skip
        with self.observed.lock:
            letters = Counter(self.observed.dead_letters)
            seen_updates = self.observed.updates
            seen_derived = dict(self.observed.derived)
        stored = Counter(o_stream for o in self.cloud.store.objects() for o_stream in o["streams"])
        expected = EXPECTED[self.settings.scenario]
        rejected = {k.split(":", 1)[1]: int(v) for k, v in m.items()
                    if k.startswith("cloudlet_updates_rejected_total:")}  # fmt: skip
        return {
            "scenario": self.settings.scenario,
            "seconds": round(time.monotonic() - self.started, 1),
            "devices": len(self.simulator.simulation.model.device_ids),
            "sent": {
                "updates": good,
                "faults": dict(self.simulator.injector.injected),
                "messages": sent,
                "refused_by_broker": refused,
            },
            "unit": {
                "messages": int(m.get("cloudlet_messages_received_total", 0)),
                "accepted": int(m.get("cloudlet_updates_accepted_total", 0)),
                "rejected": rejected,
                "derived": int(m.get("cloudlet_updates_derived_total", 0)),
                "dead_letters": int(m.get("cloudlet_dead_letters_total", 0)),
                "actuations": int(m.get("cloudlet_actuations_sent_total", 0)),
                "outbox_written": int(m.get("cloudlet_outbox_written_total", 0)),
                "forwarded": int(m.get("cloudlet_forwarded_records_total", 0)),
            },
            "valve_openings": dict(self.simulator.valve_openings),
            "observed": {
                "updates": seen_updates,
                "derived": seen_derived,
                "dead_letters": dict(letters),
            },
            "cloud": {
                "stored": self._stored(),
                "streams": sorted(stored),
                "missing": [s for s in expected if s not in stored],
                # what the rules' commands did, as the devices reported it
                "valve_open_updates": len(
                    self.cloud.store.search("state", channel="open", minimum=1, limit=100_000)
                ),
            },
            "dashboard": f"{self.cloud.url}/",
            "lossless": seen_updates == good
            and set(refused) <= {Fault.UNKNOWN_OBJECT.value}
            and sum(seen_derived.values()) == int(m.get("cloudlet_updates_derived_total", 0))
            and all(letters[r] >= n for r, n in expected_letters.items())
            # everything written to the outbox was forwarded (the store keeps each distinct
            # update once: readings alike in object, stream, time and values are one)
            and int(m.get("cloudlet_forwarded_records_total", 0))
            == int(m.get("cloudlet_outbox_written_total", -1))
            and 0 < self._stored() <= int(m.get("cloudlet_outbox_written_total", 0)),
        }
