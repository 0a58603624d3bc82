"""Where replicas run: local processes (the embedded default) or Docker containers.

Both backends take the same `Replica` (a unit's replica with its rendered config file) and
report the same `Running` records, so plans, status, patches and healing behave alike on one
machine and on a site's container engine. A replica is found again by what the backend itself
keeps (a record beside its process, a container's labels), so any `cloudlet` command, not
only the one that started it, can see and stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

LABEL = "io.cloudlet"  # container labels: io.cloudlet.topology, .unit, .replica, ...


@dataclass(frozen=True)
class Replica:
    """What to run: one replica of a unit, at one version, on one site."""

    topology: str
    unit: str
    replica: str  # <unit>-<n>
    index: int
    site: str
    version: str
    image: str
    config: Path  # the rendered unit file (absolute paths, its port, its state)
    port: int  # its /metrics, /healthz and /readyz
    cpu: float
    memory: int
    mounts: tuple[str, ...] = ()  # host folders the replica reads or writes (docker)


@dataclass(frozen=True)
class Running:
    """What a backend sees of a replica."""

    unit: str
    replica: str
    site: str
    version: str
    port: int
    state: str  # running, exited, gone
    ref: str  # pid or container id
    started: float
    restarts: int = 0  # by the engine itself (docker's restart policy); the control plane
    # counts its own in control.json


class Backend(Protocol):
    def list(self) -> list[Running]: ...
    def start(self, replica: Replica) -> Running: ...
    def stop(self, replica: str, timeout: float = 30.0) -> None: ...
    def logs(self, replica: str, tail: int = 100) -> str: ...


def healthy(port: int, path: str = "/healthz", timeout: float = 2.0) -> bool:
    """The replica's own answer: 200 from /healthz (its worker runs) or /readyz (connected)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def unit_command(replica: Replica) -> list[str]:
    return ["unit", "run", str(replica.config), "--replica", str(replica.index),
            "--log-format", "json"]  # fmt: skip


