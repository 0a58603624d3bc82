"""A real PostgreSQL server on a loopback port, from Debian's packages (installed when
missing): its own cluster in the work directory, trust authentication on 127.0.0.1 only."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from cloudlet.rig.apt import apt_install
from cloudlet.rig.process import RigError, Service, free_port, port_open


def find_postgres() -> Path | None:
    """The bin directory of the newest installed PostgreSQL."""

    def version(p: Path) -> int:
        name = p.parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=version)
    return found[-1].parent if found else None


def ensure_postgres() -> Path:
    found = find_postgres()
    if found:
        return found
    apt_install("postgresql")
    found = find_postgres()
    if not found:
        raise RigError("apt-get installed postgresql but no server binary was found")
    return found


class Postgres(Service):
    """PostgreSQL on 127.0.0.1:`port`, database `cloudlet`, user `cloudlet` (trust)."""

    name = "postgres"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.home = self.workdir  # where the cluster lives

    @property
    def url(self) -> str:
        return f"postgresql://cloudlet@{self.host}:{self.port}/cloudlet"

    def _as_owner(self, argv: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root: run it as the package's postgres user
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self, timeout: float = 60.0) -> Postgres:
        bin_dir = ensure_postgres()
        home = self.workdir
        if os.geteuid() == 0:
            # The postgres user may not be able to reach our work directory (pytest's are
            # private to root): the cluster lives in a directory of its own, owned by it.
            home = Path(tempfile.mkdtemp(prefix="cloudlet-postgres-"))
            owner = pwd.getpwnam("postgres")
            os.chown(home, owner.pw_uid, owner.pw_gid)
            (self.workdir / "cluster").write_text(f"{home}\n")
        self.home = home
        data = home / "data"
        done = subprocess.run(
            self._as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", "cloudlet",
                            "--auth=trust", "--no-sync", "-E", "UTF8"]),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RigError(f"initdb failed:\n{(done.stdout + done.stderr)[-2000:]}")
        self._spawn(self._as_owner([
            str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
            "-c", f"listen_addresses={self.host}", "-c", f"unix_socket_directories={home}",
            "-c", "fsync=off", "-c", "synchronous_commit=off",
        ]))  # fmt: skip
        self._wait(lambda: port_open(self.host, self.port), timeout, "listening")
        self._wait(self._created, timeout, "creating the database")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        if self.home != self.workdir:
            shutil.rmtree(self.home, ignore_errors=True)

    def _created(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(f"postgresql://cloudlet@{self.host}:{self.port}/postgres",
                                 autocommit=True, connect_timeout=2) as conn:  # fmt: skip
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'cloudlet'")
                if exists.fetchone() is None:
                    conn.execute("CREATE DATABASE cloudlet")
        except psycopg.OperationalError:
            return False  # still starting
        return True
