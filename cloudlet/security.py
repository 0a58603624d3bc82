"""Identities and access control on a site's broker: deny by default, enforced by Mosquitto.

Every client that connects has an identity: each service object (username = its id) and each
role account (units, the gateway, the command relay, operators). Mosquitto's dynamic security
plugin (shipped with Debian's mosquitto since 2.0) holds them: the secret only as a salted
PBKDF2-SHA512 hash, an ACL per role, and a client id bound to each device's identity. We
change it at run time over its control topic, so adding, rotating and revoking an identity
takes effect at once (a revoked client is disconnected by the broker) without restarting the
broker or any unit. Why this plugin and not password and ACL files: files need a SIGHUP from a
process that can signal the broker (not the case across containers), and Mosquitto's file
ACLs cannot bind a client id to an identity, which is what stops a session takeover.

What each identity may do (topics under the site's topic root):

| identity  | publish                                   | subscribe / receive                  |
|-----------|-------------------------------------------|--------------------------------------|
| device X  | `X/streams/+`, `X/actions/+/status`       | `X/actions`                          |
| unit      | `+/streams/+/updates`, dead letters,      | device streams, derived updates,     |
|           | `+/actions` (rules' commands)             | status reports                       |
| gateway   | `+/streams/+`, `+/actions/+/status`,      | `+/actions` (commands for web        |
|           | dead letters                              | objects)                             |
| relay     | `+/actions`                               | status reports                       |
| operator  | `+/actions`                               | everything under the root            |
| viewer    | nothing                                   | everything under the root            |

Every change is appended to an audit log (JSON lines: when, who, what).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from streams.topics import TopicScheme
from streams.transport.mqtt import MqttSettings, connect, make_client, refused, refused_because

if TYPE_CHECKING:  # paho (and ssl with it) loads where a client is made
    import paho.mqtt.client as mqtt

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
ADMIN_ROLE = "cloudlet-admin"
ROLE_KINDS = ("unit", "gateway", "relay", "operator", "viewer")
DEVICE = "device"
ITERATIONS = 101  # the plugin's own; the secrets are 256 random bits, no dictionary to try
MAX_ID = 128


class AccessError(Exception):
    """The broker refused a change, or could not be reached; the message says which."""


def new_secret() -> str:
    """A fresh secret: 256 random bits, URL-safe (it can ride in mqtt://id:secret@host)."""
    return secrets.token_urlsafe(32)


def hashed(
    secret: str, *, salt: bytes | None = None, iterations: int = ITERATIONS
) -> dict[str, Any]:
    """The plugin's stored form of a secret: PBKDF2-SHA512 with a random 12-byte salt."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def _send(*topics: str) -> list[dict[str, Any]]:
    return [_acl("publishClientSend", t) for t in topics]


def _read(*topics: str) -> list[dict[str, Any]]:
    out = []
    for t in topics:
        out += [_acl("subscribePattern", t), _acl("publishClientReceive", t),
                _acl("unsubscribePattern", t)]  # fmt: skip
    return out


def device_acls(so: str, topics: TopicScheme) -> list[dict[str, Any]]:
    """A device's own streams and status reports, its own commands: nothing else."""
    r = topics.root
    return [
        *_send(f"{r}{so}/streams/+", f"{r}{so}/actions/+/status"),
        _acl("subscribeLiteral", f"{r}{so}/actions"),
        _acl("publishClientReceive", f"{r}{so}/actions"),
        _acl("unsubscribeLiteral", f"{r}{so}/actions"),
    ]


def role_acls(kind: str, topics: TopicScheme) -> list[dict[str, Any]]:
    r = topics.root
    devices, derived, status = (
        f"{r}+/streams/+",
        f"{r}+/streams/+/updates",
        f"{r}+/actions/+/status",
    )
    commands, letters, everything = f"{r}+/actions", f"{r}cloudlet/dead-letter/#", f"{r}#"
    if kind == "unit":  # and its replicas' coordination (`processors.partitions`)
        units = f"{r}cloudlet/units/#"
        return [*_send(derived, letters, commands, units), *_read(devices, derived, status),
                *_read(f"$share/+/{devices}", units)]  # fmt: skip
    if kind == "gateway":
        return [*_send(devices, status, letters), *_read(commands)]
    if kind == "relay":
        return [*_send(commands), *_read(status)]
    if kind == "operator":
        return [*_send(commands), *_read(everything)]
    if kind == "viewer":
        return _read(everything)
    raise AccessError(f"unknown role {kind!r} (roles: {', '.join(ROLE_KINDS)})")


def role_name(kind: str, topics: TopicScheme, so: str | None = None) -> str:
    """The plugin's role for a kind of identity (per device: one role each)."""
    scope = f"@{topics.root.rstrip('/')}" if topics.root else ""
    return f"cloudlet-{kind}{scope}" + (f":{so}" if so is not None else "")


def broker_security(admin: str, secret: str) -> dict[str, Any]:
    """The plugin's first configuration: one administrator, who may only administer it, and
    nothing allowed to anyone else (default ACL access: deny)."""
    control = "$CONTROL/dynamic-security/#"
    return {
        "clients": [{"username": admin, "textname": "cloudlet administrator",
                     "clientid": admin, **hashed(secret), "roles": [{"rolename": ADMIN_ROLE}]}],
        "roles": [{"rolename": ADMIN_ROLE, "acls": [
            _acl("publishClientSend", control), _acl("publishClientReceive", control),
            _acl("subscribePattern", control), _acl("unsubscribePattern", control),
        ]}],
        "groups": [],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": False},
    }  # fmt: skip


def check_id(name: str, what: str = "identity") -> str:
    if not 0 < len(name) <= MAX_ID or {"/", "+", "#", "\x00", ":"} & set(name):
        raise AccessError(f"{what} {name!r} must be 1-{MAX_ID} characters without / + # : or NUL")
    return name


# the audit log -------------------------------------------------------------------------------


class AuditLog:
    """Appends one JSON line per change: when (ms), who, what, which identity. Never the
    secret."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()

    def write(self, actor: str, action: str, identity: str, **detail: Any) -> None:
        line = {"at": int(self.clock() * 1000), "who": actor, "what": action,
                "identity": identity, **detail}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def default_audit_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("CLOUDLET_AUDIT_LOG") or Path(state) / "cloudlet" / "audit.jsonl")


# talking to the plugin -----------------------------------------------------------------------


class BrokerAdmin:
    """Commands to the dynamic security plugin over its control topic; each carries a
    correlation id that its answer repeats."""

    def __init__(self, settings: MqttSettings, *, timeout: float = 10.0) -> None:
        self.settings = settings
        self.timeout = timeout
        client_id = settings.username or f"cloudlet-admin-{uuid.uuid4().hex[:8]}"
        self._client = make_client(settings, client_id)
        self._answers: dict[str, dict[str, Any]] = {}
        self._waiting: set[str] = set()
        self._changed = threading.Condition()
        self._refused: str | None = None
        self._ready = threading.Event()

        def on_connect(c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
            if refused(reason):
                self._refused = refused_because(reason, settings, client_id)
                self._ready.set()
                return
            c.subscribe(f"{CONTROL_TOPIC}/response", qos=1)

        def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            try:
                responses = json.loads(msg.payload).get("responses", [])
            except (ValueError, AttributeError):
                return
            with self._changed:
                for r in responses if isinstance(responses, list) else []:
                    # every administrator sees every answer: keep only those to our commands
                    if isinstance(r, dict) and r.get("correlationData") in self._waiting:
                        self._answers[r["correlationData"]] = r
                self._changed.notify_all()

        self._client.on_connect = on_connect
        self._client.on_subscribe = lambda *_: self._ready.set()
        self._client.on_message = on_message

    def __enter__(self) -> BrokerAdmin:
        connect(self._client, self.settings, persistent=False)
        self._client.loop_start()
        if not self._ready.wait(self.timeout):
            self.close()
            raise AccessError(f"cannot reach the broker at {self.settings.url} to administer it")
        if self._refused is not None:
            self.close()
            raise AccessError(self._refused)
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def run(self, *commands: dict[str, Any], allow: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Send `commands` at once; their answers, in order. An answer with an error raises
        AccessError, unless its text is in `allow` (such as 'Role already exists')."""
        # The plugin answers each command with the correlation data it carried.
        keys = [uuid.uuid4().hex for _ in commands]
        sent = [{**c, "correlationData": k} for c, k in zip(commands, keys, strict=True)]
        with self._changed:
            self._waiting.update(keys)
        self._client.publish(CONTROL_TOPIC, json.dumps({"commands": sent}), qos=1)
        with self._changed:
            answered = self._changed.wait_for(lambda: all(k in self._answers for k in keys),
                                              self.timeout)  # fmt: skip
            self._waiting.difference_update(keys)
            responses = [self._answers.pop(k) for k in keys if k in self._answers]
        if not answered:
            raise AccessError(
                "the broker did not answer: is its dynamic security plugin loaded, and is"
                f" {self.settings.who} its administrator?"
            )
        allowed = set(allow)
        for r in responses:
            if r.get("error") and r["error"] not in allowed:
                raise AccessError(f"{r.get('command')}: {r['error']}")
        return responses


# identities ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    name: str
    kind: str  # "device" or a role kind
    client_id: str | None  # the only client id it may connect with; None: any
    disabled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "client_id": self.client_id,
                "disabled": self.disabled}  # fmt: skip


