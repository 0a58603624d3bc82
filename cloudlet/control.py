"""The control plane: desired state (a topology and its placement) against actual state (what
the sites' backends run), and the plans that bring one to the other.

Everything it knows is in a state folder (`.cloudlet/` by default): `control.json` (the
topology file, the placement, evacuated sites, patches), one folder per replica (its rendered
unit file, its state snapshots and outbox) and the local backend's process records and logs.
Every command reads it, so `deploy`, `status`, `patch`, `evacuate` and the reconcile loop
can be run one after another from any shell.
"""

from __future__ import annotations

import fcntl
import functools
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import orjson
import yaml

from cloudlet.backends import Backend, DockerBackend, LocalBackend, Replica, Running, healthy
from cloudlet.control_model import (
    STARTING,
    Control,
    ControlError,
    ReplicaStatus,
    Say,
    Step,
    counters,
)
from cloudlet.placement import Plan, place
from cloudlet.topology import DEFAULT_PARTITIONS, DockerEngine, Topology, UnitSpec, keyed

F = TypeVar("F", bound=Callable[..., Any])


def _exclusive(method: F) -> F:
    """The method runs under the state folder's lock (`Controller.locked`)."""

    @functools.wraps(method)
    def locked(self: Controller, *args: Any, **kwargs: Any) -> Any:
        with self.locked():
            return method(self, *args, **kwargs)

    return cast(F, locked)


