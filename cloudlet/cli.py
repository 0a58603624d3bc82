"""The `cloudlet` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from cloudlet.access_cli import register as register_access
from cloudlet.cli_common import OBJECTS_ENV, err, out
from cloudlet.cli_common import default_objects as _default_objects
from cloudlet.cli_common import fail as _fail
from cloudlet.cli_common import stop_on_signals as _stop_on_signals
from cloudlet.cli_common import wait as _wait
from cloudlet.control_cli import register as register_control
from cloudlet.devices_cli import register as register_devices
from cloudlet.processor_cli import processor_app
from cloudlet.registry_cli import register as register_registry
from cloudlet.rig_cli import register as register_rig
from cloudlet.unit_run import configure_logging
from streams import Problem, ServiceObject
from streams.catalog import Catalog

app = typer.Typer(
    help="cloudlet: IoT edge data streams, from devices through the cloudlet to the cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
so_app = typer.Typer(
    help="Service objects: validate and inspect descriptors; register them in the cloud.",
    no_args_is_help=True,
)
unit_app = typer.Typer(help="Processing units: run one from its config.", no_args_is_help=True)
flow_app = typer.Typer(
    help="Flows: try composite streams and windows offline.", no_args_is_help=True
)
app.add_typer(so_app, name="so")
app.add_typer(flow_app, name="flow")
app.add_typer(unit_app, name="unit")
app.add_typer(processor_app, name="processor")
cloud_app = typer.Typer(help="Cloud objects: materialise them from Kafka, serve the API.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(cloud_app, name="cloud")
register_control(app)
register_access(app)
register_rig(app)
register_devices(app)
register_registry(so_app)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("cloudlet")
        except PackageNotFoundError:  # run from a checkout that was never installed
            found = "unknown (not installed)"
        out.print(f"cloudlet {found}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:  # fmt: skip
    """cloudlet: IoT edge data streams, from devices through the cloudlet to the cloud."""


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
    from processors.engine.offline import run_offline

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
    chain = registry = None
    if unit is not None and not problems:
        chain, registry, problems = build_chain(catalog.registry, config.processors, str(unit))
    _print_problems(problems)
    if problems:
        raise typer.Exit(1)
    if str(input_path) == "-" and sys.stdin.isatty():  # nothing piped: say so, do not wait
        raise _fail(
            "no input: pipe JSON lines in (cloudlet flow test ... < updates.jsonl) or give"
            ' --input FILE; each line {"so": ..., "stream": ..., "update": {...}}'
        )
    try:
        source = sys.stdin.buffer if str(input_path) == "-" else input_path.open("rb")
    except OSError as exc:
        raise _fail(f"cannot read {input_path}: {exc.strerror}") from None
    with source:
        for record in run_offline(catalog, source, flush=flush, chain=chain, registry=registry):
            sys.stdout.buffer.write(orjson.dumps(record) + b"\n")


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)


# unit ----------------------------------------------------------------------------------------


@unit_app.command("run")
def unit_run(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG", help="The unit's YAML config.")],
    replica: Annotated[
        str | None,
        typer.Option(
            help="Replica id: its own MQTT session and state (with share_group);"
            " the instance is UNIT-REPLICA, or REPLICA when it starts with UNIT-."
        ),
    ] = None,
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
) -> None:
    """Run a processing unit until SIGTERM or Ctrl-C, then drain, checkpoint and stop."""
    from cloudlet.unit_run import run_unit

    code = run_unit(config_path, replica, log_format)
    if code:
        raise typer.Exit(code)


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

    configure_logging(log_format)
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

    configure_logging(log_format)
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
    try:
        _wait(stop, lambda: gateway.alive, "gateway")  # exits 1 once its MQTT thread died
    finally:
        gateway.stop()


def main() -> None:
    """The command line. A usage error (an unknown option, a bad value) comes as one line,
    `error: ...` naming where the help is, as the commands' own errors do; typer would draw
    it in a box."""
    command = typer.main.get_command(app)
    try:
        result = command.main(prog_name="cloudlet", standalone_mode=False)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        # typer's click exceptions (its own copy of click's, not importable as such): a
        # message and an exit code; a usage error also carries the command's context
        code = getattr(exc, "exit_code", None)
        if not (hasattr(exc, "format_message") and isinstance(code, int)):
            raise
        message = exc.format_message()
        if type(exc).__name__ == "NoArgsIsHelpError":  # `cloudlet` alone: its help
            print(message, file=sys.stderr)
        else:
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {message}{where}", file=sys.stderr)
        sys.exit(code)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
