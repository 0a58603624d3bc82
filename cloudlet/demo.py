"""`cloudlet demo`: the whole chain that exists today, on one machine.

Simulated irrigation devices -> MQTT (a real Mosquitto the rig starts, or `--mqtt URL`) ->
a processing unit (validation against the scenario's service objects, then its composite
streams and windowed flows) -> accepted and derived updates on `.../updates`, rejected input
on the dead-letter topic with its reason.
An observer subscribed like any MQTT client counts what comes out, so the summary proves
that every update sent arrived, and that every injected fault was rejected for the right
reason.
"""

from __future__ import annotations

import queue
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from cloudlet.rig import Mosquitto
from edge_objects.faults import Fault, corrupt, pick
from edge_objects.fleet import DeviceFleet
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from edge_objects.sdk import EdgeObject
from processors.ingest import Ingest
from processors.runtime import UnitRuntime
from streams import Registry, TopicScheme
from streams.catalog import Catalog
from streams.mqtt import MqttSettings, connect, make_client

SCENARIOS = ("irrigation",)


def scenario_dir(name: str) -> Path:
    return Path(str(files("cloudlet") / "scenarios" / name))


@dataclass
class DemoSettings:
    scenario: str = "irrigation"
    mqtt_url: str | None = None
    duration: float | None = None
    rate: float = 2.0  # simulation steps per real second
    speed: float = 600.0  # simulated seconds per real second
    faults: float = 0.2  # probability of one faulty message per step
    seed: int = 1
    steps: int | None = None  # stop after this many simulation steps


