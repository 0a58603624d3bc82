"""`cloudlet rig ...`: real Mosquitto, Kafka and a Docker Engine on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from cloudlet.cli_common import err, out
from cloudlet.cli_common import fail as _fail
from cloudlet.cli_common import stop_on_signals as _stop_on_signals
from cloudlet.cli_common import wait as _wait
from cloudlet.rig import Kafka, Mosquitto, RigError, ensure_kafka, ensure_mosquitto

rig_app = typer.Typer(
    help="Real Mosquitto and Kafka on loopback ports, for development and tests.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(rig_app, name="rig")


@rig_app.command("install")
def rig_install(
    demo: Annotated[
        bool, typer.Option("--demo", help="Only what `cloudlet demo` uses: Mosquitto.")
    ] = False,
) -> None:
    """Install Mosquitto, PostgreSQL, Chromium, docker-compose, dockerd and debootstrap (Debian
    packages) and resolve Kafka's jars (Maven Central); with --demo, Mosquitto only."""
    from cloudlet.rig import ensure_postgres
    from cloudlet.rig.apt import compose_command
    from cloudlet.rig.browser import ensure_chromium
    from cloudlet.rig.docker import ensure_docker

    try:
        out.print(f"mosquitto: {ensure_mosquitto()}")
        if demo:
            return
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


@rig_app.command("standins")
def rig_standins() -> None:
    """Build local stand-ins for the official images the compose demos run
    (eclipse-mosquitto, apache/kafka) and the project's image, on the engine at DOCKER_HOST,
    for machines with no registry; prints the variables that select them."""
    from cloudlet.rig.docker import DockerEngine, project_image, standin_images

    try:
        if not os.environ.get("DOCKER_HOST"):
            raise RigError("set DOCKER_HOST to an engine (`cloudlet rig docker` starts one)")
        engine = DockerEngine(Path(tempfile.mkdtemp(prefix="cloudlet-docker-"))).start()
        client = engine.client()
        images = {"CLOUDLET_IMAGE": project_image(client, say=err.print),
                  **standin_images(client, say=err.print)}  # fmt: skip
        for variable, tag in images.items():
            out.print(f"export {variable}={tag}")
    except RigError as exc:
        raise _fail(str(exc)) from None
