"""The device side on the command line: `cloudlet act`, `simulate` and `demo`."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cloudlet.cli_common import default_objects as _default_objects
from cloudlet.cli_common import device_secrets as _device_secrets
from cloudlet.cli_common import err, out
from cloudlet.cli_common import fail as _fail
from cloudlet.cli_common import stop_on_signals as _stop_on_signals
from cloudlet.rig import RigError
from edge_objects.faults import FAULT_KINDS
from streams import TopicScheme
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings


def register(app: typer.Typer) -> None:
    app.command("act")(act)
    app.command("simulate")(simulate)
    app.command("demo")(demo)


# act -----------------------------------------------------------------------------------------


def _parameter(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise _fail(f"--param {text!r} must look like name=value")
    try:
        return name, orjson.loads(raw)  # numbers, booleans, JSON strings and objects
    except orjson.JSONDecodeError:
        return name, raw  # a bare word is a string


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
    from streams.transport.mqtt import MqttSettings, connect, make_client, refused, refused_because

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
    write_only: Annotated[
        bool,
        typer.Option(
            "--write-only", help="With --devices: write the scaled descriptors, and stop."
        ),
    ] = False,
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
        if write_only:
            return
    elif write_only:
        raise _fail("--write-only writes a scaled scenario: give --devices N")
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


# demo ----------------------------------------------------------------------------------------


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
    keep: Annotated[
        bool, typer.Option(help="Keep the work directory (logs, outbox, cloud store) at the end.")
    ] = False,
) -> None:
    """Run simulated devices through a real broker, the cloudlet and the cloud; watch it live
    in the terminal and on the dashboard."""
    from rich.live import Live

    from cloudlet.demo import Demo, DemoSettings
    from cloudlet.demo_view import live_view, summary_view

    if speed is None:
        speed = 120.0 if scenario == "smart-city" else 600.0
    settings = DemoSettings(scenario, mqtt_url, duration, rate, speed, faults, seed, steps,
                            kafka, port, keep=keep, fault_kinds=fault_kind)  # fmt: skip
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
    kept = "kept" if keep else "removed at the end; --keep keeps it"
    out.print(f"dashboard: {runner.cloud.url}/   (work directory: {runner.workdir}, {kept})")
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
