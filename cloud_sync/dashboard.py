"""The dashboard: live charts of cloud objects, the latest values, actuators with their
commands, a plan of the objects and the cloudlets' health, on one page.

Charts are declared per scenario (`dashboard.yaml`), and the page asks the service for their
data every two seconds. It needs nothing from the internet (the machines running a cloudlet
often cannot reach it): the charting library, Apache ECharts, is vendored in the package
(`web_assets/`, from npm, pinned) and served by the service itself.

```yaml
title: Irrigation
charts:
  - title: Soil moisture, 10-minute average (%)
    stream: moisture_10min          # one line per object with this stream
    channel: moisture
    marks:                           # ticks, labelled, a colour per kind
      - {stream: state, channel: open, label: valve open}   # when a channel is true (or > 0)
      - {stream: irrigate, when: update, label: irrigate}   # whenever the stream has an update
  - {title: Free bays per zone, stream: free_1m, channel: free, series: key}  # lines by a channel
actuators:                           # command buttons (for a token allowed to actuate)
  - objects: "field-*-valve"         # the reported objects this matches
    state: {stream: state, channel: open}
    actions:
      - {name: open, label: open 10 min, parameters: {minutes: 10}}
      - {name: close}
```
The plan places every object by the newest value of its `geo_point` channels."""

from __future__ import annotations

import fnmatch
import itertools
import logging
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_sync.store import CloudStore

log = logging.getLogger(__name__)


class Mark(BaseModel):
    """A tick on a chart, labelled, coloured by its kind: when `channel` is true (or > 0), or
    (`when: update`) whenever the stream has an update (an alert stream that only speaks
    when alerting, as `full` with its post-filter `free == 0`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: str
    channel: str | None = None
    label: str
    when: Literal["true", "update"] = "true"

    @model_validator(mode="after")
    def _what(self) -> Mark:
        if self.when == "true" and self.channel is None:
            raise ValueError(f"mark {self.label!r}: name its channel, or say when: update")
        return self


class Chart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str
    stream: str
    channel: str
    series: str | None = None  # a channel whose value names the line (default: the object)
    points: int = Field(default=240, ge=2, le=5000)
    marks: list[Mark] = []


class Button(BaseModel):
    """A command button: the action, and the parameters it sends."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    label: str | None = None
    parameters: dict[str, Any] = {}


class StateChannel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stream: str
    channel: str


