"""`cloudlet so add|update|rm|history`: the fleet's registry through the cloud's REST API
(`cloud_sync.registry_api`), from descriptor files (YAML or JSON); with `--local FOLDER`, in a
cloudlet's own copy (`cloud_sync.local_registry`), which works offline."""

from __future__ import annotations

import getpass
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
import yaml

from cloudlet.cli_common import err, fail, out

CLOUD = typer.Option("--cloud", envvar="CLOUDLET_CLOUD", help="The cloud API's URL.")
TOKEN_ENV = typer.Option(
    "--token-env", help="The environment variable holding a token with `register` grants."
)
LOCAL = typer.Option(
    "--local",
    help="A cloudlet's copy of the registry (its `forward.registry` folder): change it here,"
    " offline or not; the change goes to the cloud when the link is up.",
)


def _local(folder: Path, so: str, descriptor: dict[str, Any] | None) -> int:
    """A change in a cloudlet's copy; the version of the cloud's it was made on."""
    from cloud_sync.local_registry import LocalRefused, LocalRegistry

    try:
        change = LocalRegistry(folder).change(so, descriptor, by=getpass.getuser())
    except LocalRefused as exc:
        for problem in exc.problems:
            err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)
        raise fail(f"{so}: not changed in {folder}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None
    return int(change["base"])


def register(so_app: typer.Typer) -> None:
    so_app.command("add")(so_add)
    so_app.command("update")(so_update)
    so_app.command("rm")(so_rm)
    so_app.command("history")(so_history)


def _call(cloud: str, token_env: str, method: str, path: str, body: Any = None) -> Any:
    token = os.environ.get(token_env)
    if not token:
        raise fail(f"set {token_env} to a token with register grants (or pass --token-env)")
    request = urllib.request.Request(
        cloud.rstrip("/") + path,
        data=orjson.dumps(body) if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                 "Content-Type": "application/json"},
        method=method,
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return orjson.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        try:
            answer = orjson.loads(exc.read())
        except orjson.JSONDecodeError:
            answer = {}
        for problem in answer.get("problems", []):
            err.print(f"[bold red]error:[/] {problem}", soft_wrap=True)
        raise fail(f"{method} {path}: {exc.code} {answer.get('error', exc.reason)}") from None
    except OSError as exc:
        raise fail(f"cannot reach the cloud API at {cloud} ({exc})") from None


def _descriptor(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise fail(f"{path}: {exc}") from None
    if not isinstance(doc, dict):
        raise fail(f"{path}: a service object descriptor is a mapping")
    return doc


def so_add(
    file: Annotated[Path, typer.Argument(help="A descriptor (YAML or JSON); id made if absent.")],
    cloud: Annotated[str, CLOUD] = "http://127.0.0.1:8000",
    token_env: Annotated[str, TOKEN_ENV] = "CLOUDLET_TOKEN",
    local: Annotated[Path | None, LOCAL] = None,
) -> None:
    """Register a service object; prints its id, version and API token (shown once)."""
    doc = _descriptor(file)
    if local is not None:
        so = doc.get("id") or uuid.uuid4().hex
        if not isinstance(so, str):
            raise fail(f"{file}: id must be a string")
        _local(local, so, doc)
        out.print(f"registered {so} at this cloudlet ({local}); it reaches the cloud when the"
                  " link is up (`cloudlet so history` there shows how it was settled)")  # fmt: skip
        return
    made = _call(cloud, token_env, "POST", "/", doc)
    out.print(f"registered {made['id']} (version {made['version']})")
    out.print(f"api token: {made['api_token']}")


def so_update(
    file: Annotated[Path, typer.Argument(help="The new descriptor (YAML or JSON), with its id.")],
    cloud: Annotated[str, CLOUD] = "http://127.0.0.1:8000",
    token_env: Annotated[str, TOKEN_ENV] = "CLOUDLET_TOKEN",
    local: Annotated[Path | None, LOCAL] = None,
) -> None:
    """Change a registered service object (a new version)."""
    doc = _descriptor(file)
    so = doc.get("id")
    if not isinstance(so, str):
        raise fail(f"{file}: the descriptor needs its id to be changed")
    if local is not None:
        base = _local(local, so, doc)
        out.print(f"updated {so} at this cloudlet (made on the cloud's version {base})")
        return
    changed = _call(cloud, token_env, "PUT", f"/{so}", doc)
    out.print(f"updated {so} (version {changed['version']})")


def so_rm(
    so: Annotated[str, typer.Argument(metavar="ID", help="The service object's id.")],
    cloud: Annotated[str, CLOUD] = "http://127.0.0.1:8000",
    token_env: Annotated[str, TOKEN_ENV] = "CLOUDLET_TOKEN",
    local: Annotated[Path | None, LOCAL] = None,
) -> None:
    """Remove a registered service object (its history stays)."""
    if local is not None:
        _local(local, so, None)
        out.print(f"removed {so} at this cloudlet")
        return
    _call(cloud, token_env, "DELETE", f"/{so}")
    out.print(f"removed {so}")


def so_history(
    so: Annotated[str, typer.Argument(metavar="ID", help="The service object's id.")],
    cloud: Annotated[str, CLOUD] = "http://127.0.0.1:8000",
    token_env: Annotated[str, TOKEN_ENV] = "CLOUDLET_TOKEN",
) -> None:
    """Every version of a registered service object: when, by whom, what."""
    for entry in _call(cloud, token_env, "GET", f"/{so}/history"):
        version = entry["version"] if entry["version"] is not None else "-"
        line = f"{version:>4}  {entry['at']}  {entry['action']:<8}  {entry['by']}"
        out.print(line + (f"  ({entry['reason']})" if entry.get("reason") else ""), soft_wrap=True)
