"""`cloudlet processor list|show|new`: the installed plug-ins, and a new one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

processor_app = typer.Typer(
    help="Processor plug-ins: list the installed ones, show a config, scaffold a new one.",
    no_args_is_help=True,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _describe(schema: dict[str, Any]) -> str:
    fields = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type") or "|".join(
            str(p.get("type") or p.get("$ref", "").rsplit("/", 1)[-1])
            for p in prop.get("anyOf", [])
        )
        if prop.get("format") == "duration":  # milliseconds in the schema, "10m" in a file
            kind = "duration"
        fields.append(f"{name}{'' if name in required else '?'}: {kind or 'object'}")
    return ", ".join(fields) or "-"


@processor_app.command("list")
def processor_list() -> None:
    """Every processor a unit can name in `use:` (built-ins and installed plug-ins)."""
    from processors.chain import installed, resolve
    from processors.plugin import ProcessorError

    table = Table("name", "config (? optional)", "about")
    for name in sorted(installed()):
        try:
            cls = resolve(name)
        except ProcessorError as exc:
            table.add_row(name, "[red]cannot load[/]", str(exc))
            continue
        about = " ".join((cls.__doc__ or "").split()).split(". ")[0].split(": ")[0]
        table.add_row(name, _describe(cls.Config.model_json_schema()), about)
    out.print(table)


@processor_app.command("show")
def processor_show(
    name: Annotated[str, typer.Argument(help="A processor name, or module:Class.")],
) -> None:
    """A processor's description and its config's JSON schema."""
    from processors.chain import resolve
    from processors.plugin import ProcessorError

    try:
        cls = resolve(name)
    except ProcessorError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    out.print((cls.__doc__ or "").strip(), soft_wrap=True)
    schema = cls.Config.model_json_schema()
    print(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())


@processor_app.command("new")
def processor_new(
    name: Annotated[str, typer.Argument(help="The plug-in's name, e.g. smoothing.")],
    directory: Annotated[
        Path, typer.Option("--dir", "-d", help="Where to create the package.")
    ] = Path("."),
) -> None:
    """Scaffold an installable plug-in package, with an example processor and passing tests."""
    from cloudlet.scaffold import ScaffoldError, new_processor

    try:
        target = new_processor(name, directory)
    except ScaffoldError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    print(f"created {target}; next:")
    print(f"  cd {target} && pip install -e '.[test]' && pytest")
    print("  cloudlet flow test --unit example/unit.yaml -i example/input.jsonl")