class Actuators(BaseModel):
    """Objects (a pattern over the reported ones) with command buttons and, beside them, the
    channel that shows their state."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    objects: str
    state: StateChannel | None = None
    actions: list[Button] = Field(min_length=1)


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str = "cloudlet"
    charts: list[Chart] = []
    actuators: list[Actuators] = []

    @classmethod
    def load(cls, path: Path | None) -> Dashboard:
        if path is None:
            return cls()
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


def _value(update: dict[str, Any], channel: str) -> Any:
    found = (update.get("channels") or {}).get(channel)
    return found.get("current-value") if isinstance(found, dict) else None


def _fires(mark: Mark, update: dict[str, Any]) -> bool:
    if mark.when == "update":
        return True
    assert mark.channel is not None
    v = _value(update, mark.channel)
    return v is True or (not isinstance(v, bool) and isinstance(v, int | float) and v > 0)


def chart_data(store: CloudStore, dashboard: Dashboard, readable: Any) -> dict[str, Any]:
    """Every chart's lines and marks, from the objects the caller may read: one query per
    stream a chart shows (its line, each mark), whatever the number of objects."""
    charts = []
    for chart in dashboard.charts:
        lines: dict[str, list[list[float]]] = {}
        for so, updates in store.recent_of_stream(chart.stream, chart.points).items():
            if not readable(so):
                continue
            for u in updates:
                v = _value(u, chart.channel)
                if isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                name = str(_value(u, chart.series)) if chart.series else so
                lines.setdefault(name, []).append([u["lastUpdate"], v])
        marks: list[dict[str, Any]] = []
        for mark in chart.marks:
            for so, updates in store.recent_of_stream(mark.stream, chart.points).items():
                if readable(so):
                    marks += [{"t": u["lastUpdate"], "kind": mark.label, "so": so,
                               "label": f"{mark.label}: {so}"}
                              for u in updates if _fires(mark, u)]  # fmt: skip
        marks.sort(key=lambda m: int(m["t"]))
        charts.append({"title": chart.title, "lines": [{"name": n, "points": sorted(p)}
                                                       for n, p in sorted(lines.items())],
                       "marks": marks})  # fmt: skip
    return {"title": dashboard.title, "charts": charts}


def site_data(store: CloudStore, dashboard: Dashboard, readable: Any,
              may_actuate: Any) -> dict[str, Any]:  # fmt: skip
    """The page's panels besides the charts, from the objects the caller may read: the latest
    values of every object and stream, the actuators (their state, their buttons, whether the
    caller may press them) and the plan (each object's newest geo_point). Two queries."""
    latest: list[dict[str, Any]] = []
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for so, stream, update in store.latest_updates():
        if not readable(so):
            continue
        newest[(so, stream)] = update
        values = {name: ch.get("current-value") if isinstance(ch, dict) else None
                  for name, ch in sorted((update.get("channels") or {}).items())}  # fmt: skip
        latest.append({"so": so, "stream": stream, "lastUpdate": update.get("lastUpdate"),
                       "values": values})  # fmt: skip
    reported = sorted({so for so, _stream in newest})
    actuators = []
    for panel in dashboard.actuators:
        for so in reported:
            if not fnmatch.fnmatchcase(so, panel.objects):
                continue
            state, at = None, None
            if panel.state is not None:
                found = newest.get((so, panel.state.stream))
                if found is not None:
                    state, at = _value(found, panel.state.channel), found.get("lastUpdate")
            actuators.append({
                "so": so, "state": state, "stateAt": at, "mayActuate": bool(may_actuate(so)),
                "stateName": panel.state.channel if panel.state else None,
                "actions": [{"name": b.name, "label": b.label or b.name,
                             "parameters": b.parameters} for b in panel.actions],
            })  # fmt: skip
    places, placed = [], set()
    for so, stream, channel, lat, lon, at in store.places():
        if so in placed or not readable(so):
            continue
        placed.add(so)
        places.append({"so": so, "stream": stream, "channel": channel, "lat": lat, "lon": lon,
                       "lastUpdate": at})  # fmt: skip
    return {"latest": latest, "actuators": actuators, "places": places}


_HEALTH = {
    "cloudlet_messages_received_total": "received",
    "cloudlet_updates_accepted_total": "accepted",
    "cloudlet_updates_derived_total": "derived",
    "cloudlet_dead_letters_total": "dead_letters",
    "cloudlet_actuations_sent_total": "actuations",
    "cloudlet_outbox_depth": "outbox_depth",
    "cloudlet_forwarded_records_total": "forwarded",
}


def unit_health(urls: list[str]) -> list[dict[str, Any]]:
    """Each unit's counters from its /metrics (up: false when it does not answer)."""
    out = []
    for url in urls:
        entry: dict[str, Any] = {"url": url, "up": False, "rejected": {}}
        try:
            text = urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            out.append(entry)
            continue
        entry["up"] = True
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "cloudlet_updates_rejected_total":
                    entry["rejected"][s.labels["reason"]] = s.value
                elif s.name in _HEALTH:
                    key = _HEALTH[s.name]
                    entry[key] = entry.get(key, 0) + s.value
                    if "unit" in s.labels:
                        entry["unit"] = s.labels["unit"]
        out.append(entry)
    return out


class HealthHistory:
    """The units' counters, sampled by a thread of its own every `every` seconds and kept for
    `keep` samples: the rates over time the page draws from its first load (not only from
    the samples it took itself). A sample that fails is logged and the next one taken."""

    RATES = ("received", "accepted", "forwarded")

    def __init__(
        self,
        urls: list[str],
        *,
        every: float = 5.0,
        keep: int = 120,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[list[str]], list[dict[str, Any]]] = unit_health,
    ) -> None:
        self.urls, self.every, self.clock, self.fetch = urls, every, clock, fetch
        self._samples: dict[str, deque[tuple[float, dict[str, Any]]]] = {
            url: deque(maxlen=keep) for url in urls
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> list[dict[str, Any]]:
        """The units' counters now, kept."""
        entries = self.fetch(self.urls)
        at = self.clock()
        with self._lock:
            for entry in entries:
                if entry["up"] and entry["url"] in self._samples:
                    self._samples[entry["url"]].append((at, entry))
        return entries

    def rates(self, url: str) -> list[list[float]]:
        """[time ms, received/s, accepted/s, forwarded/s] between successive samples (a
        counter that went back, a unit restarted: 0 for that step)."""
        with self._lock:
            kept = list(self._samples.get(url, ()))
        out = []
        for (t0, a), (t1, b) in itertools.pairwise(kept):
            dt = t1 - t0
            if dt > 0:
                out.append([round(t1 * 1000), *(max(0.0, (b.get(k, 0) - a.get(k, 0)) / dt)
                                                for k in self.RATES)])  # fmt: skip
        return out

    def health(self) -> list[dict[str, Any]]:
        """Each unit's counters now, with its rates over the kept samples (only the thread's
        samples are kept: evenly spaced, whoever asks how often)."""
        entries = self.fetch(self.urls)
        return [{**e, "rates": self.rates(e["url"])} for e in entries]

    def start(self) -> HealthHistory:
        self._thread = threading.Thread(target=self._run, name="cloudlet-health", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception:  # a unit answering garbage, or a bug of ours: said, next one
                log.exception("health: sampling the units failed; trying again")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def page_policy(nonce: str) -> str:
    """The dashboard page's Content-Security-Policy: its own script (by nonce), its own API,
    nothing from elsewhere, never framed."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline';"
        " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )


# the page (its script inline, given a nonce per answer) and the charting library it loads
PAGE = (Path(__file__).parent / "dashboard.html").read_text()
ASSETS = Path(__file__).parent / "web_assets"  # Apache ECharts 6.1.0 (npm), served at /assets