class Controller:
    def __init__(
        self,
        state: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        say: Say = print,
    ) -> None:
        self.state = state.absolute()
        self.clock, self.sleep, self.say = clock, sleep, say
        self.control = self._read()
        self._holding = 0  # how deep in `locked` this controller is
        self._backends: dict[str, Backend] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # replica -> (restarts, next allowed)
        self._since_healthy: dict[str, float] = {}

    # state -------------------------------------------------------------------------------

    def _read(self) -> Control:
        path = self.state / "control.json"
        if not path.exists():
            return Control()
        return Control(**orjson.loads(path.read_bytes()))

    @contextmanager
    def locked(self) -> Iterator[Control]:
        """The state folder's lock, held for the whole of a command that changes anything
        (deploy, patch, evacuate, rebalance, shutdown, a reconcile pass), with control.json
        read afresh once it is held: commands from several shells (and a reconcile loop)
        take turns, each on what the one before it left, so none undoes another. Reentrant
        in one controller; a command that must wait says so."""
        if self._holding:
            self._holding += 1
            try:
                yield self.control
            finally:
                self._holding -= 1
            return
        self.state.mkdir(parents=True, exist_ok=True)
        with (self.state / "control.lock").open("a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"waiting for another cloudlet command working on {self.state} ...")
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._holding = 1
                self.control = self._read()
                yield self.control
            finally:
                self._holding = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _save(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.state / "control.json.tmp"
        tmp.write_bytes(orjson.dumps(self.control.__dict__, option=orjson.OPT_INDENT_2))
        tmp.replace(self.state / "control.json")

    def topology(self, path: Path | None = None) -> Topology:
        if path is None:
            if self.control.topology is None:
                raise ControlError(
                    f"nothing deployed from {self.state}: run `cloudlet deploy TOPOLOGY` first"
                    " (or point --state at the folder deploy used)"
                )
            path = Path(self.control.topology)
        return Topology.load(path)

    def spec(self, topology: Topology, unit: str, patch: dict[str, str] | None = None) -> UnitSpec:
        """The unit as the topology says, with `patch` (by default, the patches applied
        since) on top."""
        spec = topology.units[unit]
        patch = self.control.patched.get(unit, {}) if patch is None else patch
        update: dict[str, Any] = {}
        if "image" in patch:
            update["image"] = patch["image"]
        if "config" in patch:
            update["config"] = Path(patch["config"])
        return spec.model_copy(update=update) if update else spec

    def _with_unit(self, unit: str) -> Topology:
        """The deployed topology, which must have `unit`."""
        topology = self.topology()
        if unit not in topology.units:
            raise ControlError(
                f"no unit {unit!r} in {topology.source} ({', '.join(topology.units)})"
            )
        return topology

    def backend(self, topology: Topology, site: str) -> Backend:
        if site not in self._backends:
            engine = topology.sites[site].engine
            if isinstance(engine, DockerEngine):
                self._backends[site] = DockerBackend(engine.docker, topology.name, site)
            else:
                self._backends[site] = LocalBackend(self.state / "local", site)
        return self._backends[site]

    def actual(self, topology: Topology) -> dict[str, Running]:
        """replica -> what runs, over every site (a site whose engine cannot be reached is
        reported and left out)."""
        out: dict[str, Running] = {}
        for site in topology.sites:
            try:
                running = self.backend(topology, site).list()
            except Exception as exc:
                self.say(f"site {site}: its engine cannot be reached: {exc}")
                continue
            for r in running:
                out[r.replica] = r
        return out

    # desired -----------------------------------------------------------------------------

    def desired(self, topology: Topology, plan: Plan) -> dict[str, Replica]:
        return {
            a.replica: self._replica(
                topology, a.unit, a.replica, a.site, self.spec(topology, a.unit)
            )
            for a in plan.assignments
        }

    def _port(self, replica: str) -> int:
        port = self.control.ports.get(replica)
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.control.ports[replica] = port
        return port

    def _replica(
        self, topology: Topology, unit: str, replica: str, site: str, spec: UnitSpec
    ) -> Replica:
        folder = self.state / "replicas" / replica
        config, mounts = self._render(spec, unit, folder, self._port(replica))
        return Replica(
            topology=topology.name, unit=unit, replica=replica,
            index=int(replica.rsplit("-", 1)[1]), site=site, version=spec.version(),
            image=spec.image, config=config, port=self._port(replica),
            cpu=spec.resources.cpu, memory=spec.resources.memory, mounts=mounts,
        )  # fmt: skip

    def _render(
        self, spec: UnitSpec, unit: str, folder: Path, port: int
    ) -> tuple[Path, tuple[str, ...]]:
        """The unit file as this replica runs it: paths made absolute, its own HTTP port,
        state folder, outbox and sink; partitions for a unit that keeps state per object, a
        share group for the replicas of one that does not."""
        doc = yaml.safe_load(spec.config.read_text())
        if not isinstance(doc, dict):
            raise ControlError(f"{spec.config}: a unit config must be a mapping")
        base = spec.config.parent.absolute()
        doc["objects"] = [str((base / p).absolute()) for p in doc.get("objects", [])]
        doc["state_dir"] = str(folder / "state")
        http = dict(doc.get("http") or {})
        http["port"] = port
        doc["http"] = http
        if isinstance(doc.get("sink"), dict) and "sqlite" in doc["sink"]:
            doc["sink"] = {"sqlite": str(folder / Path(doc["sink"]["sqlite"]).name)}
        if isinstance(doc.get("outbox"), dict):
            doc["outbox"] = {**doc["outbox"], "path": str(folder / "outbox")}
        # credential files (a replica's {instance} secret, TLS files) stay where the unit file
        # names them, relative to it: absolute here, and mounted into a container
        credential_folders: set[str] = set()
        forward = doc.get("forward")
        command_mqtt = forward.get("command_mqtt") if isinstance(forward, dict) else None
        for settings in (doc.get("mqtt"), command_mqtt):
            if not isinstance(settings, dict):
                continue
            for key in ("password_file", "tls_ca", "tls_cert", "tls_key"):
                if isinstance(settings.get(key), str):
                    settings[key] = str((base / settings[key]).absolute())
                    credential_folders.add(str(Path(settings[key]).parent))
        if keyed(spec.config):  # state per object: partitions, at any count, so that
            doc.setdefault("partitions", {"count": DEFAULT_PARTITIONS})  # scaling keeps it
        elif spec.replicas > 1 and not doc.get("share_group"):
            doc["share_group"] = unit  # stateless: replicas share the device traffic
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"unit-{spec.version()}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        mounts = {str(folder), *doc["objects"], *credential_folders}
        return path, tuple(sorted(mounts))

    # plans -------------------------------------------------------------------------------

    def plan(
        self, topology: Topology, *, fresh: bool = False, excluded: set[str] | None = None
    ) -> Plan:
        same = self.control.topology == str(Path(topology.source).absolute())
        current = {} if fresh or not same else Plan.from_json(self.control.plan).where()
        evacuated = set(self.control.evacuated) if excluded is None else excluded
        return place(topology, current, excluded=evacuated)

    def steps(self, topology: Topology, plan: Plan) -> list[Step]:
        """What applying `plan` does to what runs now."""
        desired = self.desired(topology, plan)
        actual = self.actual(topology)
        out = []
        for name, r in actual.items():
            if name not in desired:
                out.append(Step("stop", name, r.site, "no longer in the topology"))
        for name, want in desired.items():
            have = actual.get(name)
            if have is None:
                out.append(Step("start", name, want.site, f"version {want.version}"))
            elif have.site != want.site:
                out.append(Step("move", name, want.site, f"version {want.version}", have.site))
            elif have.version != want.version:
                out.append(Step("update", name, want.site, f"{have.version} -> {want.version}"))
            elif have.state != "running":
                out.append(Step("start", name, want.site, f"it has {have.state}"))
        return out

    @_exclusive
    def apply(self, topology: Topology, plan: Plan, *, timeout: float = 60.0) -> bool:
        """Bring what runs to `plan`: strays stopped, replicas started and moved (stopped
        where they were first: one MQTT session each), new versions rolled one replica at a
        time. True when every replica ends up ready."""
        steps = self.steps(topology, plan)
        desired = self.desired(topology, plan)
        self.control.topology = str(Path(topology.source).absolute())
        self.control.plan = plan.to_json()
        self.control.stopped = False
        self._save()
        ok = True
        started: list[str] = []
        for step in steps:
            self.say(f"  {step}")
            if step.action == "stop":
                self.backend(topology, step.site).stop(step.replica)
            elif step.action == "move":
                assert step.source is not None
                self.backend(topology, step.source).stop(step.replica)
                self.backend(topology, step.site).start(desired[step.replica])
                started.append(step.replica)
            elif step.action == "start":
                self.backend(topology, step.site).start(desired[step.replica])
                started.append(step.replica)
        for unit in topology.order():
            replicas = [s.replica for s in steps if s.action == "update" and s.replica in
                        {a.replica for a in plan.of(unit)}]  # fmt: skip
            if replicas:
                spec = self.spec(topology, unit)
                ok = self._roll(topology, plan, unit, replicas, spec, timeout) and ok
        for name in started:
            if self.wait_ready(desired[name], timeout):
                self._released(desired[name])
            else:
                self.say(f"  {name} is not ready after {timeout:g} s: see `cloudlet logs`")
                ok = False
        self._save()
        return ok

    def wait_ready(self, replica: Replica, timeout: float, settle: float = 1.0) -> bool:
        """Ready (/readyz: connected and subscribed), then still running and healthy after
        `settle` seconds."""
        backend = self._backends.get(replica.site) or self.backend(self.topology(), replica.site)
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            running = {r.replica: r for r in backend.list()}.get(replica.replica)
            if running is None or running.state != "running":
                return False
            if healthy(replica.port, "/readyz"):
                self.sleep(settle)
                running = {r.replica: r for r in backend.list()}.get(replica.replica)
                return running is not None and running.state == "running" and healthy(replica.port)
            self.sleep(0.2)
        return False

    # patch -------------------------------------------------------------------------------

    @_exclusive
    def patch(
        self, unit: str, *, image: str | None = None, config: Path | None = None,
        timeout: float = 60.0,
    ) -> bool:  # fmt: skip
        """Roll a new image or config through the unit's replicas one at a time, each gated
        on readiness; the first that fails brings every replica back to the old version."""
        topology = self._with_unit(unit)
        if config is not None and not config.is_file():
            raise ControlError(f"no such config file: {config}")
        plan = Plan.from_json(self.control.plan)
        before = dict(self.control.patched.get(unit, {}))
        after = dict(before)
        if image is not None:
            after["image"] = image
        if config is not None:
            after["config"] = str(config.absolute())
        old, new = self.spec(topology, unit), self.spec(topology, unit, after)
        if new.version() == old.version():
            self.say(f"{unit}: already at version {old.version()}; nothing to do")
            return True
        self.say(f"{unit}: {old.version()} -> {new.version()}, one replica at a time")
        ok = self._roll(topology, plan, unit, [a.replica for a in plan.of(unit)], new, timeout)
        if ok:
            self.control.patched[unit] = after
            self._save()
        return ok

    def _roll(
        self, topology: Topology, plan: Plan, unit: str, replicas: list[str],
        spec: UnitSpec, timeout: float,
    ) -> bool:  # fmt: skip
        """Replace `replicas` of `unit` with `spec` one at a time; the first that is not ready
        brings every one replaced so far back to its last release."""
        where = plan.where()
        done: list[tuple[str, Replica | None]] = []  # updated so far, with their last release
        for name in replicas:
            new = self._replica(topology, unit, name, where[name], spec)
            backend = self.backend(topology, where[name])
            self.say(f"  update  {name:<24} {where[name]:<20} -> {new.version}")
            done.append((name, self.release(name)))
            backend.stop(name)
            backend.start(new)
            if self.wait_ready(new, timeout):
                self._released(new)
                continue
            self.say(f"  {name}: version {new.version} is not healthy; rolling back")
            for line in backend.logs(name, 5).splitlines():
                self.say(f"    | {line}")
            for back, release in reversed(done):
                b = self.backend(topology, where[back])
                b.stop(back)
                if release is None:
                    self.say(f"  rollback {back}: no earlier release to go back to; left stopped")
                    continue
                self.say(f"  rollback {back:<23} {where[back]:<20} -> {release.version}")
                b.start(release)
                if self.wait_ready(release, timeout):
                    self._released(release)
            return False
        return True

    def release(self, replica: str) -> Replica | None:
        """The last version of `replica` that became ready (what a rollback returns to)."""
        row = self.control.releases.get(replica)
        if row is None:
            return None
        return Replica(**{**row, "config": Path(row["config"]), "mounts": tuple(row["mounts"])})

    def _released(self, replica: Replica) -> None:
        self.control.releases[replica.replica] = {
            **replica.__dict__,
            "config": str(replica.config),
            "mounts": list(replica.mounts),
        }
        self._save()

    # reconcile ---------------------------------------------------------------------------

    @_exclusive
    def reconcile(self) -> list[Step]:
        """One pass: restart what exited or stopped answering, start what is missing, stop
        strays; restarts of one replica back off (1 s doubling to 60 s) until it stays
        healthy for 30 s."""
        if self.control.stopped or self.control.topology is None:
            return []
        topology = self.topology()
        plan = Plan.from_json(self.control.plan)
        desired = self.desired(topology, plan)
        actual = self.actual(topology)
        now = self.clock()
        done = []
        for name, running in actual.items():
            if name not in desired or running.site != desired[name].site:
                self.backend(topology, running.site).stop(name)
                done.append(Step("stop", name, running.site, "not in the placement"))
        for name, want in desired.items():
            have = actual.get(name)
            if have is not None and have.site == want.site and have.state == "running":
                if healthy(want.port):
                    since = self._since_healthy.setdefault(name, now)
                    if now - since >= 30:
                        self._failures.pop(name, None)
                    continue
                if time.time() - have.started < STARTING:
                    continue
                reason = "does not answer /healthz"
            else:
                reason = "is missing" if have is None or have.site != want.site else "has exited"
            self._since_healthy.pop(name, None)
            restarts, allowed = self._failures.get(name, (0, 0.0))
            if now < allowed:
                continue
            self.backend(topology, want.site).stop(name, timeout=10)
            self.backend(topology, want.site).start(want)
            self._failures[name] = (restarts + 1, now + min(60.0, 2.0**restarts))
            self.control.restarts[name] = self.control.restarts.get(name, 0) + 1
            done.append(Step("restart", name, want.site, f"it {reason} (restart {restarts + 1})"))
        self._save()
        return done

    def watch(self, interval: float, stop: Callable[[], bool]) -> None:
        while not stop():
            for step in self.reconcile():
                self.say(f"  {step}")
            self.sleep(interval)

    # status, shutdown, evacuate, rebalance -----------------------------------------------

    def status(self, sample: float = 0.0) -> tuple[Topology, list[ReplicaStatus]]:
        from cloudlet.demo import unit_metrics

        topology = self.topology()
        plan = Plan.from_json(self.control.plan)
        desired = self.desired(topology, plan) if not self.control.stopped else {}
        actual = self.actual(topology)
        rows = []
        for name in sorted(set(desired) | set(actual)):
            want, have = desired.get(name), actual.get(name)
            port = want.port if want else have.port  # type: ignore[union-attr]
            running = have is not None and have.state == "running"
            rows.append(ReplicaStatus(
                unit=(want or have).unit, replica=name, site=(want or have).site,  # type: ignore[union-attr]
                desired_version=want.version if want else None, running=have,
                healthy=running and healthy(port), ready=running and healthy(port, "/readyz"),
            ))  # fmt: skip
        if sample > 0:
            first = {r.replica: counters(unit_metrics, r) for r in rows}
            self.sleep(sample)
            for r in rows:
                now, before = counters(unit_metrics, r), first[r.replica]
                r.rates = {k: (now[k] - before.get(k, 0.0)) / sample for k in now}
        return topology, rows

    @_exclusive
    def shutdown(self, timeout: float = 30.0) -> list[str]:
        """Stop every replica (each drains, checkpoints and acknowledges); the reconcile loop
        leaves them stopped until the next deploy."""
        topology = self.topology()
        stopped = []
        self.control.stopped = True
        self._save()
        for name, have in self.actual(topology).items():
            self.say(f"  stop    {name:<24} {have.site}")
            self.backend(topology, have.site).stop(name, timeout)
            stopped.append(name)
        return stopped

    @_exclusive
    def evacuate(self, site: str, *, dry_run: bool = False, timeout: float = 60.0) -> bool:
        topology = self.topology()
        if site not in topology.sites:
            raise ControlError(
                f"no site {site!r} in {topology.source} ({', '.join(topology.sites)})"
            )
        excluded = set(self.control.evacuated) | {site}
        plan = self.plan(topology, excluded=excluded)
        return self._rearrange(f"evacuating {site}", topology, plan, excluded, dry_run, timeout)

    @_exclusive
    def rebalance(self, *, keep_evacuated: bool = False, dry_run: bool = False,
                  timeout: float = 60.0) -> bool:  # fmt: skip
        """Place every replica afresh (evacuated sites welcome again unless kept out)."""
        topology = self.topology()
        excluded = set(self.control.evacuated) if keep_evacuated else set()
        plan = self.plan(topology, fresh=True, excluded=excluded)
        return self._rearrange("rebalancing", topology, plan, excluded, dry_run, timeout)

    def _rearrange(
        self, what: str, topology: Topology, plan: Plan, excluded: set[str], dry_run: bool,
        timeout: float,
    ) -> bool:  # fmt: skip
        """Print the moves, then (unless a dry run) make them."""
        steps = self.steps(topology, plan)
        self.say(f"{what}:" if steps else f"{what}: every replica is where it should be")
        for step in steps:
            self.say(f"  {step}")
        if dry_run:
            return True
        self.control.evacuated = sorted(excluded)
        self.say("applying:")
        return self.apply(topology, plan, timeout=timeout)

    def logs(self, unit: str, tail: int = 100) -> dict[str, str]:
        topology = self._with_unit(unit)
        return {
            name: self.backend(topology, r.site).logs(name, tail)
            for name, r in sorted(self.actual(topology).items())
            if r.unit == unit
        }