class LocalBackend:
    """Replicas as processes of this machine, one folder per replica under `root`:
    `process.json` (pid, version, port) and `unit.log` (its stderr and stdout)."""

    def __init__(self, root: Path, site: str) -> None:
        self.root = root
        self.site = site
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _folder(self, replica: str) -> Path:
        return self.root / replica

    def _records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.root.glob("*/process.json")):
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                record = orjson.loads(path.read_bytes())
                if record.get("site") == self.site:
                    out.append(record)
        return out

    def _alive(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has exited

    def list(self) -> list[Running]:
        return [
            Running(
                r["unit"],
                r["replica"],
                r["site"],
                r["version"],
                r["port"],
                "running" if self._alive(r["pid"]) else "exited",
                str(r["pid"]),
                r["started"],
            )
            for r in self._records()
        ]

    def start(self, replica: Replica) -> Running:
        folder = self._folder(replica.replica)
        folder.mkdir(parents=True, exist_ok=True)
        log = (folder / "unit.log").open("ab")
        child = subprocess.Popen(
            [sys.executable, "-m", "cloudlet.entry", *unit_command(replica)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the command that started it; signals its own
            env={**os.environ, "CLOUDLET_SITE": replica.site},
        )  # fmt: skip
        log.close()
        self._children[child.pid] = child
        record = {**asdict(replica), "config": str(replica.config), "pid": child.pid,
                  "started": time.time()}  # fmt: skip
        tmp = folder / "process.json.tmp"
        tmp.write_bytes(orjson.dumps(record))
        tmp.replace(folder / "process.json")
        return Running(
            replica.unit,
            replica.replica,
            replica.site,
            replica.version,
            replica.port,
            "running",
            str(child.pid),
            record["started"],
        )

    def stop(self, replica: str, timeout: float = 30.0) -> None:
        """SIGTERM (the unit drains, checkpoints and acknowledges), SIGKILL after `timeout`."""
        record_path = self._folder(replica) / "process.json"
        try:
            record = orjson.loads(record_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return
        if record.get("site") != self.site:
            return
        pid = record["pid"]
        if self._alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        child = self._children.pop(pid, None)
        if child is not None:
            child.wait(5)
        record_path.unlink(missing_ok=True)

    def logs(self, replica: str, tail: int = 100) -> str:
        try:
            lines = (self._folder(replica) / "unit.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])


class DockerBackend:
    """Replicas as containers of one Docker Engine (the `docker` package, the Engine API):
    host networking, CPU and memory limits, labels naming topology, unit, replica, site and
    version, restart policy on-failure, and a health check on the replica's /healthz."""

    def __init__(self, url: str, topology: str, site: str) -> None:
        import docker  # only sites with a docker engine need it

        self.client = docker.DockerClient(base_url=url, timeout=120)
        self.topology = topology
        self.site = site
        self._errors = docker.errors

    def _name(self, replica: str) -> str:
        return f"cloudlet-{self.topology}-{replica}"

    def _mine(self) -> list[Any]:
        return self.client.containers.list(
            all=True,
            filters={"label": [f"{LABEL}.topology={self.topology}", f"{LABEL}.site={self.site}"]},
        )

    def list(self) -> list[Running]:
        out = []
        for c in self._mine():
            labels = c.labels
            state = c.attrs.get("State", {})
            started = state.get("StartedAt", "")
            out.append(
                Running(
                    labels[f"{LABEL}.unit"],
                    labels[f"{LABEL}.replica"],
                    self.site,
                    labels[f"{LABEL}.version"],
                    int(labels[f"{LABEL}.port"]),
                    "running" if c.status == "running" else "exited",
                    c.id[:12],
                    _docker_time(started),
                    int(c.attrs.get("RestartCount", 0)),
                )
            )
        return out

    def start(self, replica: Replica) -> Running:
        name = self._name(replica.replica)
        with contextlib.suppress(self._errors.NotFound):
            self.client.containers.get(name).remove(force=True)
        probe = (
            "import sys, urllib.request; sys.exit(urllib.request.urlopen("
            f"'http://127.0.0.1:{replica.port}/healthz', timeout=2).status != 200)"
        )
        container = self.client.containers.run(
            replica.image,
            unit_command(replica),
            name=name,
            detach=True,
            network_mode="host",  # brokers and the unit's port stay on the host's loopback
            nano_cpus=int(replica.cpu * 1e9),
            mem_limit=replica.memory,
            user=f"{os.getuid()}:{os.getgid()}",  # writes its state into the host's folders
            environment={"CLOUDLET_SITE": replica.site, "HOME": "/tmp"},
            volumes={m: {"bind": m, "mode": "rw"} for m in replica.mounts},
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},
            healthcheck={
                "test": ["CMD", "python3", "-c", probe],
                "interval": 2_000_000_000,
                "timeout": 3_000_000_000,
                "retries": 3,
                "start_period": 10_000_000_000,
            },
            labels={
                f"{LABEL}.topology": replica.topology,
                f"{LABEL}.unit": replica.unit,
                f"{LABEL}.replica": replica.replica,
                f"{LABEL}.site": replica.site,
                f"{LABEL}.version": replica.version,
                f"{LABEL}.port": str(replica.port),
            },
            stop_signal="SIGTERM",
        )
        container.reload()
        return Running(replica.unit, replica.replica, replica.site, replica.version,
                       replica.port, "running", (container.id or "")[:12],
                       time.time())  # fmt: skip

    def stop(self, replica: str, timeout: float = 30.0) -> None:
        try:
            container = self.client.containers.get(self._name(replica))
        except self._errors.NotFound:
            return
        if container.labels.get(f"{LABEL}.site") != self.site:
            return
        with contextlib.suppress(self._errors.APIError):
            container.stop(timeout=int(timeout))  # SIGTERM: drain and checkpoint
        container.remove(force=True)

    def logs(self, replica: str, tail: int = 100) -> str:
        try:
            container = self.client.containers.get(self._name(replica))
        except self._errors.NotFound:
            return ""
        return container.logs(tail=tail).decode(errors="replace")


def _docker_time(text: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return 0.0
