"""A real Docker Engine for the control plane's tests, and the images they run.

No container registry is reachable on the development machines, so nothing is pulled:
- `DockerEngine` uses the engine at DOCKER_HOST (or /var/run/docker.sock) when one answers,
  and otherwise starts Debian's `dockerd` (the docker.io package, installed when missing) with
  the vfs storage driver and no bridge or iptables rules: containers use host networking, so
  all their traffic stays on loopback. Its data lives in the rig's cache, so images built once
  are there for the next run.
- `base_image` makes a minimal Debian root file system with debootstrap (python3, its venv
  module and headers, gcc) and imports it as `cloudlet-base:bookworm`. It carries this
  machine's CA certificates (and a pip.conf pointing at them), so pip inside a build trusts
  what the host trusts.
- `project_image` builds `compose/Dockerfile` on that base (the BASE build argument).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from cloudlet.rig.apt import apt_install
from cloudlet.rig.kafka import cache_dir
from cloudlet.rig.process import RigError, log_tail

BASE_IMAGE = "cloudlet-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates,passwd"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
ROOT = Path(__file__).resolve().parents[2]


def ensure_docker() -> str:
    """dockerd and debootstrap (Debian's docker.io and debootstrap), installed when missing."""
    if shutil.which("dockerd") is None or shutil.which("debootstrap") is None:
        apt_install("docker.io", "debootstrap")
    found = shutil.which("dockerd")
    if found is None:
        raise RigError("apt-get installed docker.io but dockerd is not on PATH")
    return found


def _client(url: str) -> Any:
    import docker

    return docker.DockerClient(base_url=url, timeout=300)


def _answers(url: str) -> bool:
    try:
        _client(url).ping()
        return True
    except Exception:
        return False


class DockerEngine:
    """An engine to talk to: the one already running, or a `dockerd` of our own."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.out"

    def start(self, timeout: float = 60.0) -> DockerEngine:
        for url in (os.environ.get("DOCKER_HOST", ""), "unix:///var/run/docker.sock"):
            if url and _answers(url):
                self.url = url
                return self
        dockerd = ensure_docker()
        data = cache_dir() / "docker"
        data.mkdir(parents=True, exist_ok=True)
        # unix socket paths are short: the exec root and socket go under /tmp
        run = Path(tempfile.mkdtemp(prefix="cld-", dir="/tmp"))
        self.url = f"unix://{run}/docker.sock"
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [dockerd, "--data-root", str(data / "root"), "--exec-root", str(run / "exec"),
                 "--pidfile", str(run / "docker.pid"), "-H", self.url, "--storage-driver=vfs",
                 "--iptables=false", "--ip6tables=false", "--bridge=none"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RigError(
                    f"dockerd exited with code {self.process.returncode}; last lines of"
                    f" {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if _answers(self.url):
                return self
            time.sleep(0.3)
        self.stop()
        raise RigError(f"dockerd did not answer within {timeout:.0f} s:\n{log_tail(self.log_path)}")

    def client(self) -> Any:
        return _client(self.url)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def base_image(client: Any, *, say: Any = print) -> str:
    """`cloudlet-base:bookworm`, made with debootstrap and imported when the engine lacks it."""
    with contextlib.suppress(Exception):
        client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        ensure_docker()
    root = cache_dir() / "debootstrap-bookworm"
    if not (root / "usr" / "bin" / "python3").exists():
        shutil.rmtree(root, ignore_errors=True)
        say(f"debootstrap: a minimal Debian into {root} (a few minutes, once)")
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
             str(root), DEBIAN_MIRROR],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RigError(f"debootstrap failed ({done.returncode}):\n{done.stdout[-2000:]}")
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        shutil.copyfile(bundle, root / "etc/ssl/certs/ca-certificates.crt")
        (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        repository, tag = BASE_IMAGE.split(":")
        client.api.import_image(src=str(archive), repository=repository, tag=tag)
    return BASE_IMAGE


def project_image(client: Any, tag: str | None = None, *, say: Any = print) -> str:
    """The project's image (compose/Dockerfile) on the local base; tagged by the content of
    what it copies, so an unchanged tree is not built twice."""
    digest = hashlib.sha256()
    for path in sorted(_sources()):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    tag = tag or f"cloudlet:{digest.hexdigest()[:12]}"
    with contextlib.suppress(Exception):
        client.images.get(tag)
        return tag
    base = base_image(client, say=say)
    say(f"docker build {tag} on {base} (pip installs the project in the image)")
    _build(client, ROOT, tag, base, dockerfile="compose/Dockerfile")
    for image in client.images.list(name="cloudlet"):  # earlier trees' images: vfs is not small
        if tag not in image.tags and all(t.startswith("cloudlet:") for t in image.tags):
            with contextlib.suppress(Exception):
                client.images.remove(image.id, force=True)
    return tag


def _sources() -> list[Path]:
    names = ("pyproject.toml", "setup.py", "README.md", "compose/Dockerfile", ".dockerignore")
    out = [ROOT / n for n in names if (ROOT / n).exists()]
    for package in ("streams", "processors", "edge_objects", "cloud_sync", "cloudlet"):
        out += [p for p in (ROOT / package).rglob("*")
                if p.is_file() and p.suffix in (".py", ".pyx", ".yaml", ".json", ".html", ".js",
                                                ".css", ".toml", ".conf")]  # fmt: skip
    return out


STANDINS = ROOT / "compose" / "standins"
MOSQUITTO_STANDIN = "cloudlet-standin/mosquitto"
KAFKA_STANDIN = "cloudlet-standin/kafka"


def standin_images(client: Any, *, say: Any = print) -> dict[str, str]:
    """Local stand-ins for the official images the compose demos run (eclipse-mosquitto,
    apache/kafka), for machines with no registry: the variables that select them
    (MOSQUITTO_IMAGE, KAFKA_IMAGE) and their tags. Built on the local base from
    compose/standins/ (Mosquitto and Java from Debian's packages, Kafka from the jars the rig
    resolved with Maven); tagged by what they are built from, so built once."""
    from cloudlet.rig.kafka import KAFKA_VERSION, ensure_kafka

    base = base_image(client, say=say)
    libs = ensure_kafka()
    images = {}
    for variable, name, folder, version in (
        ("MOSQUITTO_IMAGE", MOSQUITTO_STANDIN, STANDINS / "mosquitto", "2"),
        ("KAFKA_IMAGE", KAFKA_STANDIN, STANDINS / "kafka", KAFKA_VERSION),
    ):
        digest = hashlib.sha256(base.encode())
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
        tag = f"{name}:{version}-{digest.hexdigest()[:12]}"
        images[variable] = tag
        with contextlib.suppress(Exception):
            client.images.get(tag)
            continue
        say(f"docker build {tag} (a stand-in for the official image; apt in the build)")
        with tempfile.TemporaryDirectory() as tmp:
            context = Path(tmp) / "context"
            shutil.copytree(folder, context)
            if name == KAFKA_STANDIN:
                shutil.copytree(libs, context / "libs")
            _build(client, context, tag, base)
    return images


def _build(client: Any, context: Path, tag: str, base: str,
           dockerfile: str = "Dockerfile") -> None:  # fmt: skip
    """`docker build` of `context` on `base` (host network: apt and pip reach what the host
    reaches); a failure says the build log's last lines."""
    from docker.errors import BuildError

    try:
        client.images.build(path=str(context), dockerfile=dockerfile, tag=tag, rm=True,
                            buildargs={"BASE": base}, network_mode="host")  # fmt: skip
    except BuildError as exc:
        lines = "".join(str(chunk.get("stream", chunk.get("error", ""))) for chunk in exc.build_log)
        raise RigError(f"docker build {tag} failed: {exc.msg}\n{lines[-3000:]}") from None
