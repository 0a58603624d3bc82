"""`cloudlet device ...` and `cloudlet role ...`: identities on the site's broker.

Each command logs in as the broker's administrator (the dynamic security plugin's; the URL's
credentials, `--broker mqtt://admin:secret@host:1883`, or CLOUDLET_BROKER_ADMIN), changes the
broker at once (no restart of it or of any unit) and appends the change to the audit log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cloudlet.cli_common import err, out
from cloudlet.cli_common import fail as _fail
from cloudlet.security import (
    ROLE_KINDS,
    AccessError,
    AuditLog,
    BrokerAdmin,
    Credentials,
    Identities,
    default_audit_path,
)
from streams.topics import TopicScheme
from streams.transport.mqtt import MqttSettings

ADMIN_ENV = "CLOUDLET_BROKER_ADMIN"

device_app = typer.Typer(
    help="Device identities: one per service object, username and client id its id.",
    no_args_is_help=True,
)
role_app = typer.Typer(
    help=f"Role accounts ({', '.join(ROLE_KINDS)}), each bound to its name as client id.",
    no_args_is_help=True,
)

Broker = Annotated[
    str | None,
    typer.Option(
        "--broker", help=f"mqtt://ADMIN:SECRET@host:port of the broker (or ${ADMIN_ENV})."
    ),
]
TlsCa = Annotated[Path | None, typer.Option(help="CA that signed the broker's certificate.")]
Cert = Annotated[Path | None, typer.Option(help="The administrator's client certificate.")]
Key = Annotated[Path | None, typer.Option(help="Its private key.")]
Root = Annotated[str, typer.Option(help="Topic root the site uses (such as site-7/).")]
Audit = Annotated[
    Path | None,
    typer.Option(
        help="Audit log (JSON lines; default $CLOUDLET_AUDIT_LOG or"
        " ~/.local/state/cloudlet/audit.jsonl)."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SecretFile = Annotated[
    Path | None,
    typer.Option(
        help="Write the new credentials here (mode 0600) instead of printing them:"
        " the secret alone for one identity (a password_file), JSON for several"
        " or a .json name."
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(device_app, name="device")
    app.add_typer(role_app, name="role")
    app.add_typer(site_app, name="site")


def _identities(broker: str | None, tls_ca: Path | None, cert: Path | None, key: Path | None,
                root: str, audit: Path | None) -> Identities:  # fmt: skip
    url = broker or os.environ.get(ADMIN_ENV)
    if not url:
        raise _fail(f"say which broker to administer: --broker mqtt://ADMIN:SECRET@host:1883"
                    f" (or set {ADMIN_ENV})")  # fmt: skip
    try:
        settings = MqttSettings(url=url, tls_ca=tls_ca, tls_cert=cert, tls_key=key)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    return Identities(BrokerAdmin(settings), topics=TopicScheme(root=root),
                      audit=AuditLog(audit or default_audit_path()))  # fmt: skip


def _show_credentials(creds: list[Credentials], broker_url: str, secret_file: Path | None,
                      as_json: bool) -> None:  # fmt: skip
    doc = {c.name: {"username": c.name, "secret": c.secret, "client_id": c.client_id,
                    "url": c.url(broker_url)} for c in creds}  # fmt: skip
    if secret_file is not None:
        # one identity: the secret alone, what a password_file holds; JSON for several (or
        # a name ending in .json), what simulate --credentials reads
        whole = len(creds) != 1 or secret_file.suffix == ".json"
        _write_private(secret_file, json.dumps(doc, indent=1) if whole else creds[0].secret + "\n")
        err.print(f"{len(creds)} new credentials written to {secret_file} (mode 0600)")
        return
    if as_json:
        out.print_json(data=doc)
        return
    for c in creds:
        out.print(f"{c.name}  secret: {c.secret}  client id: {c.client_id}")
    if creds:
        err.print("[yellow]the secrets are shown only now: the broker keeps only a salted hash[/]")


@contextmanager
def _session(ids: Identities) -> Iterator[Identities]:
    """Logged in as the administrator; a refusal or an error of the broker ends the command
    with its message."""
    try:
        with ids.admin:
            yield ids
    except AccessError as exc:
        raise _fail(str(exc)) from None


def _table(identities: list[Any], as_json: bool) -> None:
    if as_json:
        out.print_json(data=[i.to_dict() for i in identities])
        return
    table = Table("identity", "kind", "client id", "state")
    for i in identities:
        table.add_row(i.name, i.kind, i.client_id or "(any)", "disabled" if i.disabled else "")
    out.print(table)


# devices -------------------------------------------------------------------------------------


@device_app.command("add")
def device_add(
    so_ids: Annotated[list[str], typer.Argument(help="Service object ids.")],
    broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None, key: Key = None,
    root: Root = "", audit_log: Audit = None, as_json: AsJson = False,
    secret_file: SecretFile = None,
) -> None:  # fmt: skip
    """Give service objects an identity each: may post only their own streams and status
    reports, read only their own commands. Prints each secret once."""
    ids = _identities(broker, tls_ca, cert, key, root, audit_log)
    creds: list[Credentials] = []
    problem: AccessError | None = None
    with _session(ids):
        for so in so_ids:
            try:
                creds.append(ids.add_device(so))
            except AccessError as exc:  # those made so far are shown all the same
                problem = AccessError(f"{so}: {exc}")
                break
    _show_credentials(creds, ids.admin.settings.url, secret_file, as_json)
    if problem is not None:
        raise _fail(str(problem))


@device_app.command("sync")
def device_sync(
    objects: Annotated[list[Path], typer.Argument(help="Descriptor files or directories.")],
    broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None, key: Key = None,
    root: Root = "", audit_log: Audit = None, as_json: AsJson = False,
    secret_file: SecretFile = None,
) -> None:  # fmt: skip
    """An identity for every service object of the registry that has none yet."""
    from streams.catalog import Catalog

    catalog, problems = Catalog.check(objects)
    if problems:
        raise _fail(f"{len(problems)} problems in the descriptors: run cloudlet so validate")
    ids = _identities(broker, tls_ca, cert, key, root, audit_log)
    with _session(ids):
        created = ids.sync_devices(catalog.registry.objects)
    _show_credentials(list(created.values()), ids.admin.settings.url, secret_file, as_json)


def _list(kinds: set[str] | None, broker: str | None, tls_ca: Path | None, cert: Path | None,
          key: Path | None, as_json: bool) -> None:  # fmt: skip
    ids = _identities(broker, tls_ca, cert, key, "", None)
    with _session(ids):
        found = ids.list()
    _table([i for i in found if kinds is None or i.kind in kinds], as_json)


def _show(name: str, broker: str | None, tls_ca: Path | None, cert: Path | None,
          key: Path | None, as_json: bool) -> None:  # fmt: skip
    ids = _identities(broker, tls_ca, cert, key, "", None)
    with _session(ids):
        identity = ids.show(name)
    _table([identity], as_json)


def _rotate(name: str, broker: str | None, tls_ca: Path | None, cert: Path | None,
            key: Path | None, root: str, audit: Path | None, as_json: bool,
            secret_file: Path | None) -> None:  # fmt: skip
    ids = _identities(broker, tls_ca, cert, key, root, audit)
    with _session(ids):
        creds = ids.rotate(name)
    _show_credentials([creds], ids.admin.settings.url, secret_file, as_json)


def _revoke(names: list[str], broker: str | None, tls_ca: Path | None, cert: Path | None,
            key: Path | None, root: str, audit: Path | None) -> None:  # fmt: skip
    ids = _identities(broker, tls_ca, cert, key, root, audit)
    with _session(ids):
        for name in names:
            ids.revoke(name)
            out.print(f"{name}: revoked (disconnected, and refused from now on)")


@device_app.command("list")
def device_list(broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
                key: Key = None, as_json: AsJson = False) -> None:  # fmt: skip
    """The device identities on the broker."""
    _list({"device"}, broker, tls_ca, cert, key, as_json)


@device_app.command("show")
def device_show(name: Annotated[str, typer.Argument(help="Service object id.")],
                broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
                key: Key = None, as_json: AsJson = False) -> None:  # fmt: skip
    """One identity: kind, bound client id, state."""
    _show(name, broker, tls_ca, cert, key, as_json)


@device_app.command("rotate")
def device_rotate(name: Annotated[str, typer.Argument(help="Service object id.")],
                  broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
                  key: Key = None, root: Root = "", audit_log: Audit = None,
                  as_json: AsJson = False, secret_file: SecretFile = None) -> None:  # fmt: skip
    """A new secret; the device's connections made with the old one are closed."""
    _rotate(name, broker, tls_ca, cert, key, root, audit_log, as_json, secret_file)


