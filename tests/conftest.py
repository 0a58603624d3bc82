"""Session fixtures: a real Mosquitto, Kafka and PostgreSQL, started once on free loopback
ports.

When any test of the session failed, the services' work directories (configs and logs) are
copied to `test-logs/<timestamp>/` in the checkout, and the path is printed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.rig import Kafka, Mosquitto, Postgres

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SERVIOTICY = DATA / "servioticy"


def _keep_logs_if_failed(request: pytest.FixtureRequest, workdir: Path) -> None:
    if request.session.testsfailed:
        kept = ROOT / "test-logs" / time.strftime("%Y%m%d-%H%M%S") / workdir.name
        shutil.copytree(workdir, kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("data"))
        print(f"\nlogs of {workdir.name} kept in {kept}")


@pytest.fixture(scope="session")
def mosquitto(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mosquitto]:
    # full-access test account in broker.url: tests publish as any device and read everything
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), superuser=True).start()
    try:
        yield broker
    finally:
        broker.stop()
        _keep_logs_if_failed(request, broker.workdir)


@pytest.fixture(scope="session")
def kafka(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Kafka]:
    broker = Kafka(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker
    finally:
        broker.stop()
        _keep_logs_if_failed(request, broker.workdir)


@pytest.fixture(scope="session")
def postgres(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Postgres]:
    server = Postgres(tmp_path_factory.mktemp("postgres")).start()
    try:
        yield server
    finally:
        server.stop()
        _keep_logs_if_failed(request, server.workdir)
