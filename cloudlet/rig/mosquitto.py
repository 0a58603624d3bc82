"""A real Mosquitto broker on a loopback port, installed from Debian's packages when missing."""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from cloudlet.rig.apt import apt_install
from cloudlet.rig.process import RigError, Service, free_port, port_open
from cloudlet.security import AuditLog, BrokerAdmin, Identities, broker_security, hashed
from streams.topics import TopicScheme
from streams.transport.mqtt import MqttSettings

_SEARCH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin")


def find_mosquitto() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SEARCH])
    return shutil.which("mosquitto", path=path)


def ensure_mosquitto() -> str:
    """The mosquitto binary, installing Debian's mosquitto and mosquitto-clients (and openssl,
    which makes the TLS rig's certificates) if needed."""
    found = find_mosquitto()
    if found and shutil.which("openssl"):
        return found
    apt_install("mosquitto", "mosquitto-clients", "openssl")
    found = find_mosquitto()
    if not found:
        raise RigError("apt-get installed mosquitto but its binary is not on PATH or in /usr/sbin")
    return found


def find_dynsec_plugin(binary: str) -> str:
    """Mosquitto's dynamic security plugin, shipped in Debian's mosquitto package."""
    base = Path(binary).resolve().parent.parent
    candidates = [*sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")),
                  Path("/usr/lib/mosquitto_dynamic_security.so"),
                  *sorted((base / "lib").glob("**/mosquitto_dynamic_security.so"))]  # fmt: skip
    for path in candidates:
        if path.exists():
            return str(path)
    raise RigError("Mosquitto's dynamic security plugin (mosquitto_dynamic_security.so) is"
                   " missing: install Debian's mosquitto package (2.0 or later)")  # fmt: skip


ADMIN = "cloudlet-admin"
SUPERUSER_ROLE = "cloudlet-rig-superuser"


