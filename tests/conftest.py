"""Session fixtures: a real Mosquitto, Kafka and PostgreSQL, started once on free loopback
ports.

When any test of the session failed, the services' work directories (configs and logs) are
copied to `test-logs/<timestamp>/` in the checkout, and the path is printed.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.store import CloudStore, PostgresStore, SQLiteStore
from cloudlet.rig import Kafka, Mosquitto, Postgres, RigError
from cloudlet.rig.docker import DockerEngine
from processors.packets import mqtt_string, packet, property_block
from streams.transport.mqtt import MqttSettings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SERVIOTICY = DATA / "servioticy"


def _keep_logs_if_failed(request: pytest.FixtureRequest, workdir: Path) -> None:
    if request.session.testsfailed:
        kept = ROOT / "test-logs" / time.strftime("%Y%m%d-%H%M%S") / workdir.name
        skip = shutil.ignore_patterns("data", "*.db")  # stores: large, and not for reading
        shutil.copytree(workdir, kept, dirs_exist_ok=True, ignore=skip)
        print(f"\nlogs of {workdir.name} kept in {kept}")


@pytest.fixture(scope="session")
def mosquitto(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mosquitto]:
    # full-access test account in broker.url: tests publish as any device and read everything
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), superuser=True).start()
    request.config.stash[_SHARED_BROKER] = broker
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


_SHARED_BROKER = pytest.StashKey[Mosquitto]()
# "New client connected from 127.0.0.1:4242 as u-kill (p5, c0, k60, u'test')." (c0: the
# session is kept, c1: a clean start)
_CONNECTED = re.compile(r": New client connected from \S+ as (\S+) \(p\d, c(\d)")
_GONE = re.compile(
    r": (?:Client (\S+) (?:disconnected|closed its connection|has exceeded timeout)"
    r"|Socket error on client (\S+),)"
)


@pytest.fixture(autouse=True, scope="module")
def _forget_mqtt_sessions(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test module, end the persistent sessions its clients left on the shared
    broker. Left there, every offline unit of every earlier test keeps a copy of all that later
    tests publish (a hostile test's three 40 MiB bodies made a 137 MB store), and the broker,
    saving its store every second, stalls the tests after it."""
    yield
    broker = request.config.stash.get(_SHARED_BROKER, None)
    if broker is None or not broker.running:
        return
    settings = MqttSettings(url=broker.url)
    for client_id in _offline_clients(broker.workdir / "mosquitto.log"):
        _end_session(settings, client_id)


def _offline_clients(log: Path) -> list[str]:
    """The client ids that asked the broker to keep their session and that its log last
    shows disconnected."""
    online: dict[str, bool] = {}
    kept: set[str] = set()
    for line in log.read_text(errors="replace").splitlines():
        if (m := _CONNECTED.search(line)) is not None:
            online[m.group(1)] = True
            if m.group(2) == "0":
                kept.add(m.group(1))
        elif (m := _GONE.search(line)) is not None:
            online[m.group(1) or m.group(2)] = False
    return [client_id for client_id in kept if not online[client_id]]


def _end_session(settings: MqttSettings, client_id: str) -> None:
    """Connect as `client_id` with a clean start and no session expiry, then disconnect: the
    broker discards the session and what it queued for it."""
    flags, payload = 0x02, mqtt_string(client_id)
    if settings.username is not None:
        flags, payload = flags | 0x80, payload + mqtt_string(settings.username)
        if settings.password is not None:
            flags |= 0x40
            payload += mqtt_string(settings.password.get_secret_value())
    body = mqtt_string("MQTT") + bytes([5, flags]) + (10).to_bytes(2, "big")
    try:
        with socket.create_connection((settings.host, settings.port), timeout=5) as s:
            s.sendall(packet(0x10, body + property_block(b"") + payload))
            s.recv(64)  # CONNACK
            s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        pass  # a test that left the broker stopped or unreachable: nothing to forget


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CloudStore]:
    """The cloud store on SQLite, and on the real PostgreSQL (emptied for each test)."""
    if request.param == "sqlite":
        s: CloudStore = SQLiteStore(tmp_path / "cloud.db")
    else:
        server: Postgres = request.getfixturevalue("postgres")
        s = PostgresStore(server.url)
        with s._transaction() as cur:  # a clean slate per test
            cur.execute(
                "TRUNCATE updates, channel_values, latest, alarms, alarm_state, alarm_cursors"
            )
    yield s
    s.close()


@pytest.fixture(scope="module")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kafka]:
    """A Kafka of the module's own, for tests that stop it (an outage) while others run."""
    broker = Kafka(tmp_path_factory.mktemp("kafka-own")).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A Docker Engine: the one at DOCKER_HOST, or Debian's dockerd started by the rig."""
    try:
        running = DockerEngine(tmp_path_factory.mktemp("docker")).start()
    except RigError as exc:  # the one case the tests may not run: no engine can run here
        pytest.skip(f"no Docker Engine can run on this machine: {exc}")
    yield running
    running.stop()
