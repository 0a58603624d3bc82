"""What must be processed together: the service objects a flow, a composite stream or a rule
joins, grouped so that one instance sees all of a group's updates.

A flow keyed by object (`key: so`) keeps each object's windows apart, so it joins nothing; a
flow keyed otherwise (`none`, an expression) aggregates across the objects it reads, and a flow
writing into one fixed object feeds that object's composite streams from all of them: those
objects are one group. A composite stream reading a group joins its object with the group's
members; a rule reads one object and commands another (no state across them): it joins
nothing. Scaling out (replicas of a unit, instances of a cloud-tier unit) splits the objects by
group, never a group.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from streams.catalog import Catalog


def colocated(catalog: Catalog) -> dict[str, str]:
    """Each object's group, named by its smallest member id (an object alone: itself)."""
    parent: dict[str, str] = {so: so for so in catalog.registry.objects}

    def find(so: str) -> str:
        parent.setdefault(so, so)
        while parent[so] != so:
            parent[so] = parent[parent[so]]
            so = parent[so]
        return so

    def join(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for flow in catalog.flows:
        members = sorted({key.so for key in flow.inputs})
        if flow.into_so is not None:
            members.append(flow.into_so)
        if flow.key_mode != "so" or flow.into_so is not None:
            for other in members[1:]:
                join(members[0], other)
    for so_id, so in catalog.registry.objects.items():
        for group in so.groups.values():
            for member in group.so_ids:
                join(so_id, member)
    return {so: find(so) for so in parent}


def groups(of: Mapping[str, str]) -> dict[str, list[str]]:
    """The groups of `colocated`'s answer, each with its members, sorted."""
    out: dict[str, list[str]] = {}
    for so, group in sorted(of.items()):
        out.setdefault(group, []).append(so)
    return out


def partition_of(group: str, count: int) -> int:
    """The partition of a group among `count`: CRC-32 of its name, stable across processes,
    machines and Python versions (the built-in hash is salted per process)."""
    return zlib.crc32(group.encode()) % count


def partitions(of: Mapping[str, str], count: int) -> dict[int, list[str]]:
    """The objects of each partition (those with any), sorted: every group whole."""
    out: dict[int, list[str]] = {}
    for so, group in sorted(of.items()):
        out.setdefault(partition_of(group, count), []).append(so)
    return out