class Mosquitto(Service):
    """Mosquitto listening on 127.0.0.1:`port`, with persistence (QoS 1 sessions survive).

    Secure by default: anonymous clients are refused and nothing is allowed that an identity
    was not granted (the dynamic security plugin, administered by `admin` over MQTT; see
    `cloudlet.security`). `anonymous=True` is the old open broker, for nothing but
    experiments. `users` are full-access accounts (NAME: SECRET), for tests and benchmarks;
    `superuser=True` makes one and puts it in `url`. `client_certs` (with `tls`) requires a
    certificate from the rig's CA: the certificate's CN is the identity, and its client id.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        tls: bool = False,
        users: dict[str, str] | None = None,
        anonymous: bool = False,
        superuser: bool = False,
        client_certs: bool = False,
        site: bool = False,
    ) -> None:
        """`site`: configured as a site's broker is (compose/mosquitto.conf: persistence saved
        by Mosquitto's default schedule, 1,000 QoS 1 messages in flight per client, packets up
        to 4 MiB), for benchmarks; the tests' broker saves every second (restart tests need
        it)."""
        super().__init__(workdir)
        self.site = site
        if client_certs and not tls:
            raise RigError("client certificates need the TLS listener (tls=True)")
        if anonymous and (users or superuser or client_certs):
            raise RigError("an anonymous broker has no accounts nor certificates")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tls = tls
        self.anonymous = anonymous
        self.client_certs = client_certs
        self.users = dict(users or {})
        if superuser:
            self.users["rig-superuser"] = secrets.token_urlsafe(24)
        self.credentials = ("rig-superuser", self.users["rig-superuser"]) if superuser else None
        self.admin_secret = secrets.token_urlsafe(32)
        self.ca_file: Path | None = None  # the CA that signed the broker's certificate

    @property
    def plain_url(self) -> str:
        """The broker's address, without credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The address, with the superuser's credentials when there is one."""
        if self.credentials is None:
            return self.plain_url
        user, secret = self.credentials
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}:{secret}@{self.host}:{self.port}"

    @property
    def cli_auth(self) -> list[str]:
        """mosquitto_pub/_sub arguments for the superuser."""
        return ["-u", self.credentials[0], "-P", self.credentials[1]] if self.credentials else []

    def admin_settings(self, **extra: Any) -> MqttSettings:
        """How the dynamic security plugin's administrator connects (with its certificate
        when the broker requires one)."""
        if self.client_certs:
            cert, key = self.issue_certificate(ADMIN)
            return MqttSettings(url=self.plain_url, tls_ca=self.ca_file, tls_cert=cert,
                                tls_key=key, **extra)  # fmt: skip
        return MqttSettings(url=self.plain_url, username=ADMIN, password=self.admin_secret,
                            tls_ca=self.ca_file, **extra)  # fmt: skip

    def _certificates(self) -> list[str]:
        """A private CA and a certificate for 127.0.0.1 signed by it (openssl)."""
        d = self.workdir / "tls"
        d.mkdir(exist_ok=True)
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                      "/CN=cloudlet site CA", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={self.host}",
                      "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
        (d / "san.ext").write_text(f"subjectAltName=IP:{self.host},DNS:localhost\n")
        self._openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
                      "-out", "server.crt")  # fmt: skip
        self.ca_file = d / "ca.crt"
        lines = [f"cafile {d / 'ca.crt'}", f"certfile {d / 'server.crt'}",
                 f"keyfile {d / 'server.key'}", "tls_version tlsv1.2"]  # fmt: skip
        if self.client_certs:
            # The certificate is the identity: its CN is the username, and the client id (so
            # nobody connects under another identity's client id).
            lines += ["require_certificate true", "use_identity_as_username true",
                      "use_username_as_clientid true"]  # fmt: skip
        return lines

    def _openssl(self, *args: str, cwd: Path | None = None) -> None:
        subprocess.run(["openssl", *args], cwd=cwd or self.workdir / "tls", check=True,
                       capture_output=True)  # fmt: skip

    def issue_certificate(
        self, name: str, *, ca: tuple[Path, Path] | None = None
    ) -> tuple[Path, Path]:
        """A client certificate (and key) with CN `name`, signed by the rig's CA (or by `ca`,
        a (certificate, key) pair of another CA)."""
        d = self.workdir / "tls" / "clients"
        d.mkdir(parents=True, exist_ok=True)
        tag = name if ca is None else f"{name}.{ca[0].stem}"
        cert, key = d / f"{tag}.crt", d / f"{tag}.key"
        if cert.exists():
            return cert, key
        ca_cert, ca_key = ca or (self.workdir / "tls" / "ca.crt", self.workdir / "tls" / "ca.key")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                      "-keyout", str(key), "-out", str(d / f"{tag}.csr"), cwd=d)  # fmt: skip
        self._openssl("x509", "-req", "-in", str(d / f"{tag}.csr"), "-CA", str(ca_cert),
                      "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
                      "-out", str(cert), cwd=d)  # fmt: skip
        return cert, key

    def _security(self, binary: str) -> list[str]:
        if self.anonymous:
            return ["allow_anonymous true"]
        doc = broker_security(ADMIN, self.admin_secret)
        if self.users:
            doc["roles"].append({"rolename": SUPERUSER_ROLE, "acls": [
                {"acltype": t, "topic": "#", "allow": True}
                for t in ("publishClientSend", "publishClientReceive", "subscribePattern",
                          "unsubscribePattern")]})  # fmt: skip
            for user, secret in self.users.items():
                doc["clients"].append({"username": user, "textname": "rig superuser",
                                       **hashed(secret),
                                       "roles": [{"rolename": SUPERUSER_ROLE}]})  # fmt: skip
        path = self.workdir / "dynamic-security.json"
        if not path.exists():  # a restart keeps what was granted and revoked meanwhile
            path.write_text(json.dumps(doc, indent=1))
            path.chmod(0o600)
        return ["allow_anonymous false", f"plugin {find_dynsec_plugin(binary)}",
                f"plugin_opt_config_file {path}"]  # fmt: skip

    def start(self, timeout: float = 20.0) -> Mosquitto:
        binary = ensure_mosquitto()
        config = self.workdir / "mosquitto.conf"
        config.write_text(
            "\n".join(
                [
                    # Started as root, Mosquitto drops to the 'mosquitto' user, which cannot
                    # write its log or its persistence into our private work directory.
                    f"user {getpass.getuser()}",
                    f"listener {self.port} {self.host}",
                    *(self._certificates() if self.tls else []),
                    *self._security(binary),
                    "persistence true",
                    f"persistence_location {self.workdir}/",
                    *([] if self.site else ["autosave_interval 1"]),
                    # A unit acknowledges a device message only once what it produced is safe,
                    # so under load its session's queue grows: QoS 1 messages beyond this
                    # limit would be dropped by the broker. Not 0 ("no limit"): with it,
                    # Mosquitto 2.0.11 drops a client whose QoS 1 publish it has just denied
                    # (memory_limit, set by operators, bounds the broker as a whole).
                    "max_queued_messages 1000000",
                    f"max_inflight_messages {1000 if self.site else 100}",
                    *(["max_packet_size 4194304"] if self.site else []),
                    f"log_dest file {self.workdir / 'mosquitto.log'}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "",
                ]
            )
        )
        self._spawn([binary, "-c", str(config)])
        self._wait(lambda: port_open(self.host, self.port), timeout, "listening")
        return self

    def identities(
        self, topics: TopicScheme | None = None, audit: AuditLog | None = None
    ) -> Identities:
        """An administrator's session on this broker (use it in a `with` block of its admin)."""
        admin = BrokerAdmin(self.admin_settings())
        return Identities(
            admin, topics=topics, audit=audit or AuditLog(self.workdir / "audit.jsonl")
        )
