"""The docker-compose demos: both files validate (`docker compose config`), the configs they
mount are valid and name the scenario files the native demo uses, and the image's Dockerfile
copies what the package needs. (No Docker engine runs here, so the stacks are not started.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cloud_sync.cloud import CloudSettings
from cloudlet.rig.apt import compose_command
from cloudlet.units import UnitFile
from streams.catalog import Catalog
from tests.conftest import ROOT

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
    assert set(services) == {"mosquitto", "kafka", "unit", "simulator", "cloud"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["unit"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("mosquitto", "kafka", "unit", "cloud"):
        assert "healthcheck" in services[name], name
    assert services["simulator"]["command"][:2] == ["simulate", scenario]


@pytest.mark.parametrize("scenario", ["irrigation", "smart-city"])
def test_the_mounted_configs_are_valid_and_shared_with_the_native_demo(scenario: str) -> None:
    unit = UnitFile.load(COMPOSE / scenario / "unit.yaml")
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
