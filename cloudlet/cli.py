"""The `cloudlet` command line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cloudlet.access_cli import register as register_access
from cloudlet.control_cli import register as register_control
from cloudlet.processor_cli import processor_app
from cloudlet.rig import Kafka, Mosquitto, RigError, ensure_kafka, ensure_mosquitto
from edge_objects.faults import FAULT_KINDS
from streams import Problem, ServiceObject, TopicScheme
from streams.catalog import Catalog
from streams.mqtt import MqttSettings

app = typer.Typer(
    help="cloudlet: IoT edge data streams, from devices through the cloudlet to the cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
so_app = typer.Typer(
    help="Service objects: validate and inspect descriptors.", no_args_is_help=True
)
rig_app = typer.Typer(
    help="Real Mosquitto and Kafka on loopback ports, for development and tests.",
    no_args_is_help=True,
)
unit_app = typer.Typer(help="Processing units: run one from its config.", no_args_is_help=True)
flow_app = typer.Typer(
    help="Flows: try composite streams and windows offline.", no_args_is_help=True
)
app.add_typer(so_app, name="so")
app.add_typer(rig_app, name="rig")
app.add_typer(flow_app, name="flow")
app.add_typer(unit_app, name="unit")
app.add_typer(processor_app, name="processor")
cloud_app = typer.Typer(help="Cloud objects: materialise them from Kafka, serve the API.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(cloud_app, name="cloud")
register_control(app)
register_access(app)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

OBJECTS_ENV = "CLOUDLET_OBJECTS"


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(1)


def _device_secrets(path: Path) -> dict[str, str]:
    """id -> secret, from {"id": "secret"} or {"id": {"secret": ...}} (device sync's file)."""
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise _fail(f"cannot read the credentials in {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise _fail(f"{path} must hold a JSON object: device id -> secret")
    out: dict[str, str] = {}
    for so, value in doc.items():
        secret = value.get("secret") if isinstance(value, dict) else value
        if not isinstance(secret, str) or not secret:
            raise _fail(f"{path}: no secret for {so!r}")
        out[so] = secret
    return out


def _default_objects() -> list[Path]:
    configured = os.environ.get(OBJECTS_ENV)
    return [Path(configured)] if configured else [Path("objects")]


# so ------------------------------------------------------------------------------------------


@so_app.command("validate")
def so_validate(
    paths: Annotated[
        list[Path], typer.Argument(help="Descriptor files or directories (searched recursively).")
    ],
) -> None:
    """Check descriptors, their cross-references and expressions; every problem is listed."""
    catalog, problems = Catalog.check(paths)
    registry = catalog.registry
    for problem in problems:
        err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)
    if problems:
        bad = len({(p.source, p.object_id) for p in problems})
        err.print(f"{len(problems)} problem(s) in {bad} descriptor(s)", soft_wrap=True)
        raise typer.Exit(1)
    streams = [s for so in registry.objects.values() for s in so.streams.values()]
    derived = sum(s.derived for s in streams)
    groups = sum(len(so.groups) for so in registry.objects.values())
    flows = f", {len(catalog.flows)} flow(s)" if catalog.flows else ""
    by_flows = f", {len(registry.produced)} by flows" if registry.produced else ""
    out.print(
        f"ok: {len(registry)} service object(s), {len(streams)} stream(s)"
        f" ({derived} derived{by_flows}), {groups} group(s){flows}"
    )


@so_app.command("show")
def so_show(
    so_id: Annotated[str, typer.Argument(metavar="ID", help="Service object id.")],
    objects: Annotated[
        list[Path] | None,
        typer.Option(
            "--objects",
            "-o",
            help=f"Descriptor files or directories (default: ${OBJECTS_ENV} or ./objects).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print ServIoTicy JSON.")] = False,
) -> None:
    """Show one service object: streams, channels, derivations, groups and actions."""
    paths = objects or _default_objects()
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise _fail(f"{missing[0]} does not exist (pass --objects DIR or set ${OBJECTS_ENV})")
    catalog, problems = Catalog.check(paths)
    registry = catalog.registry  # with the streams flows add
    if so_id not in registry:
        own: list[Problem] = [p for p in problems if p.object_id == so_id]
        if own:
            raise _fail(f"{so_id!r} has problems; first: {own[0]}")
        known = ", ".join(sorted(registry.objects)[:10]) or "none"
        raise _fail(f"no service object {so_id!r} in {', '.join(map(str, paths))} (known: {known})")
    so = registry.get(so_id)
    if as_json:
        sys.stdout.write(orjson.dumps(so.to_servioticy(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
        return
    produced_by = {
        flow.into_stream: flow.name
        for flow in catalog.flows
        if (so_id, flow.into_stream) in registry.produced
    }
    _print_object(so, registry.sources[so_id], produced_by)


def _print_object(so: ServiceObject, source: str, produced_by: dict[str, str]) -> None:
    out.print(f"[bold]{so.id}[/]  {so.name or ''}")
    if so.description:
        out.print(f"  {so.description}")
    out.print(f"  source: {source}   version: {so.version}   public: {str(so.public).lower()}")
    table = Table(box=None, pad_edge=False)
    for column in ("stream", "channel", "type", "unit"):
        table.add_column(column, no_wrap=True)
    table.add_column("derived as", overflow="fold")
    for stream_id, stream in so.streams.items():
        flow = produced_by.get(stream_id)
        for i, (name, channel) in enumerate(stream.channels.items()):
            table.add_row(
                stream_id if i == 0 else "",
                name,
                channel.type.value,
                channel.unit or "",
                channel.current_value or (f"by flow {flow}" if flow else ""),
            )
        for label, text in (("pre-filter", stream.pre_filter), ("post-filter", stream.post_filter)):
            if text:
                table.add_row("", f"({label})", "", "", text)
    out.print(table)
    for group_id, group in so.groups.items():
        out.print(
            f"  group {group_id}: stream {group.stream!r} of {', '.join(group.so_ids)}",
            soft_wrap=True,
        )
    for action in so.actions:
        out.print(f"  action {action.name}: {action.description or ''}")


# flow ----------------------------------------------------------------------------------------


@flow_app.command("test")
def flow_test(
    objects: Annotated[
        list[Path] | None, typer.Argument(help="Descriptor and flow files or directories.")
    ] = None,
    input_path: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help='JSON lines: {"so": ..., "stream": ..., "update": ...}; - for stdin',
        ),
    ] = Path("-"),
    unit: Annotated[
        Path | None,
        typer.Option(help="A unit config: its objects, flows and processors (plug-ins)."),
    ] = None,
    flush: Annotated[
        bool, typer.Option(help="Close the windows still open at the end of the input.")
    ] = True,
) -> None:
    """Run composite streams, flows and processors offline; print what they produce, one JSON
    object per line."""
    from streams.flows.offline import run_offline

    if unit is not None:
        from processors.chain import build_chain
        from processors.config import ConfigError, UnitConfig

        try:
            config = UnitConfig.load(unit)
        except ConfigError as exc:
            _print_problems(exc.problems)
            raise typer.Exit(1) from None
        objects = [*config.objects, *(objects or [])]
    if not objects:
        raise _fail("name descriptor and flow files, or a unit config with --unit")
    catalog, problems = Catalog.check(objects)
    stage = registry = None
    if unit is not None and not problems:
        chain, registry, problems = build_chain(catalog.registry, config.processors, str(unit))
        stage = chain.as_stage()
    _print_problems(problems)
    if problems:
        raise typer.Exit(1)
    try:
        source = sys.stdin.buffer if str(input_path) == "-" else input_path.open("rb")
    except OSError as exc:
        raise _fail(f"cannot read {input_path}: {exc.strerror}") from None
    with source:
        for record in run_offline(catalog, source, flush=flush, stage=stage, registry=registry):
            sys.stdout.buffer.write(orjson.dumps(record) + b"\n")


def _stop_on_signals(interrupt: bool = True) -> threading.Event:
    """An event set by SIGTERM (and SIGINT, Ctrl-C): a service's cue to stop cleanly."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if interrupt:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _wait(stop: threading.Event, alive: Callable[[], bool] = lambda: True, what: str = "") -> None:
    """Until SIGTERM or Ctrl-C; exits non-zero (for a supervisor to restart us) as soon as a
    background thread has died."""
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run
        if not alive():
            raise _fail(f"{what}: a background thread stopped; see the log above")


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)


# act -----------------------------------------------------------------------------------------


def _parameter(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise _fail(f"--param {text!r} must look like name=value")
    try:
        return name, orjson.loads(raw)  # numbers, booleans, JSON strings and objects
    except orjson.JSONDecodeError:
        return name, raw  # a bare word is a string


@app.command("act")
def act(
    so_id: Annotated[str, typer.Argument(metavar="SO", help="Service object to command.")],
    action: Annotated[str, typer.Argument(help="One of its declared actions.")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="name=value (repeatable).")
    ] = None,
    objects: Annotated[
        list[Path] | None,
        typer.Option("--objects", "-o", help="Descriptors (to check the action)."),
    ] = None,
    mqtt_url: Annotated[str, typer.Option("--mqtt", help="Broker URL.")] = "mqtt://127.0.0.1:1883",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the device's report.")] = 30.0,
) -> None:
    """Send a command to a device and follow its status: submitted, accepted, done or failed."""
    import queue as queue_module

    from streams.actuation import ActuationError, ActuationStatus, StatusReport, checked
    from streams.mqtt import MqttSettings, connect, make_client, refused, refused_because

    paths = objects or _default_objects()
    catalog, _ = Catalog.check(paths)  # problems elsewhere need not stop a command
    if so_id not in catalog.registry:
        raise _fail(f"no service object {so_id!r} in {', '.join(map(str, paths))}")
    parameters = dict(_parameter(p) for p in param or [])
    try:
        command = checked(
            catalog.registry.get(so_id), action, parameters, at=int(time.time() * 1000)
        )
    except ActuationError as exc:
        raise _fail(str(exc)) from None
    try:
        settings = MqttSettings(url=mqtt_url)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    topics = TopicScheme()
    reports: queue_module.SimpleQueue[StatusReport] = queue_module.SimpleQueue()
    subscribed = threading.Event()
    refusal: list[str] = []
    client_id = settings.username or f"cloudlet-act-{command.id[:8]}"
    client = make_client(settings, client_id)

    def on_connect(c: Any, _u: object, _f: object, reason: object, _p: object) -> None:
        if refused(reason):
            refusal.append(refused_because(reason, settings, client_id))
            subscribed.set()
            return
        c.subscribe(topics.action_status(so_id, command.id), qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda _c, _u, m: reports.put(StatusReport.from_json(bytes(m.payload)))
    connect(client, settings, persistent=False)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise _fail(f"cannot reach the broker at {settings.url}")
        if refusal:
            raise _fail(refusal[0])
        info = client.publish(topics.actions(so_id), command.to_json(), qos=1)
        info.wait_for_publish(10)
        out.print(f"{command.id} {so_id} {action} {parameters}: submitted")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                report = reports.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_module.Empty:
                break
            note = f" ({report.message})" if report.message else ""
            out.print(f"{command.id} {report.status.value}{note}")
            if report.status.final:
                if report.status is ActuationStatus.FAILED:
                    raise typer.Exit(1)
                return
        raise _fail(f"no final status from {so_id} within {wait:g} s")
    finally:
        client.loop_stop()
        client.disconnect()


# unit ----------------------------------------------------------------------------------------


class _JsonLogFormatter(logging.Formatter):
    """One JSON object per line: what log collectors (Loki, Elastic, journald) ingest."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


@unit_app.command("run")
def unit_run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The unit's YAML config.")],
    replica: Annotated[
        str | None,
        typer.Option(help="Replica id: its own MQTT session and state (with share_group)."),
    ] = None,
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
) -> None:
    """Run a processing unit until SIGTERM or Ctrl-C, then drain, checkpoint and stop."""
    from cloudlet.units import CloudletUnit, UnitFile
    from processors.config import ConfigError
    from streams.registry import RegistryError

    _configure_logging(log_format)
    try:
        config = UnitFile.load(config_path)
        running = CloudletUnit(config, replica=replica)
        unit = running.unit
    except (ConfigError, RegistryError) as exc:
        _print_problems(exc.problems)
        raise typer.Exit(1) from None
    stop = _stop_on_signals()
    running.start()
    if unit.status is not None:
        out.print(f"metrics on http://{config.http.host}:{unit.status.port}/metrics")  # type: ignore[union-attr]
    while not stop.wait(0.5):
        if not unit.alive:
            dead = ", ".join(unit.dead_threads())
            running.stop()
            raise _fail(f"unit {unit.instance}: its {dead} stopped; see the log above")
    running.stop()


@app.command("simulate")
def simulate(
    scenario: Annotated[str, typer.Argument(help="irrigation or smart-city")],
    devices: Annotated[
        int | None, typer.Option(help="Scale the scenario to about this many devices.")
    ] = None,
    objects_dir: Annotated[
        Path | None,
        typer.Option("--objects-dir", help="Where a scaled scenario's descriptors are written."),
    ] = None,
    mqtt_url: Annotated[str, typer.Option("--mqtt", help="Broker URL.")] = "mqtt://127.0.0.1:1883",
    rate: Annotated[float, typer.Option(help="Steps per second (each device reports).")] = 1.0,
    speed: Annotated[float, typer.Option(help="Simulated seconds per real second.")] = 60.0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed, the same run.")] = 1,
    faults: Annotated[float, typer.Option(help="Chance that a reading is faulty, 0..1.")] = 0.0,
    fault_kind: Annotated[
        list[str] | None,
        typer.Option("--fault", help="Only these faults (repeatable): " + ", ".join(FAULT_KINDS)),
    ] = None,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    start: Annotated[
        str | None,
        typer.Option(
            help="Simulated start, ISO 8601 (default: yesterday 06:00 UTC); the"
            " simulated clock never passes the real one."
        ),
    ] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="Each device logs in as itself: a JSON file of id -> secret (cloudlet site"
            " init's devices.json, or cloudlet device sync --secret-file)."
        ),
    ] = None,
) -> None:
    """Simulated devices of a scenario publishing over MQTT, with faults on demand."""
    from datetime import UTC, datetime, timedelta

    from cloudlet.demo import scenario_dir
    from edge_objects.simulator import SCENARIOS, Simulator, load, scale

    if scenario not in SCENARIOS:
        raise _fail(f"unknown scenario {scenario!r} (available: {', '.join(SCENARIOS)})")
    if not 0.0 <= faults <= 1.0 or rate <= 0 or speed <= 0:
        raise _fail("--faults must be within 0..1, --rate and --speed positive")
    home = scenario_dir(scenario)
    objects = home / "objects"
    if devices is not None:
        try:
            objects = scale(
                scenario, home, devices, objects_dir or Path(f"cloudlet-{scenario}-{devices}")
            )
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot write the scaled scenario: {exc}") from None
        out.print(f"descriptors for {devices} devices in {objects} (give them to the unit)")
    try:
        begin = datetime.fromisoformat(start) if start else (
            datetime.now(UTC) - timedelta(days=1)).replace(
            hour=6, minute=0, second=0, microsecond=0)  # fmt: skip
    except ValueError:
        raise _fail(f"--start {start!r} is not an ISO 8601 time") from None
    if begin.tzinfo is None:
        begin = begin.replace(tzinfo=UTC)
    secrets = _device_secrets(credentials) if credentials is not None else None
    try:
        settings = MqttSettings(url=mqtt_url)
        simulation = load(scenario, objects, seed=seed, start_ms=int(begin.timestamp() * 1000))
        simulator = Simulator(
            simulation, settings, faults=faults, fault_kinds=fault_kind,
            seed=seed, client_id=f"cloudlet-simulate-{os.getpid()}", credentials=secrets,
        )  # fmt: skip
    except ValueError as exc:
        raise _fail(str(exc)) from None
    mqtt_url = settings.url  # what is printed from here on carries no secret
    stop = _stop_on_signals()
    try:
        simulator.start()
    except RuntimeError as exc:
        simulator.stop()
        raise _fail(f"{exc} at {mqtt_url}") from None
    out.print(f"{len(simulation.model.device_ids)} devices publishing to {mqtt_url}")
    try:
        simulator.run(rate=rate, speed=speed, duration=duration, steps=steps,
                      should_stop=stop.is_set)  # fmt: skip
        flushed = simulator.finish()
    finally:
        simulator.stop()
    summary = simulator.summary()
    summary["delivered"] = flushed
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    if not flushed:
        raise _fail("the broker did not acknowledge everything sent")