@device_app.command("revoke")
def device_revoke(names: Annotated[list[str], typer.Argument(help="Service object ids.")],
                  broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
                  key: Key = None, root: Root = "", audit_log: Audit = None) -> None:  # fmt: skip
    """Remove identities: the broker disconnects them at once and refuses them from then."""
    _revoke(names, broker, tls_ca, cert, key, root, audit_log)


# roles ---------------------------------------------------------------------------------------


@role_app.command("add")
def role_add(
    kind: Annotated[str, typer.Argument(help=f"One of: {', '.join(ROLE_KINDS)}.")],
    name: Annotated[str, typer.Argument(help="Account name, also its only client id.")],
    broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None, key: Key = None,
    root: Root = "", audit_log: Audit = None, as_json: AsJson = False,
    secret_file: SecretFile = None,
) -> None:  # fmt: skip
    """A role account. Prints its secret once."""
    if kind not in ROLE_KINDS:
        raise _fail(f"unknown role {kind!r} (roles: {', '.join(ROLE_KINDS)})")
    ids = _identities(broker, tls_ca, cert, key, root, audit_log)
    with _session(ids):
        creds = ids.add_role(kind, name)
    _show_credentials([creds], ids.admin.settings.url, secret_file, as_json)


@role_app.command("list")
def role_list(broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
              key: Key = None, as_json: AsJson = False) -> None:  # fmt: skip
    """The role accounts on the broker."""
    _list(set(ROLE_KINDS) | {"administrator"}, broker, tls_ca, cert, key, as_json)


