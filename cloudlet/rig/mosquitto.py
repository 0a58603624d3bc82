"""A real Mosquitto broker on a loopback port, installed from Debian's packages when missing."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from cloudlet.rig.apt import apt_install
from cloudlet.rig.process import RigError, Service, free_port, port_open

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


class Mosquitto(Service):
    """Mosquitto listening on 127.0.0.1:`port`, with persistence (QoS 1 sessions survive)."""

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        tls: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tls = tls
        self.users = users  # username -> password; None: anonymous clients allowed
        self.ca_file: Path | None = None  # the CA that signed the broker's certificate

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def _certificates(self) -> list[str]:
        """A private CA and a certificate for 127.0.0.1 signed by it (openssl)."""
        d = self.workdir / "tls"
        d.mkdir(exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                "/CN=cloudlet test CA", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={self.host}",
                "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
        (d / "san.ext").write_text(f"subjectAltName=IP:{self.host},DNS:localhost\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
                "-out", "server.crt")  # fmt: skip
        self.ca_file = d / "ca.crt"
        return [f"cafile {d / 'ca.crt'}", f"certfile {d / 'server.crt'}",
                f"keyfile {d / 'server.key'}", "tls_version tlsv1.2"]  # fmt: skip

    def _password_file(self, binary: str) -> list[str]:
        assert self.users is not None
        path = self.workdir / "passwords"
        path.write_text("".join(f"{user}:{password}\n" for user, password in self.users.items()))
        path.chmod(0o600)
        tool = Path(binary).with_name("mosquitto_passwd")
        if not tool.exists():
            tool = Path(shutil.which("mosquitto_passwd") or "mosquitto_passwd")
        subprocess.run([str(tool), "-U", str(path)], check=True, capture_output=True)  # hash
        return ["allow_anonymous false", f"password_file {path}"]

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
                    *(self._password_file(binary) if self.users else ["allow_anonymous true"]),
                    "persistence true",
                    f"persistence_location {self.workdir}/",
                    "autosave_interval 1",
                    # A unit acknowledges a device message only once what it produced is safe,
                    # so under load its session's queue grows: QoS 1 messages beyond this
                    # limit would be dropped by the broker. 0: no limit (memory_limit, set
                    # by operators, bounds the broker as a whole).
                    "max_queued_messages 0",
                    "max_inflight_messages 100",
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
