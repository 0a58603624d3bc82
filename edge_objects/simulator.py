"""`cloudlet simulate`: a scenario's devices publishing over MQTT, with faults on demand.

Irrigation: soil probes, valves, a rain gauge and a weather station (valves obey open/close
commands, so the irrigation rule's effect shows in the soil). Smart city: traffic counters,
parking bays and air-quality stations. `--devices N` scales a scenario: descriptors for N
devices are written next to the run, for the unit to load.
"""

from __future__ import annotations

import queue
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import SecretStr

from edge_objects.faults import FaultInjector
from edge_objects.fleet import DeviceFleet
from edge_objects.irrigation import FieldDevices, IrrigationModel, IrrigationSite
from edge_objects.netloop import SharedLoop
from edge_objects.sdk import EdgeObject
from edge_objects.smart_city import SmartCityModel
from streams import GeoPoint, SensorUpdate, StreamKey, TopicScheme
from streams.catalog import Catalog
from streams.registry import Registry
from streams.transport.mqtt import MqttSettings

SCENARIOS = ("irrigation", "smart-city")


class Model(Protocol):
    now_ms: int

    @property
    def device_ids(self) -> list[str]: ...

    def step(self, dt_s: float) -> list[tuple[StreamKey, SensorUpdate]]: ...


@dataclass
class Simulation:
    scenario: str
    objects: Path  # the descriptors the devices match (give these to the unit)
    model: Model
    valves: list[str] = field(default_factory=list)  # irrigation: devices taking commands


