"""A simulated city: traffic counters at junctions, parking-bay sensors, air-quality stations.

The devices are read from the service objects: an object with a `traffic` stream is a
junction, one with `occupancy` a parking bay (its zone is the second part of its id,
bay-<zone>-<n>), one with `air` an air-quality station. Signals keep the shape of real ones:
traffic with morning and evening rush hours (Poisson counts, speed falling as volume rises),
bays filling through the working day, PM2.5 and noise following the traffic. Time and
randomness are the caller's, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from streams import Registry, SensorUpdate, StreamKey

HOUR_MS = 3_600_000


def traffic_profile(hour: float) -> float:
    """Share of the peak flow at this hour of the day: rush hours at 8:30 and 18:00."""
    morning = math.exp(-(((hour - 8.5) / 1.2) ** 2))
    evening = math.exp(-(((hour - 18.0) / 1.5) ** 2))
    day = 0.55 if 7 <= hour <= 21 else 0.08
    return min(1.0, max(day, morning, 0.9 * evening))


def occupancy_target(hour: float) -> float:
    """Share of bays taken at this hour: full-ish in working hours, light at night."""
    return 0.25 + 0.7 * math.exp(-(((hour - 13.0) / 4.5) ** 2))


@dataclass(slots=True)
class _Junction:
    id: str
    peak: float  # vehicles per minute at the rush-hour peak


@dataclass(slots=True)
class _Bay:
    id: str
    zone: str
    occupied: bool


@dataclass(slots=True)
class _Station:
    id: str
    background: float  # ug/m3 of PM2.5 that does not come from traffic
    drift: float = 0.0


class SmartCityModel:
    def __init__(self, registry: Registry, *, seed: int = 1, start_ms: int) -> None:
        self.rng = random.Random(seed)
        self.now_ms = start_ms
        objects = sorted(registry.objects.items())
        self.junctions = [
            _Junction(so_id, self.rng.uniform(35.0, 60.0))
            for so_id, so in objects
            if "traffic" in so.streams
        ]
        hour = self._hour()
        self.bays = [
            _Bay(so_id, _zone(so_id), self.rng.random() < occupancy_target(hour))
            for so_id, so in objects
            if "occupancy" in so.streams
        ]
        self.stations = [
            _Station(so_id, self.rng.uniform(4.0, 9.0))
            for so_id, so in objects
            if "air" in so.streams
        ]
        if not (self.junctions or self.bays or self.stations):
            raise ValueError(
                "no junction (traffic stream), parking bay (occupancy) or air station (air)"
                " among the service objects"
            )

    @property
    def device_ids(self) -> list[str]:
        return ([j.id for j in self.junctions] + [b.id for b in self.bays]
                + [s.id for s in self.stations])  # fmt: skip

    def _hour(self) -> float:
        return (self.now_ms / HOUR_MS) % 24.0

    def _poisson(self, mean: float) -> int:
        if mean > 30:  # normal approximation: exact enough, and O(1)
            return max(0, round(self.rng.gauss(mean, math.sqrt(mean))))
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def step(self, dt_s: float) -> list[tuple[StreamKey, SensorUpdate]]:
        self.now_ms += int(dt_s * 1000)
        hour = self._hour()
        flow = traffic_profile(hour)
        out: list[tuple[StreamKey, SensorUpdate]] = []
        for j in self.junctions:
            per_minute = j.peak * flow
            vehicles = self._poisson(per_minute * dt_s / 60.0)
            speed = 50.0 * (1.0 - 0.65 * min(1.0, per_minute / 60.0)) + self.rng.gauss(0, 2.0)
            out.append((StreamKey(j.id, "traffic"),
                        SensorUpdate({"vehicles": vehicles, "speed": round(max(3.0, speed), 1)},
                                     self.now_ms)))  # fmt: skip
        target = occupancy_target(hour)
        stay_h = 2.0
        leave = min(1.0, dt_s / 3600.0 / stay_h)
        arrive = min(1.0, leave * target / max(0.05, 1.0 - target))
        for b in self.bays:
            b.occupied = (
                (self.rng.random() >= leave) if b.occupied else (self.rng.random() < arrive)
            )
            reading = SensorUpdate({"occupied": b.occupied, "zone": b.zone}, self.now_ms)
            out.append((StreamKey(b.id, "occupancy"), reading))
        for s in self.stations:
            s.drift = 0.98 * s.drift + self.rng.gauss(0, 0.4)
            pm25 = s.background + 14.0 * flow + s.drift + self.rng.gauss(0, 0.8)
            noise = 42.0 + 26.0 * flow + self.rng.gauss(0, 1.5)
            out.append((StreamKey(s.id, "air"),
                        SensorUpdate({"pm25": round(max(0.5, pm25), 1),
                                      "noise": round(noise, 1)}, self.now_ms)))  # fmt: skip
        return out


def _zone(so_id: str) -> str:
    parts = so_id.split("-")
    return parts[1] if len(parts) >= 3 else "default"
