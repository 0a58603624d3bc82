"""A simulated irrigation site: soil probes, valves, a rain gauge and a weather station.

The physics is simple but keeps the shape of the real signals: air temperature and sunlight
follow the day, rain comes in random showers, soil dries faster in sun and heat and recovers
after rain or watering. Everything is driven by the caller's simulated time and a seeded
random generator, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from streams import GeoPoint, SensorUpdate, StreamKey

HOUR_MS = 3_600_000


class FieldDevices(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    soil: str
    valve: str


class IrrigationSite(BaseModel):
    """Which service object plays which part (the scenario's `site.yaml`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fields: list[FieldDevices]
    rain_gauge: str
    weather: str
    location: tuple[float, float] = (41.6170, 0.6225)

    @classmethod
    def load(cls, path: Path) -> IrrigationSite:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    @property
    def device_ids(self) -> list[str]:
        ids = [d for f in self.fields for d in (f.soil, f.valve)]
        return [*ids, self.rain_gauge, self.weather]


@dataclass(slots=True)
class _Field:
    devices: FieldDevices
    moisture: float  # volumetric %, 8..55
    soil_temperature: float
    drying: float  # this field's soil: how fast it dries relative to the average
    valve_open: bool = False
    valve_until: int | None = None  # simulated ms at which an opened valve closes itself


class IrrigationModel:
    """The site's state; `step` advances it and returns one reading per device."""

    def __init__(self, site: IrrigationSite, *, seed: int = 1, start_ms: int) -> None:
        self.site = site
        self.rng = random.Random(seed)
        self.now_ms = start_ms
        self.fields = [
            _Field(
                f,
                moisture=self.rng.uniform(17.0, 30.0),  # some fields need water early
                soil_temperature=16.0,
                drying=self.rng.uniform(0.8, 1.25),
            )
            for f in site.fields
        ]
        self._rain_until = 0
        self._rain_intensity = 0.0  # mm/h

    @property
    def device_ids(self) -> list[str]:
        return self.site.device_ids

    def set_valve(self, valve_id: str, open_: bool, *, minutes: float | None = None) -> None:
        """What an actuation does to the field behind `valve_id`; an opened valve with
        `minutes` closes itself after that much simulated time."""
        for f in self.fields:
            if f.devices.valve == valve_id:
                f.valve_open = open_
                f.valve_until = (
                    self.now_ms + int(minutes * 60_000) if open_ and minutes is not None else None
                )
                return
        raise KeyError(f"no field has valve {valve_id!r}")

    def _hour(self) -> float:
        return (self.now_ms / HOUR_MS) % 24.0

    def air_temperature(self) -> float:
        return 17.0 + 9.0 * math.sin(2 * math.pi * (self._hour() - 9.0) / 24.0)

    def sunlight(self) -> float:
        raw = max(0.0, 950.0 * math.sin(math.pi * (self._hour() - 6.0) / 12.0))
        return raw * (0.25 if self.raining else 1.0)

    @property
    def raining(self) -> bool:
        return self.now_ms < self._rain_until

    def _weather(self, dt_h: float) -> float:
        """Advance the showers; the rain (mm) that fell during this step."""
        if not self.raining and self.rng.random() < 0.08 * dt_h:  # ~2 showers a day
            self._rain_until = self.now_ms + int(self.rng.uniform(0.3, 1.5) * HOUR_MS)
            self._rain_intensity = self.rng.uniform(0.5, 8.0)
        return self._rain_intensity * dt_h if self.raining else 0.0

    def step(self, dt_s: float) -> list[tuple[StreamKey, SensorUpdate]]:
        self.now_ms += int(dt_s * 1000)
        dt_h = dt_s / 3600.0
        rain_mm = self._weather(dt_h)
        air = self.air_temperature()
        sun = self.sunlight()
        noise = self.rng.gauss
        out: list[tuple[StreamKey, SensorUpdate]] = []
        for f in self.fields:
            if f.valve_until is not None and self.now_ms >= f.valve_until:
                f.valve_open, f.valve_until = False, None
            drying = (0.15 + sun / 1500.0 + max(0.0, air - 15.0) * 0.03) * f.drying
            gain = rain_mm * 1.2 + (6.0 * dt_h if f.valve_open else 0.0)
            f.moisture = min(55.0, max(8.0, f.moisture - drying * dt_h + gain))
            f.soil_temperature += (air - 2.0 - f.soil_temperature) * min(1.0, dt_h / 3.0)
            out.append(
                (
                    StreamKey(f.devices.soil, "soil"),
                    SensorUpdate(
                        {
                            "moisture": round(f.moisture + noise(0, 0.2), 2),
                            "temperature": round(f.soil_temperature + noise(0, 0.1), 2),
                        },
                        self.now_ms,
                    ),
                )
            )
            out.append(
                (
                    StreamKey(f.devices.valve, "state"),
                    SensorUpdate({"open": f.valve_open}, self.now_ms),
                )
            )
        out.append(
            (
                StreamKey(self.site.rain_gauge, "rain"),
                SensorUpdate({"mm": round(rain_mm, 3)}, self.now_ms),
            )
        )
        out.append(
            (
                StreamKey(self.site.weather, "weather"),
                SensorUpdate(
                    {
                        "temperature": round(air + noise(0, 0.3), 2),
                        "sunlight": round(max(0.0, sun + noise(0, 10)), 1),
                        "location": GeoPoint(*self.site.location),
                    },
                    self.now_ms,
                ),
            )
        )
        return out