def load(scenario: str, objects: Path, *, seed: int, start_ms: int) -> Simulation:
    """The model of `scenario` over the descriptors in `objects` (and its site.yaml)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (available: {', '.join(SCENARIOS)})")
    registry = Catalog.load([objects]).registry
    if scenario == "irrigation":
        site = IrrigationSite.load(objects.parent / "site.yaml")
        model: Model = IrrigationModel(site, seed=seed, start_ms=start_ms)
        return Simulation(scenario, objects, Located(model, registry),
                          [f.valve for f in site.fields])  # fmt: skip
    model = SmartCityModel(registry, seed=seed, start_ms=start_ms)
    return Simulation(scenario, objects, Located(model, registry))


class Located:
    """A model whose devices also say where they stand, as an installed sensor does: each
    stream's `geo_point` channels that the model leaves out are filled from the object's
    `customFields.location` ("lat,lon")."""

    def __init__(self, model: Model, registry: Registry) -> None:
        self.model = model
        self.places: dict[StreamKey, dict[str, GeoPoint]] = {}
        for so_id, so in registry.objects.items():
            where = so.custom_fields.get("location")
            try:
                lat, lon = (float(x) for x in str(where).split(","))
            except ValueError:
                continue
            for stream_id, stream in so.streams.items():
                channels = [name for name, ch in stream.channels.items()
                            if ch.type == "geo_point" and ch.current_value is None]  # fmt: skip
                if channels:
                    self.places[StreamKey(so_id, stream_id)] = dict.fromkeys(
                        channels, GeoPoint(lat, lon)
                    )

    @property
    def now_ms(self) -> int:
        return self.model.now_ms

    @now_ms.setter
    def now_ms(self, value: int) -> None:
        self.model.now_ms = value

    @property
    def device_ids(self) -> list[str]:
        return self.model.device_ids

    def step(self, dt_s: float) -> list[tuple[StreamKey, SensorUpdate]]:
        out = self.model.step(dt_s)
        for i, (key, update) in enumerate(out):
            place = self.places.get(key)
            if place is not None and any(c not in update.channels for c in place):
                missing = {c: g for c, g in place.items() if c not in update.channels}
                channels = {**update.channels, **missing}  # the model's own channels first
                out[i] = (key, SensorUpdate(channels, update.last_update))
        return out


# scaling -----------------------------------------------------------------------------------


def scale(scenario: str, home: Path, devices: int, out: Path) -> Path:
    """Write a scenario of about `devices` devices into `out`, laid out as the scenario is:
    descriptors and flows in out/objects (the directory a unit loads, returned), and for
    irrigation the site in out/site.yaml."""
    if devices < 4:
        raise ValueError("a scaled scenario needs at least 4 devices")
    objects = home / "objects"
    root, out = out, out / "objects"
    out.mkdir(parents=True, exist_ok=True)
    for flows in objects.glob("*.flows.yaml"):
        shutil.copy(flows, out / flows.name)
    if scenario == "irrigation":
        template = (objects / "field-1.yaml").read_text()
        fields = max(1, (devices - 2) // 2)
        for k in range(1, fields + 1):
            (out / f"field-{k}.yaml").write_text(re.sub(r"field-1\b", f"field-{k}", template)
                                                 .replace("Field 1", f"Field {k}"))  # fmt: skip
        for name in ("rain-gauge-1.yaml", "weather-1.yaml"):
            shutil.copy(objects / name, out / name)
        site = IrrigationSite.load(home / "site.yaml")
        scaled = site.model_copy(update={"fields": [
            FieldDevices(soil=f"field-{k}-soil", valve=f"field-{k}-valve")
            for k in range(1, fields + 1)]})  # fmt: skip
        (root / "site.yaml").write_text(yaml.safe_dump(scaled.model_dump(mode="json")))
        return out
    docs = {
        name: list(yaml.safe_load_all((objects / f"{name}.yaml").read_text()))
        for name in ("junctions", "parking", "air")
    }
    junctions, stations = max(1, devices // 10), max(1, devices // 20)
    bays = max(1, devices - junctions - stations)
    written: dict[str, list[dict[str, Any]]] = {"junctions": [], "parking": [], "air": []}
    for k in range(1, junctions + 1):
        written["junctions"].append(_clone(docs["junctions"][0], f"junction-{k}",
                                           f"Traffic counter {k}"))  # fmt: skip
    per_zone = 8
    for k in range(bays):
        zone, n = _zone_name(k // per_zone), k % per_zone + 1
        written["parking"].append(
            _clone(docs["parking"][0], f"bay-{zone}-{n}", f"Parking bay {zone.upper()}{n}")
        )
    written["parking"] += [d for d in docs["parking"] if "occupancy" not in d.get("streams", {})]
    for k in range(1, stations + 1):
        written["air"].append(_clone(docs["air"][0], f"air-{k}", f"Air-quality station {k}"))
    for name, items in written.items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump_all(items, sort_keys=False))
    return out


def _clone(doc: dict[str, Any], so_id: str, name: str) -> dict[str, Any]:
    return {**doc, "id": so_id, "name": name}


def _zone_name(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(97 + r) + letters
    return letters


# running -----------------------------------------------------------------------------------


def _enough_descriptors(needed: int) -> None:
    """Raise this process's open-file limit (its soft one, up to the hard one) to `needed`:
    a connection per device."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        if top < needed:
            raise RuntimeError(
                f"{needed} open files are needed (a connection per simulated device) and this"
                f" process may open {hard}: raise the limit (ulimit -n) or simulate fewer"
            )