@cloud_app.command("serve")
def cloud_serve(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The cloud's YAML.")],
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
) -> None:
    """Consume the cloudlets' records from Kafka into the store, and serve the REST API."""
    import yaml
    from pydantic import ValidationError

    from cloud_sync.cloud import CloudService, CloudSettings
    from streams.registry import validation_problems

    _configure_logging(log_format)
    try:
        service = CloudService(CloudSettings.load(config_path))
    except (OSError, yaml.YAMLError) as exc:
        raise _fail(f"{config_path}: cannot be read: {exc}") from None
    except ValidationError as exc:
        _print_problems(validation_problems(exc, str(config_path)))
        raise typer.Exit(1) from None
    except ValueError as exc:
        raise _fail(f"{config_path}: {exc}") from None
    stop = _stop_on_signals()
    service.start()
    out.print(f"cloud objects on {service.url} (OpenAPI: {service.url}/docs)")
    try:
        _wait(stop, lambda: service.alive, "cloud service")
    finally:
        service.stop()


@app.command("gateway")
def gateway_run(
    config_path: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="The gateway's YAML config.")
    ],
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
) -> None:
    """Run the HTTP ingest gateway: PUT /{soId}/streams/{streamId} onto the broker."""
    from edge_objects.gateway import Gateway, GatewayConfigError, GatewaySettings
    from streams.registry import RegistryError

    _configure_logging(log_format)
    try:
        gateway = Gateway(GatewaySettings.load(config_path))
    except (GatewayConfigError, RegistryError) as exc:
        _print_problems(exc.problems)
        raise typer.Exit(1) from None
    except ValueError as exc:  # a token_env that is not set
        raise _fail(f"{config_path}: {exc}") from None
    stop = _stop_on_signals()
    gateway.start()
    out.print(f"gateway on {gateway.url} (OpenAPI: {gateway.url}/docs)")
    _wait(stop)
    gateway.stop()


