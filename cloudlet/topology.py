"""A deployment topology: the sites (cloudlets) and the processing units placed on them.

```yaml
name: farm
sites:
  field:                                   # a street cabinet by the fields
    location: {lat: 41.6176, lon: 0.6200}
    zone: north
    arch: arm64
    capacity: {cpu: 2, memory: 2Gi}
    labels: {power: solar}
    engine: local                          # or {docker: unix:///var/run/docker.sock}
  town:
    location: {lat: 41.6500, lon: 0.6300}
    arch: amd64
    capacity: {cpu: 8, memory: 16Gi}
    engine: local
units:
  irrigation:
    config: units/irrigation.yaml          # the processing unit's own config file
    image: cloudlet:dev                    # what the docker engine runs
    replicas: 2
    resources: {cpu: 0.5, memory: 256Mi}
    placement:
      sites: [field, town]                 # where it may run (default: anywhere)
      labels: {zone: north}                # site labels it needs
      arch: [arm64, amd64]
      near: objects                        # the service objects it reads (default), a site, or none
      spread: true                         # replicas on different sites while there are some
    feeds: [dashboard]                     # units that read its derived streams
```

Relative paths are taken from the topology file's folder. Errors name the file, the site or
unit, and the field.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streams.registry import Problem, validation_problems, yaml_mapping

NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")  # DNS-label-like: container names
ARCHES = ("amd64", "arm64", "armv7")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def memory_bytes(value: Any) -> int:
    """'256Mi', '1G', '512m' or a number of bytes, as bytes."""
    if isinstance(value, bool):
        raise ValueError("memory must be a size such as 256Mi or 2Gi")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("memory must be positive")
        return value
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?[bB]?\s*", str(value))
    if not found:
        raise ValueError(f"memory {value!r} must be a size such as 256Mi or 2Gi")
    number, unit = found.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def show_memory(n: int) -> str:
    if n == 0:
        return "0"
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n / 2**20:.0f}Mi"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Location(_Strict):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)

    def km(self, other: Location) -> float:
        """Great-circle distance (haversine), in km."""
        p1, p2 = math.radians(self.lat), math.radians(other.lat)
        dp, dl = p2 - p1, math.radians(other.lon - self.lon)
        a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
        return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(a)))

    @classmethod
    def parse(cls, value: Any) -> Location | None:
        """A location as service objects declare it: "lat,lon" or {lat, lon}; None if not."""
        try:
            if isinstance(value, str):
                lat, lon = (float(x) for x in value.split(","))
                return cls(lat=lat, lon=lon)
            if isinstance(value, dict):
                return cls.model_validate(value)
        except (ValueError, ValidationError):
            return None
        return None


class Resources(_Strict):
    cpu: float = Field(default=0.5, gt=0, le=512)
    memory: int = 256 * 2**20

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return memory_bytes(value)


class DockerEngine(_Strict):
    docker: str = Field(
        description="the Docker Engine API: unix:///var/run/docker.sock, tcp://h:2375"
    )


class Site(_Strict):
    location: Location | None = None
    zone: str | None = None
    arch: Literal["amd64", "arm64", "armv7"] = "amd64"
    capacity: Resources = Resources(cpu=4, memory=4 * 2**30)
    labels: dict[str, str] = {}
    engine: Literal["local"] | DockerEngine = "local"

    def label(self, name: str) -> str | None:
        """A label, with zone and arch readable as labels too."""
        if name == "zone":
            return self.zone
        if name == "arch":
            return self.arch
        return self.labels.get(name)


class Placement(_Strict):
    sites: list[str] | None = None
    labels: dict[str, str] = {}
    arch: list[Literal["amd64", "arm64", "armv7"]] | None = None
    near: str | Location | None = "objects"  # "objects", a site's name, a point, or none
    spread: bool = True


class UnitSpec(_Strict):
    config: Path
    image: str = "cloudlet:dev"
    replicas: int = Field(default=1, ge=0, le=100)
    resources: Resources = Resources()
    placement: Placement = Placement()
    feeds: list[str] = []

    def version(self) -> str:
        """What identifies a release of the unit: its image, resources and config file's
        content. A patch changes it; replicas of another version get replaced."""
        digest = hashlib.sha256()
        digest.update(self.image.encode())
        digest.update(self.resources.model_dump_json().encode())
        try:
            digest.update(self.config.read_bytes())
        except OSError:
            digest.update(str(self.config).encode())
        return digest.hexdigest()[:12]


class Topology(_Strict):
    name: str = "cloudlet"
    sites: dict[str, Site] = Field(min_length=1)
    units: dict[str, UnitSpec] = {}
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"name {value!r} must be lower-case letters, digits and '-'")
        return value

    @field_validator("sites", "units")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not NAME.match(name):
                raise ValueError(
                    f"{name!r} must be 1-40 lower-case letters, digits and '-' (it names"
                    " containers and processes)"
                )
        return value

    @model_validator(mode="after")
    def _references(self) -> Topology:
        problems = []
        for name, unit in self.units.items():
            for site in unit.placement.sites or []:
                if site not in self.sites:
                    problems.append(f"units.{name}.placement.sites: no site {site!r}")
            near = unit.placement.near
            if isinstance(near, str) and near not in ("objects", "none") and near not in self.sites:
                problems.append(
                    f"units.{name}.placement.near: {near!r} is not 'objects', 'none' or a site"
                )
            for other in unit.feeds:
                if other not in self.units:
                    problems.append(f"units.{name}.feeds: no unit {other!r}")
                elif other == name:
                    problems.append(f"units.{name}.feeds: a unit cannot feed itself")
        if not problems:
            try:
                self.order()
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def order(self) -> list[str]:
        """Units with the ones that feed others first (a cycle is an error)."""
        fed_by: dict[str, set[str]] = {name: set() for name in self.units}
        for name, unit in self.units.items():
            for other in unit.feeds:
                fed_by[other].add(name)
        done: list[str] = []
        while len(done) < len(self.units):
            ready = sorted(n for n in self.units if n not in done and fed_by[n] <= set(done))
            if not ready:
                left = sorted(n for n in self.units if n not in done)
                raise ValueError(f"units.feeds: a cycle between {', '.join(left)}")
            done.extend(ready)
        return done

    @classmethod
    def load(cls, path: Path) -> Topology:
        """The topology in `path`; TopologyError lists every problem with file and field."""
        source = str(path)
        doc, problem = yaml_mapping(path, "a topology")
        if problem is not None:
            raise TopologyError([problem])
        try:
            topology = cls.model_validate(doc)
        except ValidationError as exc:
            raise TopologyError(_problems(exc, source)) from None
        base = path.parent
        units = {
            name: unit.model_copy(update={"config": (base / unit.config).absolute()})
            for name, unit in topology.units.items()
        }
        problems = [
            Problem(source, f"no such file: {unit.config}", field=f"units.{name}.config")
            for name, unit in units.items()
            if not unit.config.is_file()
        ]
        problems += [
            Problem(source, why, field=f"units.{name}.replicas")
            for name, unit in units.items()
            if unit.replicas > 1 and (why := _split_state(unit.config, unit.replicas))
        ]
        if problems:
            raise TopologyError(problems)
        return topology.model_copy(update={"units": units, "source": source})


DEFAULT_PARTITIONS = 16  # of a keyed unit: more replicas than this would have none to own


def keyed(config: Path) -> bool:
    """Whether this unit keeps state per object or group (windows, composite streams, rules):
    its replicas then split the objects by partition (`processors.partitions`), each object's
    readings all to one replica; the others share the messages (an MQTT shared
    subscription)."""
    from processors.config import ConfigError, UnitConfig
    from streams.catalog import Catalog

    try:
        unit = UnitConfig.load(config)
    except ConfigError:
        return False  # said when it is deployed, with every problem
    if unit.partitions is not None:
        return True
    if not unit.derive:
        return False
    catalog, _ = Catalog.check(unit.objects)
    return bool(catalog.flows or catalog.rules or catalog.plan.derived)


def partitioning(config: Path, replicas: int) -> str | None:
    """What `plan` says of a keyed unit: how its objects fall into partitions (what one flow
    or composite joins stays together) and what its replicas can share."""
    from processors.config import ConfigError, UnitConfig
    from streams.catalog import Catalog
    from streams.colocation import colocated, groups, partitions

    if not keyed(config):
        return None
    try:
        unit = UnitConfig.load(config)
    except ConfigError:
        return None
    count = unit.partitions.count if unit.partitions is not None else DEFAULT_PARTITIONS
    catalog, _ = Catalog.check(unit.objects)
    of = colocated(catalog)
    used = partitions(of, count)
    largest = max(groups(of).values(), key=len, default=[])
    text = (
        f"{unit.name}: keyed (windows, composite streams or rules): {len(of)} objects in"
        f" {len(groups(of))} groups, {len(used)} of {count} partitions in use; the largest"
        f" group, kept together: {', '.join(largest[:6])}{' ...' if len(largest) > 6 else ''}"
    )
    if replicas > len(used):
        text += f" ({replicas} replicas: {replicas - len(used)} will have no partition)"
    return text


def _split_state(config: Path, replicas: int) -> str | None:
    """Why `replicas` replicas of this unit would compute wrong results, if they would: a
    unit that keeps state split by message (its own `share_group`) sees part of every
    device's readings."""
    from processors.config import ConfigError, UnitConfig

    try:
        unit = UnitConfig.load(config)
    except ConfigError:
        return None
    if unit.share_group is None or not keyed(config):
        return None
    return (
        f"{replicas} replicas sharing the messages (share_group: {unit.share_group}) of a"
        " unit with windows, composite streams or rules would each see part of every"
        " device's readings and compute wrong results: remove share_group (its replicas are"
        " then partitioned by key), or give a unit that only validates, stores and forwards"
        " `derive: false`"
    )


def _problems(exc: ValidationError, source: str) -> list[Problem]:
    out: list[Problem] = []
    for problem in validation_problems(exc, source):
        if problem.field in (None, "") and "; " in problem.message:  # our cross-checks
            out.extend(Problem(source, part) for part in problem.message.split("; "))
        else:
            out.append(problem)
    return out


class TopologyError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
