"""The docker-compose demos: both files validate (`docker compose config`), the configs they
mount are valid and name the scenario files the native demo uses, and the image's Dockerfile
copies what the package needs. tests/test_compose_up.py starts them."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from cloud_sync.cloud import CloudSettings
from cloudlet.rig import Mosquitto
from cloudlet.rig.apt import compose_command
from cloudlet.unit_file import UnitFile
from streams.catalog import Catalog
from streams.transport.mqtt import MqttSettings, make_client
from tests.conftest import ROOT

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

COMPOSE = ROOT / "compose"


def _in_repo(path: str | Path) -> Path:
    """Where a path inside the image (/app/...) is in this checkout."""
    return ROOT / str(path).removeprefix("/app/")


@pytest.mark.parametrize("scenario", ["irrigation", "smart-city"])
def test_the_compose_file_validates(scenario: str) -> None:
    done = subprocess.run([*compose_command(), "-f", str(COMPOSE / scenario / "docker-compose.yml"),
                           "config"], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert set(services) == {"site", "mosquitto", "kafka", "unit", "simulator", "cloud"}
    # secure by default: the broker waits for its identities, everyone logs in
    assert services["site"]["command"][:2] == ["site", "init"]
    assert services["mosquitto"]["depends_on"]["site"]["condition"] == (
        "service_completed_successfully"
    )
    assert "--credentials" in services["simulator"]["command"]
    conf = (COMPOSE / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf and "allow_anonymous true" not in conf
    assert any(line.startswith("plugin ") for line in conf)
    # nothing published beyond this machine: the dashboard on loopback, the unit unpublished
    assert [str(p).split(":")[0] for p in services["cloud"]["ports"]] == ["127.0.0.1"]
    assert "ports" not in services["unit"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["unit"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("mosquitto", "kafka", "unit", "cloud"):
        assert "healthcheck" in services[name], name
    assert services["simulator"]["command"][:2] == ["simulate", scenario]


def _provisioned(scenario: str, site: Path) -> dict[str, str]:
    """`cloudlet site init` as the compose file runs it, into `site`; the unit file with its
    /site/ paths pointed there."""
    command = yaml.safe_load((COMPOSE / scenario / "docker-compose.yml").read_text())
    args = command["services"]["site"]["command"]
    args = [a for a in args if a not in ("--owner", "1883:1883", "--secrets-owner", "cloudlet")]
    args = [str(site) if a == "/site" else str(_in_repo(a)) if a.startswith("/app/") else a
            for a in args]  # fmt: skip
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "cloudlet"), *args], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = (COMPOSE / scenario / "unit.yaml").read_text().replace("/site/", f"{site}/")
    (site / "unit.yaml").write_text(text)
    return {"unit": str(site / "unit.yaml")}


@pytest.mark.parametrize("scenario", ["irrigation", "smart-city"])
def test_the_mounted_configs_are_valid_and_shared_with_the_native_demo(
    scenario: str, tmp_path: Path
) -> None:
    unit = UnitFile.load(Path(_provisioned(scenario, tmp_path)["unit"]))
    objects = [_in_repo(p) for p in unit.objects]
    assert objects == [ROOT / "cloudlet" / "scenarios" / scenario / "objects"]
    assert Catalog.check(objects)[1] == []
    assert unit.forward is not None and unit.forward.kafka is not None
    cloud = CloudSettings.load(COMPOSE / scenario / "cloud.yaml")
    assert cloud.dashboard is not None and _in_repo(cloud.dashboard).exists()
    assert cloud.kafka is not None and cloud.kafka.topic == unit.forward.kafka.topic


def test_the_dockerfile_copies_every_package() -> None:
    text = (COMPOSE / "Dockerfile").read_text()
    assert "COPY . /app" in text and "ARG BASE=" in text and "FROM ${BASE}" in text
    allowed = {
        line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    for package in ("streams", "processors", "edge_objects", "cloud_sync", "cloudlet"):
        assert package in allowed and (ROOT / package / "__init__.py").exists()
    assert {"pyproject.toml", "setup.py", "README.md"} <= allowed


@pytest.mark.mqtt
def test_the_provisioned_site_admits_its_unit_relay_and_devices_and_nobody_else(
    tmp_path: Path,
) -> None:
    """The compose stack's `site init`, loaded by a real Mosquitto: the unit and its relay log
    in with their secret files, each device with devices.json, anonymous is refused."""
    _provisioned("irrigation", tmp_path)
    unit = UnitFile.load(tmp_path / "unit.yaml")
    assert unit.forward is not None and unit.forward.command_mqtt is not None
    devices = json.loads((tmp_path / "devices.json").read_text())
    objects = Catalog.load([_in_repo(p) for p in unit.objects]).registry.objects
    assert set(devices) == set(objects)
    assert oct((tmp_path / "secrets" / "irrigation-unit").stat().st_mode)[-3:] == "600"
    broker = Mosquitto(tmp_path / "broker")
    broker.workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "dynamic-security.json", broker.workdir / "dynamic-security.json")
    broker.start()
    try:
        url = broker.plain_url
        logins = [
            (unit.mqtt.model_copy(update={"url": url}), unit.name),
            (unit.forward.command_mqtt.model_copy(update={"url": url}), f"{unit.name}-relay"),
            *((MqttSettings(url=url, username=so, password=secret), so)
              for so, secret in sorted(devices.items())[:3]),
        ]  # fmt: skip
        for settings, client_id in logins:
            assert _connack(settings, client_id) == 0, client_id
        assert _connack(MqttSettings(url=url), "anyone") in (0x86, 0x87)
    finally:
        broker.stop()


def _connack(settings: MqttSettings, client_id: str) -> int | None:
    got: list[int] = []
    done = threading.Event()
    client = make_client(settings, client_id)
    client.on_connect = lambda _c, _u, _f, reason, _p: (got.append(int(reason.value)),
                                                        done.set())  # fmt: skip
    client.connect_async(settings.host, settings.port)
    client.loop_start()
    try:
        done.wait(10)
        return got[0] if got else None
    finally:
        client.disconnect()
        client.loop_stop()