class Simulator:
    """Steps the model, applies faults and publishes; valves take commands between steps."""

    def __init__(
        self,
        simulation: Simulation,
        settings: MqttSettings,
        *,
        faults: float = 0.0,
        fault_kinds: list[str] | None = None,
        seed: int = 1,
        client_id: str = "cloudlet-simulator",
        topics: TopicScheme | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        """`credentials` (device id -> secret): each device logs in as itself, on a broker
        with identities (`cloudlet device sync` makes them)."""
        self.simulation = simulation
        self.topics = topics or TopicScheme()
        self.credentials = dict(credentials or {})
        # every device's connection on one network thread (thousands of devices: no thread
        # and no select() each; see edge_objects.netloop)
        self.loop = SharedLoop(f"{client_id}-network")
        self.fleet = DeviceFleet(settings, client_id=client_id, topics=self.topics,
                                 credentials=self.credentials, loop=self.loop)  # fmt: skip
        self.injector = FaultInjector(random.Random(seed + 1), faults, self.topics, fault_kinds)
        self.commands: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.valve_openings: Counter[str] = Counter()
        self.valves = [self._valve(v, settings, client_id) for v in simulation.valves]
        self.steps = 0

    def _valve(self, valve_id: str, settings: MqttSettings, prefix: str) -> EdgeObject:
        secret = self.credentials.get(valve_id)
        if secret is not None:  # the valve logs in as itself: its id is its client id
            own = settings.model_copy(update={"username": valve_id, "password": SecretStr(secret)})
            valve = EdgeObject(valve_id, own, loop=self.loop)
        else:
            valve = EdgeObject(valve_id, settings, client_id=f"{prefix}-{valve_id}",
                               loop=self.loop)  # fmt: skip

        @valve.action("open")
        def open_(parameters: dict[str, Any]) -> str:
            minutes = float(parameters.get("minutes", 10))
            self.commands.put((valve_id, minutes))
            return f"opening for {minutes:g} minutes"

        @valve.action("close")
        def close(_parameters: dict[str, Any]) -> str:
            self.commands.put((valve_id, 0.0))
            return "closing"

        return valve

    def start(self, timeout: float = 15.0) -> Simulator:
        _enough_descriptors(len(self.valves) + len(self.credentials) + 64)
        self.fleet.start()
        for v in self.valves:
            v.start()
        waits: list[tuple[str, Callable[[float], bool]]] = [
            ("devices", self.fleet.connected.wait),
            *((v.so_id, v.connected.wait) for v in self.valves),
        ]
        for name, wait in waits:
            if not wait(timeout):
                refusals = [*self.fleet.refusals, *(v.refused for v in self.valves if v.refused)]
                if refusals:
                    raise RuntimeError("; ".join(sorted(set(refusals))[:3]))
                raise RuntimeError(f"the simulated {name} could not reach the broker")
        return self

    def step(self, dt_s: float) -> None:
        model = self.simulation.model
        site = model.model if isinstance(model, Located) else model
        while not self.commands.empty():
            valve_id, minutes = self.commands.get()
            if isinstance(site, IrrigationModel):
                site.set_valve(valve_id, minutes > 0, minutes=minutes or None)
                self.valve_openings[valve_id] += minutes > 0
        for send in self.injector.apply(model.step(dt_s)):
            self.fleet.publish_raw(send.topic, send.payload, send.kind)
        self.steps += 1

    def run(self, *, rate: float, speed: float, duration: float | None = None,
            steps: int | None = None, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        """`rate` steps per second, each `speed / rate` simulated seconds. The simulated clock
        never runs ahead of the real one: once it has caught up (an accelerated replay of the
        recent past), it goes on in real time, so devices never date readings in the future
        (units refuse those: `max_future`)."""
        interval = 1.0 / rate
        next_at = time.monotonic()
        deadline = None if duration is None else next_at + duration
        while not should_stop() and (deadline is None or time.monotonic() < deadline):
            if steps is not None and self.steps >= steps:
                break
            ahead = self.simulation.model.now_ms + speed / rate * 1000 - time.time() * 1000
            if ahead > 0:
                time.sleep(min(ahead / 1000, 0.5))  # short naps: stop and deadline still count
                next_at = time.monotonic()
                continue
            self.step(speed / rate)
            on_step()
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def finish(self, timeout: float = 30.0) -> bool:
        """Send what faults held back, and wait for the broker to have everything."""
        for send in self.injector.release():
            self.fleet.publish_raw(send.topic, send.payload, send.kind)
        return self.fleet.flush(timeout)

    def stop(self) -> None:
        for v in self.valves:
            v.stop()
        self.fleet.stop()
        self.loop.stop()

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.simulation.scenario,
            "devices": len(self.simulation.model.device_ids),
            "steps": self.steps,
            "sent": dict(self.fleet.sent),
            "refused_by_broker": dict(self.fleet.refused),
            "faults": dict(self.injector.injected),
            "valve_openings": dict(self.valve_openings),
        }
