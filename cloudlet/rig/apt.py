"""Debian packages the rig needs, installed with apt-get when missing (as root)."""

from __future__ import annotations

import os
import shutil
import subprocess

from cloudlet.rig.process import RigError


def apt_install(*packages: str) -> None:
    """Install Debian packages; RigError saying what to install by hand when we cannot."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RigError(f"{', '.join(packages)} not installed and cannot be installed here"
                       f" (needs root and apt-get); install the Debian packages:"
                       f" {' '.join(packages)}")  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    for argv in (["apt-get", "update", "-qq"], install):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RigError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")


def compose_command() -> list[str]:
    """`docker compose` (the v2 plugin) when present, else Debian's `docker-compose`
    (installed when missing): what validates the demos' compose files."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True,
                               check=False)  # fmt: skip
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        apt_install("docker-compose")
    return ["docker-compose"]
