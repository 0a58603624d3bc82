"""Placement: which replica of which unit runs on which site, and why.

Greedy and deterministic, unit by unit with the units that feed others first (so a unit can be
placed near what feeds it), replica by replica. A site is a candidate when it is allowed,
has the labels and the architecture asked for, is not evacuated, and has the CPU and memory
left. Among the candidates the placement prefers, in this order: a site without a replica of
the same unit (when `spread`), the site nearest the unit's data sources (the service objects
it reads, by their declared `location`, and the sites of the units that feed it), then the
least loaded site. A replica already placed stays where it is while its site still qualifies,
so deploying again moves nothing; `rebalance` places everything afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cloudlet.topology import Location, Site, Topology, UnitSpec, show_memory


@dataclass
class Used:
    """What the replicas placed so far take of a site."""

    cpu: float = 0.0
    memory: int = 0


@dataclass(frozen=True)
class Assignment:
    unit: str
    replica: str  # <unit>-<n>: its MQTT session, state and outbox
    site: str
    why: str


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)

    def of(self, unit: str) -> list[Assignment]:
        return [a for a in self.assignments if a.unit == unit]

    def on(self, site: str) -> list[Assignment]:
        return [a for a in self.assignments if a.site == site]

    def where(self) -> dict[str, str]:
        """replica -> site"""
        return {a.replica: a.site for a in self.assignments}

    def to_json(self) -> list[dict[str, str]]:
        return [a.__dict__ for a in self.assignments]

    @classmethod
    def from_json(cls, rows: list[dict[str, str]]) -> Plan:
        return cls([Assignment(**row) for row in rows])


class PlacementError(Exception):
    pass


def sources(spec: UnitSpec) -> list[Location]:
    """The declared locations (customFields.location, "lat,lon") of the service objects the
    unit's config reads; objects without one are not counted."""
    from cloudlet.unit_file import UnitFile  # the unit file and its descriptors
    from streams.registry import Registry

    try:
        config = UnitFile.load(spec.config)
    except Exception:
        return []
    registry, _ = Registry.parse([Path(p) for p in config.objects])  # every declared object
    found = []
    for so in registry.objects.values():
        where = so.custom_fields.get("location") or (so.model_extra or {}).get("location")
        point = Location.parse(where)
        if point is not None:
            found.append(point)
    return found


def place(
    topology: Topology,
    current: dict[str, str] | None = None,
    *,
    excluded: set[str] = frozenset(),  # type: ignore[assignment]
    locations: dict[str, list[Location]] | None = None,
) -> Plan:
    """A placement for every replica. `current` (replica -> site) is kept where it still
    qualifies; `excluded` sites (evacuated) get nothing. `locations` overrides the unit's
    sources (tests)."""
    current = current or {}
    used = {name: Used() for name in topology.sites}
    plan = Plan()
    for unit_name in topology.order():
        spec = topology.units[unit_name]
        points = list(locations[unit_name] if locations is not None else sources(spec))
        for feeder, other in topology.units.items():
            if unit_name in other.feeds:
                for a in plan.of(feeder):
                    site = topology.sites[a.site]
                    if site.location is not None:
                        points.append(site.location)
        near = _target(topology, spec, points)
        for n in range(spec.replicas):
            replica = f"{unit_name}-{n}"
            plan.assignments.append(
                _one(topology, unit_name, spec, replica, near, used, plan, current, excluded)
            )
    return plan


def _target(topology: Topology, spec: UnitSpec, points: list[Location]) -> list[Location]:
    near = spec.placement.near
    if near is None or near == "none":
        return []
    if isinstance(near, Location):
        return [near]
    if near != "objects":
        site = topology.sites[near]
        return [site.location] if site.location else []
    return points


def _one(
    topology: Topology,
    unit_name: str,
    spec: UnitSpec,
    replica: str,
    near: list[Location],
    used: dict[str, Used],
    plan: Plan,
    current: dict[str, str],
    excluded: set[str],
) -> Assignment:
    refused: list[str] = []
    candidates: list[str] = []
    for name, site in topology.sites.items():
        reason = _refuse(name, site, spec, used[name], excluded)
        if reason:
            refused.append(f"{name}: {reason}")
        else:
            candidates.append(name)
    if not candidates:
        raise PlacementError(
            f"unit {unit_name!r}: no site can take replica {replica}: " + "; ".join(refused)
        )
    siblings = {a.site for a in plan.of(unit_name)}

    def distance(name: str) -> float | None:
        site = topology.sites[name]
        if not near or site.location is None:
            return None
        return sum(site.location.km(p) for p in near) / len(near)

    def load(name: str) -> float:
        cap = topology.sites[name].capacity
        return max(used[name].cpu / cap.cpu, used[name].memory / cap.memory)

    def rank(name: str) -> tuple[bool, float, float, str]:
        d = distance(name)
        return (spec.placement.spread and name in siblings, d if d is not None else 1e9,
                load(name), name)  # fmt: skip

    kept = current.get(replica)
    if kept in candidates and not (spec.placement.spread and kept in siblings
                                   and any(c not in siblings for c in candidates)):  # fmt: skip
        chosen, how = kept, "stays"
    else:
        chosen, how = min(candidates, key=rank), "placed"
    site = topology.sites[chosen]
    used[chosen].cpu += spec.resources.cpu
    used[chosen].memory += spec.resources.memory
    parts = [how]
    d = distance(chosen)
    if d is not None:
        parts.append(f"{d:.1f} km from its {len(near)} source{'s' if len(near) != 1 else ''}")
    elif not near:
        parts.append("no located sources")
    if spec.placement.spread and chosen in siblings:
        parts.append("shares the site with another replica (no other site fits)")
    parts.append(
        f"{site.arch}; {used[chosen].cpu:g}/{site.capacity.cpu:g} CPU,"
        f" {show_memory(used[chosen].memory)}/{show_memory(site.capacity.memory)} used"
    )
    if spec.placement.spread and siblings and chosen not in siblings:
        parts.append(f"spread: the unit is on {', '.join(sorted(siblings))} already")
    if refused:
        parts.append("not " + "; ".join(refused))
    return Assignment(unit_name, replica, chosen, "; ".join(parts))


def _refuse(name: str, site: Site, spec: UnitSpec, used: Used, excluded: set[str]) -> str:
    rules = spec.placement
    if name in excluded:
        return "evacuated"
    if rules.sites is not None and name not in rules.sites:
        return "not in placement.sites"
    if rules.arch is not None and site.arch not in rules.arch:
        return f"{site.arch} (needs {'/'.join(rules.arch)})"
    for label, value in rules.labels.items():
        if site.label(label) != value:
            return f"label {label}={site.label(label)!r} (needs {value!r})"
    if used.cpu + spec.resources.cpu > site.capacity.cpu + 1e-9:
        return f"CPU full ({used.cpu:g} of {site.capacity.cpu:g} used)"
    if used.memory + spec.resources.memory > site.capacity.memory:
        return f"memory full ({show_memory(used.memory)} of {show_memory(site.capacity.memory)})"
    return ""