@dataclass
class Observed:
    """What an ordinary MQTT subscriber sees come out of the cloudlet."""

    updates: int = 0
    derived: Counter[str] = field(default_factory=Counter)  # by stream id
    dead_letters: Counter[str] = field(default_factory=Counter)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_message(self, topics: TopicScheme, registry: Registry, msg: mqtt.MQTTMessage) -> None:
        body = orjson.loads(msg.payload)
        with self.lock:
            if msg.topic.startswith(topics.dead_letter_filter[:-1]):
                self.dead_letters[body["reason"]] += 1
                return
            so, _, stream = msg.topic.removeprefix(topics.root).split("/")[:3]
            if (so, stream) in registry.produced or registry.get(so).streams[stream].derived:
                self.derived[stream] += 1
            else:
                self.updates += 1
            self.latest[f"{so} / {stream}"] = body

    @property
    def total(self) -> int:
        with self.lock:
            return self.updates + sum(self.derived.values()) + sum(self.dead_letters.values())


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
        self.broker: Mosquitto | None = None
        home = scenario_dir(settings.scenario)
        self.catalog = Catalog.load([home / "objects"])
        self.registry = self.catalog.registry
        self.site = IrrigationSite.load(home / "site.yaml")
        self.model = IrrigationModel(
            self.site,
            seed=settings.seed,
            start_ms=int((time.time() // 86400 * 86400 + 6 * 3600) * 1000),
        )
        self.rng = random.Random(settings.seed + 1)
        self.faults_sent: Counter[Fault] = Counter()
        self.ingest = Ingest(self.registry, self.topics)
        self.runtime: UnitRuntime | None = None
        self.fleet: DeviceFleet | None = None
        self.valves: list[EdgeObject] = []
        self.commands: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.valve_openings: Counter[str] = Counter()
        self._observer: mqtt.Client | None = None

    def start(self) -> None:
        url = self.settings.mqtt_url
        if url is None:
            self.progress("starting Mosquitto on a free loopback port")
            self.broker = Mosquitto(Path(tempfile.mkdtemp(prefix="cloudlet-demo-"))).start()
            url = self.broker.url
        mqtt_settings = MqttSettings(url=url)
        self.progress(f"broker {url}; {len(self.registry)} service objects loaded")
        self._observer = make_client(mqtt_settings, f"cloudlet-demo-observer-{id(self)}")
        subscribed = threading.Event()

        def on_connect(client: mqtt.Client, *_: object) -> None:
            client.subscribe([(self.topics.updates_filter, 1), (self.topics.dead_letter_filter, 1)])

        self._observer.on_connect = on_connect
        self._observer.on_subscribe = lambda *_: subscribed.set()
        self._observer.on_message = lambda _c, _u, m: self.observed.on_message(
            self.topics, self.registry, m
        )
        connect(self._observer, mqtt_settings, persistent=False)
        self._observer.loop_start()
        self.runtime = UnitRuntime(
            self.ingest,
            mqtt_settings,
            engine=self.catalog.engine(),
            client_id=f"cloudlet-demo-unit-{id(self)}",
        ).start()
        self.fleet = DeviceFleet(mqtt_settings, client_id=f"cloudlet-demo-devices-{id(self)}")
        self.fleet.start()
        for field_devices in self.site.fields:
            self.valves.append(self._valve(field_devices.valve, mqtt_settings).start())
        for what, ready in (
            ("observer", subscribed),
            ("processing unit", self.runtime.connected),
            ("devices", self.fleet.connected),
            *((v.so_id, v.connected) for v in self.valves),
        ):
            if not ready.wait(15):
                raise RuntimeError(f"the {what} could not connect to {url} within 15 s")
        self.progress(f"{len(self.site.device_ids)} simulated devices online")

    def _valve(self, valve_id: str, settings: MqttSettings) -> EdgeObject:
        """A simulated valve: commands reach the model at its next step."""
        valve = EdgeObject(valve_id, settings, client_id=f"{valve_id}-demo-{id(self)}")

        @valve.action("open")
        def open_(parameters: dict[str, Any]) -> str:
            minutes = float(parameters.get("minutes", 10))
            self.commands.put((valve_id, minutes))
            return f"opening for {minutes:g} minutes"

        @valve.action("close")
        def close(parameters: dict[str, Any]) -> str:
            self.commands.put((valve_id, 0.0))
            return "closing"

        return valve

    def step(self) -> None:
        assert self.fleet is not None
        while not self.commands.empty():
            valve_id, minutes = self.commands.get()
            self.model.set_valve(valve_id, minutes > 0, minutes=minutes or None)
            if minutes > 0:
                self.valve_openings[valve_id] += 1
        dt = self.settings.speed / self.settings.rate
        for key, update in self.model.step(dt):
            self.fleet.publish(key, update)
            if self.rng.random() < self.settings.faults / len(self.site.device_ids):
                fault = pick(self.rng)
                topic, payload = corrupt(fault, key, update, self.topics)
                self.fleet.publish_raw(topic, payload, fault.value)
                self.faults_sent[fault] += 1

    def run(self, should_stop: Callable[[], bool], on_tick: Callable[[], None]) -> None:
        interval = 1.0 / self.settings.rate
        next_at = time.monotonic()
        deadline = None if self.settings.duration is None else next_at + self.settings.duration
        steps = 0
        while not should_stop() and (deadline is None or time.monotonic() < deadline):
            if self.settings.steps is not None and steps >= self.settings.steps:
                break
            steps += 1
            self.step()
            on_tick()
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def drain(self, timeout: float = 15.0) -> bool:
        """Wait until every message sent was processed and everything the unit published has
        come out the other side; False on timeout."""
        assert self.fleet is not None and self.runtime is not None
        deadline = time.monotonic() + timeout
        self.fleet.flush(timeout)
        sent = sum(self.fleet.sent.values())
        while time.monotonic() < deadline:
            published = self.runtime.published
            total = published.updates + published.derived + published.dead_letters
            if published.messages >= sent and self.observed.total >= total:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        for valve in self.valves:
            valve.stop()
        for closer in (
            self.fleet.stop if self.fleet else None,
            self.runtime.stop if self.runtime else None,
            self._observer.loop_stop if self._observer else None,
            self.broker.stop if self.broker else None,
        ):
            if closer is not None:
                closer()

    def summary(self) -> dict[str, Any]:
        assert self.fleet is not None and self.runtime is not None
        counts = self.ingest.counts.snapshot()
        published = self.runtime.published
        faults = Counter({f.expected_reason.value: n for f, n in self.faults_sent.items()})
        with self.observed.lock:
            seen_letters = Counter(self.observed.dead_letters)
            seen_updates = self.observed.updates
            seen_derived = dict(self.observed.derived)
        return {
            "scenario": self.settings.scenario,
            "seconds": round(time.monotonic() - self.started, 1),
            "devices": len(self.site.device_ids),
            "sent": {
                "updates": self.fleet.sent["update"],
                "faults": {f.value: n for f, n in self.faults_sent.items()},
            },
            "unit": {
                "messages": counts.messages,
                "accepted": counts.accepted,
                "rejected": {r.value: n for r, n in counts.rejected.items()},
                "derived": published.derived,
                "dead_letters": published.dead_letters,
                "actuations": len(self.runtime.actuations.recent(10_000)),
            },
            "valve_openings": dict(self.valve_openings),
            "observed": {
                "updates": seen_updates,
                "derived": seen_derived,
                "dead_letters": dict(seen_letters),
            },
            "lossless": seen_updates == self.fleet.sent["update"]
            and sum(seen_derived.values()) == published.derived
            and sum(seen_letters.values()) == published.dead_letters
            and all(seen_letters[reason] >= n for reason, n in faults.items()),
        }