@dataclass(frozen=True)
class Credentials:
    name: str
    secret: str
    client_id: str | None

    def url(self, broker_url: str) -> str:
        """broker_url with these credentials in it (mqtt://name:secret@host:port)."""
        scheme, _, rest = broker_url.partition("://")
        return f"{scheme}://{_quote(self.name)}:{_quote(self.secret)}@{rest.rpartition('@')[2]}"


def _quote(value: str) -> str:
    return quote(value, safe="")


class Identities:
    """Adds, rotates, revokes and lists the identities on one broker (through `admin`),
    writing each change to the audit log."""

    def __init__(
        self,
        admin: BrokerAdmin,
        *,
        topics: TopicScheme | None = None,
        audit: AuditLog | None = None,
        actor: str | None = None,
    ) -> None:
        self.admin = admin
        self.topics = topics or TopicScheme()
        self.audit = audit or AuditLog(default_audit_path())
        self.actor = actor or f"{getpass.getuser()} as {admin.settings.username or 'certificate'}"

    def _role(self, kind: str, so: str | None = None) -> str:
        name = role_name(kind, self.topics, so)
        acls = device_acls(so, self.topics) if so is not None else role_acls(kind, self.topics)
        self.admin.run({"command": "createRole", "rolename": name, "acls": acls},
                       allow=["Role already exists"])  # fmt: skip
        return name

    def add_device(self, so: str, *, secret: str | None = None) -> Credentials:
        """A service object's identity: username and client id its id, its own role."""
        check_id(so, "service object id")
        secret = secret or new_secret()
        role = self._role(DEVICE, so)
        self.admin.run({"command": "createClient", "username": so, "password": secret,
                        "clientid": so, "textname": DEVICE,
                        "roles": [{"rolename": role}]})  # fmt: skip
        self.audit.write(self.actor, "add", so, kind=DEVICE)
        return Credentials(so, secret, so)

    def add_role(self, kind: str, name: str, *, secret: str | None = None) -> Credentials:
        """A role account, bound like every identity to one client id: its name (a unit's
        name, `cloudlet-gateway`, `<unit>-relay`, an operator's name)."""
        check_id(name, "account name")
        role = self._role(kind)
        secret = secret or new_secret()
        self.admin.run({"command": "createClient", "username": name, "password": secret,
                        "clientid": name, "textname": kind,
                        "roles": [{"rolename": role}]})  # fmt: skip
        self.audit.write(self.actor, "add", name, kind=kind)
        return Credentials(name, secret, name)

    def set_device(self, so: str, secret: str) -> None:
        """The object's identity with this secret: made, or its secret changed (connections
        made with another closed). What the registry follower does for the cloud's objects."""
        try:
            identity = self.show(so)
        except AccessError:
            self.add_device(so, secret=secret)
            return
        if identity.kind != DEVICE:
            raise AccessError(f"{so!r} is a {identity.kind} account on this broker, not a device")
        self.admin.run(
            {"command": "setClientPassword", "username": so, "password": secret},
            {"command": "disableClient", "username": so},
            {"command": "enableClient", "username": so},
        )
        self.audit.write(self.actor, "rotate", so, kind=DEVICE)

    def remove_device(self, so: str) -> None:
        """`revoke`, for an object removed from the registry: nothing to do if it has none."""
        try:
            self.revoke(so)
        except AccessError as exc:
            if not str(exc).startswith("no identity"):
                raise

    def rotate(self, name: str) -> Credentials:
        """A new secret; connections made with the old one are closed."""
        identity = self.show(name)
        secret = new_secret()
        self.admin.run(
            {"command": "setClientPassword", "username": name, "password": secret},
            {"command": "disableClient", "username": name},  # disconnects it now
            {"command": "enableClient", "username": name},
        )
        self.audit.write(self.actor, "rotate", name, kind=identity.kind)
        return Credentials(name, secret, identity.client_id)

    def revoke(self, name: str) -> None:
        """Delete the identity; the broker disconnects it at once and refuses it from then."""
        identity = self.show(name)
        self.admin.run({"command": "deleteClient", "username": name})
        if identity.kind == DEVICE:
            role = role_name(DEVICE, self.topics, name)
            self.admin.run({"command": "deleteRole", "rolename": role}, allow=["Role not found"])
        self.audit.write(self.actor, "revoke", name, kind=identity.kind)

    def show(self, name: str) -> Identity:
        answer = self.admin.run({"command": "getClient", "username": name},
                                allow=["Client not found"])  # fmt: skip
        client = answer[0].get("data", {}).get("client")
        if not client:
            raise AccessError(f"no identity {name!r} on this broker")
        return _identity(client)

    def list(self) -> list[Identity]:
        answer = self.admin.run({"command": "listClients", "verbose": True, "count": -1})
        clients = answer[0].get("data", {}).get("clients", [])
        return sorted((_identity(c) for c in clients if isinstance(c, dict)), key=lambda i: i.name)

    def sync_devices(self, objects: Iterable[str]) -> dict[str, Credentials]:
        """An identity for every service object that has none yet; the new ones' secrets."""
        have = {i.name for i in self.list()}
        return {so: self.add_device(so) for so in sorted(set(objects)) if so not in have}