# demo ----------------------------------------------------------------------------------------


@app.command("demo")
def demo(
    scenario: Annotated[
        str, typer.Argument(help="Scenario to run: irrigation or smart-city.")
    ] = "irrigation",
    mqtt_url: Annotated[
        str | None,
        typer.Option("--mqtt", help="Use this broker (mqtt://host:port) instead of starting one."),
    ] = None,
    kafka: Annotated[
        str | None,
        typer.Option(help="Forward through this Kafka (host:port) instead of directly."),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
    rate: Annotated[float, typer.Option(help="Simulation steps per second.")] = 2.0,
    speed: Annotated[
        float | None,
        typer.Option(help="Simulated seconds per real second (irrigation 600, smart city 120)."),
    ] = None,
    faults: Annotated[float, typer.Option(help="Chance that a reading is faulty.")] = 0.02,
    fault_kind: Annotated[
        list[str] | None,
        typer.Option("--fault", help="Only these faults (repeatable): " + ", ".join(FAULT_KINDS)),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the simulation.")] = 1,
    steps: Annotated[
        int | None, typer.Option(help="Stop after this many simulation steps.")
    ] = None,
    port: Annotated[int, typer.Option(help="The dashboard's port (0: a free one).")] = 8000,
    summary_path: Annotated[
        Path | None, typer.Option("--summary", help="Also write the summary as JSON here.")
    ] = None,
) -> None:
    """Run simulated devices through a real broker, the cloudlet and the cloud; watch it live
    in the terminal and on the dashboard."""
    from rich.live import Live

    from cloudlet.demo import Demo, DemoSettings
    from cloudlet.demo_view import live_view, summary_view

    if speed is None:
        speed = 120.0 if scenario == "smart-city" else 600.0
    settings = DemoSettings(scenario, mqtt_url, duration, rate, speed, faults, seed, steps,
                            kafka, port, fault_kinds=fault_kind)  # fmt: skip
    runner: Demo | None = None
    try:
        with err.status("starting") as status:
            runner = Demo(settings, progress=lambda text: status.update(text))
            runner.start()
    except (ValueError, RuntimeError, RigError, OSError) as exc:
        if runner is not None:
            runner.stop()
        raise _fail(str(exc)) from None
    assert runner.cloud is not None
    out.print(f"dashboard: {runner.cloud.url}/   (work directory: {runner.workdir})")
    stop = _stop_on_signals(interrupt=False)  # Ctrl-C interrupts the live view instead
    try:
        if out.is_terminal:
            out.print("Ctrl-C stops the demo and prints a summary")
            with Live(live_view(runner), console=out, refresh_per_second=4) as live:
                runner.run(stop.is_set, lambda: live.update(live_view(runner)))
        else:
            runner.run(stop.is_set, lambda: None)
    except KeyboardInterrupt:
        pass
    try:
        with err.status("draining: waiting for the last updates to reach the cloud"):
            runner.drain()
        summary = runner.summary()
    finally:
        runner.stop()
    out.print(summary_view(summary))
    if summary_path is not None:
        summary_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if not summary["lossless"]:
        raise typer.Exit(1)


# rig -----------------------------------------------------------------------------------------


@rig_app.command("install")
def rig_install() -> None:
    """Install Mosquitto, PostgreSQL, Chromium, docker-compose, dockerd and debootstrap (Debian
    packages) and resolve Kafka's jars (Maven Central)."""
    from cloudlet.rig import ensure_postgres
    from cloudlet.rig.apt import compose_command
    from cloudlet.rig.browser import ensure_chromium
    from cloudlet.rig.docker import ensure_docker

    try:
        out.print(f"mosquitto: {ensure_mosquitto()}")
        out.print(f"postgresql: {ensure_postgres()}")
        out.print(f"chromium (the dashboard's tests): {ensure_chromium()}")
        out.print(f"compose (validates compose/): {' '.join(compose_command())}")
        out.print(f"dockerd (the control plane's docker backend): {ensure_docker()}")
        out.print(f"kafka jars: {ensure_kafka()}")
    except RigError as exc:
        raise _fail(str(exc)) from None


def _serve(service: Mosquitto | Kafka, address: str) -> None:
    out.print(f"{service.name} on {address} (work directory {service.workdir}); Ctrl-C stops it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while service.running:
            time.sleep(0.5)
        raise _fail(f"{service.name} exited; see {service.log_path}")
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()


@rig_app.command("mosquitto")
def rig_mosquitto(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 1883,
    tls: Annotated[
        bool, typer.Option(help="A TLS listener, with a private CA made for this run.")
    ] = False,
    client_certs: Annotated[
        bool,
        typer.Option(help="With --tls: require a client certificate from the rig's CA; its CN"
                          " is the identity."),
    ] = False,
    user: Annotated[
        list[str] | None,
        typer.Option(help="NAME:PASSWORD (repeatable): a full-access account, for tests."),
    ] = None,
    allow_anonymous_insecure: Annotated[
        bool,
        typer.Option("--allow-anonymous-insecure",
                     help="No identities, no ACL: anyone may do anything. Experiments only."),
    ] = False,
) -> None:  # fmt: skip
    """Run a real Mosquitto in the foreground: identities and ACLs on (deny by default)
    unless --allow-anonymous-insecure."""
    users = {}
    for entry in user or []:
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise _fail(f"--user {entry!r} must look like NAME:PASSWORD")
        users[name] = password
    try:
        broker = Mosquitto(Path(tempfile.mkdtemp(prefix="cloudlet-mosquitto-")), port or None,
                           tls=tls, users=users or None, anonymous=allow_anonymous_insecure,
                           client_certs=client_certs)  # fmt: skip
        broker.start()
    except (RigError, subprocess.CalledProcessError) as exc:
        raise _fail(str(exc)) from None
    if broker.ca_file is not None:
        out.print(f"clients verify the broker with tls_ca: {broker.ca_file}")
    if allow_anonymous_insecure:
        err.print("[bold red]warning:[/] anonymous access: any client on this machine may"
                  " publish, command and read everything")  # fmt: skip
    elif not client_certs:
        admin = broker.admin_settings()
        secret = admin.password.get_secret_value() if admin.password else ""
        out.print(
            f"administrator: --broker mqtt{'s' if tls else ''}://{admin.username}:{secret}"
            f"@{broker.host}:{broker.port}  (cloudlet device add ..., cloudlet role add ...)"
        )
    _serve(broker, broker.plain_url)


@rig_app.command("kafka")
def rig_kafka(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 9092,
) -> None:
    """Run a real single-node Kafka (KRaft) in the foreground."""
    try:
        broker = Kafka(Path(tempfile.mkdtemp(prefix="cloudlet-kafka-")), port or None)
        broker.start()
    except RigError as exc:
        raise _fail(str(exc)) from None
    _serve(broker, broker.bootstrap_servers)


@rig_app.command("docker")
def rig_docker() -> None:
    """A Docker Engine for the control plane's docker sites: the one at DOCKER_HOST or
    /var/run/docker.sock, or Debian's dockerd started here (vfs, no bridge: containers use
    host networking) until Ctrl-C."""
    from cloudlet.rig.docker import DockerEngine

    try:
        engine = DockerEngine(Path(tempfile.mkdtemp(prefix="cloudlet-docker-"))).start()
    except RigError as exc:
        raise _fail(str(exc)) from None
    out.print(f"docker engine: export DOCKER_HOST={engine.url}")
    out.print(f"in a topology's site: engine: {{docker: {engine.url}}}")
    if engine.process is None:
        return  # someone else's engine: nothing to keep running
    stop = _stop_on_signals()
    _wait(stop)
    engine.stop()


@rig_app.command("image")
def rig_image(
    tag: Annotated[str | None, typer.Option(help="Tag (default: cloudlet:<content hash>).")] = None,
) -> None:
    """Build the project image (compose/Dockerfile) on a local Debian base made with
    debootstrap, on the engine at DOCKER_HOST; no registry is needed."""
    from cloudlet.rig.docker import DockerEngine, project_image

    try:
        engine = DockerEngine(Path(tempfile.mkdtemp(prefix="cloudlet-docker-")))
        if not os.environ.get("DOCKER_HOST"):
            raise RigError("set DOCKER_HOST to an engine (`cloudlet rig docker` starts one)")
        engine.start()
        out.print(project_image(engine.client(), tag, say=out.print))
    except RigError as exc:
        raise _fail(str(exc)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