@role_app.command("show")
def role_show(name: Annotated[str, typer.Argument(help="Account name.")],
              broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
              key: Key = None, as_json: AsJson = False) -> None:  # fmt: skip
    """One account: kind, bound client id, state."""
    _show(name, broker, tls_ca, cert, key, as_json)


@role_app.command("rotate")
def role_rotate(name: Annotated[str, typer.Argument(help="Account name.")],
                broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
                key: Key = None, root: Root = "", audit_log: Audit = None,
                as_json: AsJson = False, secret_file: SecretFile = None) -> None:  # fmt: skip
    """A new secret; connections made with the old one are closed."""
    _rotate(name, broker, tls_ca, cert, key, root, audit_log, as_json, secret_file)


@role_app.command("revoke")
def role_revoke(names: Annotated[list[str], typer.Argument(help="Account names.")],
                broker: Broker = None, tls_ca: TlsCa = None, cert: Cert = None,
                key: Key = None, root: Root = "", audit_log: Audit = None) -> None:  # fmt: skip
    """Remove accounts: disconnected at once, refused from then."""
    _revoke(names, broker, tls_ca, cert, key, root, audit_log)


# a site provisioned before its broker starts ----------------------------------------------------

site_app = typer.Typer(help="A site's broker security, provisioned offline.", no_args_is_help=True)


@site_app.command("init")
def site_init(
    directory: Annotated[
        Path, typer.Argument(help="Where to write the broker's configuration and the secrets.")
    ],
    objects: Annotated[list[Path], typer.Option("--objects", help="The registry's descriptors.")],
    role: Annotated[
        list[str] | None, typer.Option(help="KIND:NAME (repeatable), such as unit:irrigation.")
    ] = None,
    root: Root = "",
    owner: Annotated[
        str | None, typer.Option(help="USER or UID:GID to own the broker's file (its user).")
    ] = None,
    secrets_owner: Annotated[
        str | None, typer.Option(help="USER or UID:GID to own the secrets (the units' user).")
    ] = None,
) -> None:
    """Before a new site's broker first starts: its dynamic security file (an administrator,
    an identity per service object, the role accounts; deny by default) and one secret file
    per identity (mode 0600) under DIRECTORY/secrets/, plus DIRECTORY/devices.json for the
    simulators. Does nothing if the site is already provisioned."""
    from cloudlet.security import site_security
    from streams.catalog import Catalog

    target = directory / "dynamic-security.json"
    if target.exists():
        out.print(f"{directory}: already provisioned (delete it to start over)")
        return
    catalog, problems = Catalog.check(objects)
    if problems:
        raise _fail(f"{len(problems)} problems in the descriptors: run cloudlet so validate")
    roles: dict[str, str] = {}
    for entry in role or []:
        kind, sep, name = entry.partition(":")
        if not sep or kind not in ROLE_KINDS or not name:
            raise _fail(
                f"--role {entry!r} must be KIND:NAME with KIND one of {', '.join(ROLE_KINDS)}"
            )
        roles[name] = kind
    try:
        doc, creds = site_security(catalog.registry.objects, roles, topics=TopicScheme(root=root))
    except AccessError as exc:
        raise _fail(str(exc)) from None
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    for name, c in creds.items():
        _write_private(secrets_dir / name, c.secret + "\n")
    devices = {so: creds[so].secret for so in catalog.registry.objects}
    _write_private(directory / "devices.json", json.dumps(devices, indent=1, sort_keys=True))
    _write_private(target, json.dumps(doc, indent=1))  # last: its presence means done
    if owner:  # the broker rewrites its file (a new one beside it): the folder is its too
        os.chown(target, *_ids(owner))
        os.chown(directory, *_ids(owner))
    if secrets_owner:
        ids = _ids(secrets_owner)
        for path in (secrets_dir, *secrets_dir.iterdir(), directory / "devices.json"):
            os.chown(path, *ids)
    out.print(f"{directory}: {len(devices)} device identities, {len(roles)} role accounts and an"
              f" administrator; secrets in {secrets_dir}/ (mode 0600)")  # fmt: skip


def _ids(owner: str) -> tuple[int, int]:
    """(uid, gid) of "USER" or "UID:GID"."""
    import pwd

    if owner.replace(":", "").isdigit():
        uid, _, gid = owner.partition(":")
        return int(uid), int(gid or uid)
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise _fail(f"no user {owner!r} here") from None
    return entry.pw_uid, entry.pw_gid


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
