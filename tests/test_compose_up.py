"""Both compose demos started for real (`docker compose up`, Debian's `docker-compose` where the
v2 plugin is missing) on the rig's Docker Engine: the project's image built from this checkout,
the broker and Kafka from local stand-ins of the official images (no registry is reachable
here; MOSQUITTO_IMAGE and KAFKA_IMAGE select them). The simulated devices' updates must reach
the cloud service: its API, its dashboard's data and its view of the unit's health."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloudlet.rig.apt import compose_command
from cloudlet.rig.docker import DockerEngine, project_image, standin_images
from cloudlet.rig.process import free_port
from tests.conftest import ROOT

# the first test's budget holds the images' builds (on a clean machine: a Debian base with
# debootstrap, the project's image and the stand-ins; about five minutes on two cores)
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

# what each demo's dashboard must chart once devices have posted for a while: its first chart,
# a window the unit derives (the data went through the unit's flows, not only past it)
EXPECTED = {
    "irrigation": "Soil moisture per field, 10-minute average (%)",
    "smart-city": "Vehicles per minute per junction",
}


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> dict[str, str]:
    client = engine.client()
    return {"CLOUDLET_IMAGE": project_image(client, say=lambda _: None),
            **standin_images(client, say=lambda _: None)}  # fmt: skip


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return orjson.loads(answer.read())


def _compose(env: dict[str, str], project: str, scenario: str, *args: str,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:  # fmt: skip
    file = ROOT / "compose" / scenario / "docker-compose.yml"
    return subprocess.run([*compose_command(), "-p", project, "-f", str(file), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def stacks(engine: DockerEngine, images: dict[str, str]) -> Iterator[dict[str, dict[str, str]]]:
    """Both demos brought up at once (each waits mostly for its Kafka and health checks: side
    by side, the two cost about what one does); each test checks its own, then both go down."""
    envs = {
        scenario: {**os.environ, **images, "DOCKER_HOST": engine.url,
                   "DASHBOARD_PORT": str(free_port()), "COMPOSE_HTTP_TIMEOUT": "300"}
        for scenario in EXPECTED
    }  # fmt: skip
    for scenario, env in envs.items():  # an earlier run's, if any
        _compose(env, _project(scenario), scenario, "down", "-v", "--remove-orphans")
    try:
        ups = {
            scenario: _compose_start(env, _project(scenario), scenario, "up", "-d", "--no-build")
            for scenario, env in envs.items()
        }
        for scenario, up in ups.items():
            _out, err = up.communicate(timeout=600)
            assert up.returncode == 0, f"{scenario}: {err[-3000:]}"
        yield envs
    finally:
        for scenario, env in envs.items():
            down = _compose(env, _project(scenario), scenario, "down", "-v", "--remove-orphans")
            assert down.returncode == 0, down.stderr[-2000:]


def _project(scenario: str) -> str:
    return f"cloudlet-test-{scenario}"


def _compose_start(env: dict[str, str], project: str, scenario: str,
                   *args: str) -> subprocess.Popen[str]:  # fmt: skip
    file = ROOT / "compose" / scenario / "docker-compose.yml"
    return subprocess.Popen([*compose_command(), "-p", project, "-f", str(file), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_the_compose_demo_comes_up_and_its_data_reaches_the_cloud(
    scenario: str, stacks: dict[str, dict[str, str]]
) -> None:
    env, project = stacks[scenario], _project(scenario)
    port = int(env["DASHBOARD_PORT"])
    base = f"http://127.0.0.1:{port}"
    deadline, last = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        try:
            objects = [o["id"] for o in _get(f"{base}/objects")]
            charts = {c["title"]: c for c in _get(f"{base}/api/dashboard")["charts"]}
            lines = charts[EXPECTED[scenario]]["lines"]
            drawn = {line["name"]: len(line["points"]) for line in lines if line["points"]}
            if objects and len(drawn) >= 2:  # two objects' windows at least
                break
            last = f"{len(objects)} objects, drawn {drawn}"
        except (OSError, ValueError, KeyError) as exc:
            last = repr(exc)
        time.sleep(3)
    else:
        logs = _compose(env, project, scenario, "logs", "--no-color", "--tail", "40")
        pytest.fail(f"{scenario}: no derived data in the cloud after 300 s ({last});"
                    f" logs:\n{logs.stdout[-8000:]}")  # fmt: skip
    # the cloud's view of the unit (its /metrics, over the compose network) counts them
    health = _get(f"{base}/api/health")
    assert health and health[0]["up"] is True, health
    # the dashboard page itself is served, with its assets from the image (no CDN)
    with urllib.request.urlopen(
        urllib.request.Request(f"{base}/", headers={"Accept": "text/html"}), timeout=10
    ) as page:
        html = page.read().decode()
    assert 'src="assets/echarts.min.js"' in html and "https://" not in html
    with urllib.request.urlopen(f"{base}/assets/echarts.min.js", timeout=10) as library:
        assert len(library.read()) > 500_000
    # every service still up (the one-shot site init exited 0)
    ps = _compose(env, project, scenario, "ps")
    assert "unit" in ps.stdout and "Exit 1" not in ps.stdout, ps.stdout


def test_the_images_are_selected_by_variables_with_the_official_names_as_defaults() -> None:
    for scenario in ("irrigation", "smart-city"):
        text = (ROOT / "compose" / scenario / "docker-compose.yml").read_text()
        assert "${MOSQUITTO_IMAGE:-eclipse-mosquitto:2}" in text
        assert "${KAFKA_IMAGE:-apache/kafka:4.1.1}" in text
        assert "pull_policy: build" in text
        assert "kafka-data:/var/lib/kafka/data" in text
    assert Path(ROOT / "compose" / "standins" / "kafka" / "Dockerfile").exists()
