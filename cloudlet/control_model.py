"""What the control plane keeps and shows: control.json (`Control`), the steps of a plan, and
each replica's status with its counters."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudlet.backends import Running

Say = Callable[[str], None]
STARTING = 15.0  # seconds a replica may take to answer /healthz before it counts as unhealthy


class ControlError(Exception):
    pass


@dataclass
class Control:
    """control.json"""

    topology: str | None = None
    plan: list[dict[str, str]] = field(default_factory=list)
    evacuated: list[str] = field(default_factory=list)
    patched: dict[str, dict[str, str]] = field(default_factory=dict)  # unit -> image/config
    ports: dict[str, int] = field(default_factory=dict)  # replica -> its HTTP port
    releases: dict[str, dict[str, Any]] = field(default_factory=dict)  # replica -> last ready
    restarts: dict[str, int] = field(default_factory=dict)  # replica -> heals by reconcile
    stopped: bool = False


@dataclass
class Step:
    """One thing a plan does, printed before it is done."""

    action: str  # start, stop, move, update
    replica: str
    site: str
    detail: str = ""
    source: str | None = None  # the site it leaves (move)

    def __str__(self) -> str:
        where = f"{self.source} -> {self.site}" if self.source else self.site
        return f"{self.action:<7} {self.replica:<24} {where:<20} {self.detail}".rstrip()


@dataclass
class ReplicaStatus:
    unit: str
    replica: str
    site: str
    desired_version: str | None
    running: Running | None
    healthy: bool
    ready: bool
    rates: dict[str, float] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if self.desired_version is None:
            return "stray"
        if self.running is None:
            return "missing"
        if self.running.state != "running":
            return "exited"
        if self.running.version != self.desired_version:
            return "outdated"
        if not self.healthy:
            return "starting" if time.time() - self.running.started < STARTING else "unhealthy"
        return "ready" if self.ready else "starting"


def counters(read: Callable[[str], dict[str, float]], row: ReplicaStatus) -> dict[str, float]:
    if row.running is None or row.running.state != "running":
        return {}
    try:
        m = read(f"http://127.0.0.1:{row.running.port}/metrics")
    except OSError:
        return {}
    return {
        "messages": m.get("cloudlet_messages_received_total", 0.0),
        "updates": m.get("cloudlet_updates_accepted_total", 0.0),
        "derived": m.get("cloudlet_updates_derived_total", 0.0),
    }
