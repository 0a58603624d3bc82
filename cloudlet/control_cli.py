"""`cloudlet plan|deploy|status|patch|shutdown|logs|evacuate|rebalance|reconcile|export`:
the control plane's commands (cloudlet/control.py does the work)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

STATE_ENV = "CLOUDLET_STATE"
StateOption = Annotated[
    Path,
    typer.Option("--state", envvar=STATE_ENV,
                 help="The control plane's folder (placement, replica state, local logs)."),
]  # fmt: skip
TimeoutOption = Annotated[
    float, typer.Option(help="Seconds a replica has to become ready before it counts as failed.")
]


@contextmanager
def _errors() -> Iterator[None]:
    from cloudlet.control_model import ControlError
    from cloudlet.placement import PlacementError
    from cloudlet.topology import TopologyError

    try:
        yield
    except TopologyError as exc:
        for problem in exc.problems:
            err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (ControlError, PlacementError) as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def _controller(state: Path) -> Any:
    from cloudlet.control import Controller

    return Controller(state, say=lambda line: out.print(line, soft_wrap=True))


def _print_plan(topology: Any, plan: Any) -> None:
    from cloudlet.topology import partitioning

    table = Table("replica", "site", "why", title=f"placement of {topology.name}")
    for a in plan.assignments:
        table.add_row(a.replica, a.site, a.why)
    out.print(table)
    for spec in topology.units.values():
        said = partitioning(spec.config, spec.replicas)
        if said:
            out.print(said, highlight=False)


def _planned(state: Path, topology_path: Path) -> tuple[Any, Any, Any]:
    from cloudlet.topology import Topology

    control = _controller(state)
    topology = Topology.load(topology_path)
    placed = control.plan(topology)
    _print_plan(topology, placed)
    return control, topology, placed


def plan(
    topology_path: Annotated[Path, typer.Argument(metavar="TOPOLOGY")],
    state: StateOption = Path(".cloudlet"),
) -> None:
    """Compute and print a placement (replica -> site, and why), touching nothing."""

    with _errors():
        control, topology, placed = _planned(state, topology_path)
        if control.control.topology is not None:
            steps = control.steps(topology, placed)
            out.print("to get there:" if steps else "nothing to change")
            for step in steps:
                out.print(f"  {step}")


def deploy(
    topology_path: Annotated[Path, typer.Argument(metavar="TOPOLOGY")],
    state: StateOption = Path(".cloudlet"),
    timeout: TimeoutOption = 60.0,
    watch: Annotated[bool, typer.Option(help="Then keep reconciling until Ctrl-C.")] = False,
) -> None:
    """Place and start every replica; replicas of a changed unit are replaced one at a time."""

    with _errors():
        control, topology, placed = _planned(state, topology_path)
        ok = control.apply(topology, placed, timeout=timeout)
        out.print("deployed: every replica is ready" if ok else "[red]deployed with failures[/]")
        if watch:
            _reconcile_until_signal(control, 2.0)
        if not ok:
            raise typer.Exit(1)


def status(
    state: StateOption = Path(".cloudlet"),
    sample: Annotated[
        float, typer.Option(help="Seconds over which update rates are measured.")
    ] = 1.0,
) -> None:
    """Every site and replica: desired vs actual version, state, health, update rates."""
    from cloudlet.topology import show_memory

    with _errors():
        control = _controller(state)
        topology, rows = control.status(sample=sample)
        sites = Table("site", "engine", "arch", "location", "replicas", "allocated", title="sites")
        for name, site in topology.sites.items():
            here = [r for r in rows if r.site == name and r.desired_version]
            spec = [control.spec(topology, r.unit) for r in here]
            engine = site.engine if isinstance(site.engine, str) else site.engine.docker
            where = f"{site.location.lat:.4f},{site.location.lon:.4f}" if site.location else "-"
            running = sum(1 for r in here if r.state == "ready")
            evacuated = " (evacuated)" if name in control.control.evacuated else ""
            sites.add_row(
                name + evacuated, engine, site.arch, where, f"{running}/{len(here)} ready",
                f"{sum(s.resources.cpu for s in spec):g}/{site.capacity.cpu:g} CPU,"
                f" {show_memory(sum(s.resources.memory for s in spec))}"
                f"/{show_memory(site.capacity.memory)}",
            )  # fmt: skip
        out.print(sites)
        table = Table("site", "state", "version", "restarts", "msg/s", "upd/s", "derived/s",
                      title="replicas")  # fmt: skip
        table.columns.insert(0, Column("replica", no_wrap=True, min_width=12))
        for r in sorted(rows, key=lambda r: (r.site, r.replica)):
            version = (r.desired_version or "-")[:8]
            if r.running is not None and r.running.version != r.desired_version:
                version += f" (runs {r.running.version[:8]})"
            colour = {"ready": "green", "starting": "yellow"}.get(r.state, "red")
            table.add_row(
                r.replica, r.site, f"[{colour}]{r.state}[/]", version,
                str(control.control.restarts.get(r.replica, 0)
                    + (r.running.restarts if r.running else 0)),
                *(f"{r.rates[k]:,.1f}" if k in r.rates else "-"
                  for k in ("messages", "updates", "derived")),
            )  # fmt: skip
        out.print(table)
        if control.control.stopped:
            out.print("shut down: `cloudlet deploy` starts it again")


def patch(
    unit: Annotated[str, typer.Argument(help="The unit to roll.")],
    image: Annotated[str | None, typer.Option(help="A new image (docker sites).")] = None,
    config: Annotated[Path | None, typer.Option(help="A new unit config file.")] = None,
    state: StateOption = Path(".cloudlet"),
    timeout: TimeoutOption = 60.0,
) -> None:
    """Roll a new image or config through UNIT's replicas one at a time, each gated on
    readiness; an unhealthy new version is rolled back on every replica it reached."""
    if image is None and config is None:
        err.print("[bold red]error:[/] say what changes: --image IMAGE and/or --config FILE")
        raise typer.Exit(2)
    with _errors():
        ok = _controller(state).patch(unit, image=image, config=config, timeout=timeout)
    out.print(f"{unit}: patched" if ok else f"[red]{unit}: patch failed and was rolled back[/]")
    if not ok:
        raise typer.Exit(1)


def shutdown(
    state: StateOption = Path(".cloudlet"),
    timeout: Annotated[float, typer.Option(help="Seconds each replica has to drain.")] = 30.0,
) -> None:
    """Stop every replica cleanly (each drains, snapshots its state and acknowledges)."""
    with _errors():
        stopped = _controller(state).shutdown(timeout)
    out.print(f"stopped {len(stopped)} replicas")


def logs(
    unit: Annotated[str, typer.Argument()],
    tail: Annotated[int, typer.Option(help="Lines per replica.")] = 50,
    state: StateOption = Path(".cloudlet"),
) -> None:
    """The last lines each of UNIT's replicas logged."""
    with _errors():
        found = _controller(state).logs(unit, tail)
    if not found:
        out.print(f"{unit}: no replica is running")
    for replica, text in found.items():
        out.print(f"[bold]== {replica} ==[/]")
        out.print(text, markup=False, highlight=False, soft_wrap=True)