def _identity(client: dict[str, Any]) -> Identity:
    kind = client.get("textname") or ""
    if kind != DEVICE and kind not in ROLE_KINDS:
        roles = [r.get("rolename", "") for r in client.get("roles", [])]
        kind = "administrator" if ADMIN_ROLE in roles else (kind or "other")
    return Identity(client["username"], kind, client.get("clientid"),
                    bool(client.get("disabled", False)))  # fmt: skip


# a site's broker, provisioned before it starts -------------------------------------------------


def site_security(
    devices: Iterable[str],
    roles: dict[str, str],
    *,
    topics: TopicScheme | None = None,
    admin: str = "cloudlet-admin",
) -> tuple[dict[str, Any], dict[str, Credentials]]:
    """The plugin's configuration for a new site, written before its broker first starts (a
    compose stack, an image): the administrator, an identity per device and the role accounts
    (`roles`: name -> kind), each bound to its client id. Returns it and every new secret
    (the caller hands each to its owner and keeps none)."""
    topics = topics or TopicScheme()
    creds = {admin: Credentials(admin, new_secret(), admin)}
    doc = broker_security(admin, creds[admin].secret)
    kinds_used = sorted(set(roles.values()))
    for kind in kinds_used:
        doc["roles"].append({"rolename": role_name(kind, topics), "acls": role_acls(kind, topics)})
    for so in sorted(set(devices)):
        check_id(so, "service object id")
        rolename = role_name(DEVICE, topics, so)
        doc["roles"].append({"rolename": rolename, "acls": device_acls(so, topics)})
        creds[so] = Credentials(so, new_secret(), so)
        doc["clients"].append({"username": so, "clientid": so, "textname": DEVICE,
                               **hashed(creds[so].secret),
                               "roles": [{"rolename": rolename}]})  # fmt: skip
    for name, kind in sorted(roles.items()):
        check_id(name, "account name")
        if name in creds:
            raise AccessError(f"{name!r} is both a device and a {kind} account")
        creds[name] = Credentials(name, new_secret(), name)
        doc["clients"].append({"username": name, "clientid": name, "textname": kind,
                               **hashed(creds[name].secret),
                               "roles": [{"rolename": role_name(kind, topics)}]})  # fmt: skip
    return doc, creds