def evacuate(
    site: Annotated[str, typer.Argument()],
    state: StateOption = Path(".cloudlet"),
    dry_run: Annotated[bool, typer.Option(help="Print the moves only.")] = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Move every replica off SITE (printed first), and keep the site empty until a rebalance."""
    with _errors():
        ok = _controller(state).evacuate(site, dry_run=dry_run, timeout=timeout)
    if not ok:
        raise typer.Exit(1)


def rebalance(
    state: StateOption = Path(".cloudlet"),
    keep_evacuated: Annotated[bool, typer.Option(help="Leave evacuated sites empty.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the moves only.")] = False,
    timeout: TimeoutOption = 60.0,
) -> None:
    """Place every replica afresh and move those that should be elsewhere (printed first)."""
    with _errors():
        ok = _controller(state).rebalance(
            keep_evacuated=keep_evacuated, dry_run=dry_run, timeout=timeout
        )
    if not ok:
        raise typer.Exit(1)


def reconcile(
    state: StateOption = Path(".cloudlet"),
    interval: Annotated[float, typer.Option(help="Seconds between passes.")] = 2.0,
    once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False,
) -> None:
    """Heal: restart replicas that exited or stopped answering (with backoff), start missing
    ones, stop strays; until Ctrl-C or SIGTERM."""
    with _errors():
        control = _controller(state)
        if once:
            for step in control.reconcile():
                out.print(f"  {step}")
            return
        _reconcile_until_signal(control, interval)


def _reconcile_until_signal(control: Any, interval: float) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    out.print(f"reconciling every {interval:g} s; Ctrl-C stops (the replicas keep running)")
    control.sleep = stop.wait
    control.watch(interval, stop.is_set)


export_app = typer.Typer(
    help="Files for sites run by docker-compose or Kubernetes, from a topology's placement.",
    no_args_is_help=True,
)


@export_app.command("compose")
def export_compose(
    topology_path: Annotated[Path, typer.Argument(metavar="TOPOLOGY")],
    output: Annotated[Path, typer.Option("--output", "-o", help="A folder per site goes here.")],
    state: StateOption = Path(".cloudlet"),
) -> None:
    """A docker-compose.yaml per site (one service per replica placed there)."""
    from cloudlet.export import compose
    from cloudlet.topology import Topology

    with _errors():
        topology = Topology.load(topology_path)
        placed = _controller(state).plan(topology)
        for site in topology.sites:
            if placed.on(site):
                out.print(f"{site}: {compose(topology, placed, site, output / site)}")


@export_app.command("k8s")
def export_k8s(
    topology_path: Annotated[Path, typer.Argument(metavar="TOPOLOGY")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="A file (default: stdout).")
    ] = None,
    state: StateOption = Path(".cloudlet"),
    mqtt_url: Annotated[
        str, typer.Option(help="The broker as the pods reach it (a Service in the cluster).")
    ] = "mqtt://mosquitto:1883",
    registry: Annotated[
        str | None, typer.Option(help="Pull the images from this registry (host[/path]).")
    ] = None,
    storage: Annotated[str, typer.Option(help="Each replica's volume (state, outbox).")] = "1Gi",
) -> None:
    """Kubernetes manifests: a ConfigMap per unit; per unit and site a headless Service and a
    StatefulSet on the site's nodes (labelled cloudlet.io/site=SITE), a volume per replica,
    each pod's name its replica id; its MQTT secret from the Secret `UNIT-mqtt` (a key per
    pod name)."""
    from cloudlet.export import dump_all, kubernetes
    from cloudlet.topology import Topology

    with _errors():
        topology = Topology.load(topology_path)
        placed = _controller(state).plan(topology)
        text = dump_all(kubernetes(topology, placed, mqtt_url=mqtt_url, registry=registry,
                                   storage=storage))  # fmt: skip
    if output is None:
        out.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        output.write_text(text)
        out.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    commands: list[tuple[str, Callable[..., None]]] = [
        ("plan", plan), ("deploy", deploy), ("status", status), ("patch", patch),
        ("shutdown", shutdown), ("logs", logs), ("evacuate", evacuate),
        ("rebalance", rebalance), ("reconcile", reconcile),
    ]  # fmt: skip
    for name, command in commands:
        app.command(name)(command)
    app.add_typer(export_app, name="export")
