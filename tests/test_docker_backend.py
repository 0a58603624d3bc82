"""The control plane's Docker backend against a real Docker Engine.

The rig uses the engine that answers at DOCKER_HOST or /var/run/docker.sock, or starts Debian's
dockerd (vfs storage, no bridge). The image is built here from compose/Dockerfile on a Debian
base made with debootstrap (no registry is reachable); the first run takes minutes, later runs
reuse the engine's images. Containers use host networking: everything stays on loopback.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudlet.control import Controller
from cloudlet.control_model import ControlError
from cloudlet.placement import Plan
from cloudlet.rig import Mosquitto
from cloudlet.rig.docker import DockerEngine, project_image

pytestmark = [pytest.mark.docker, pytest.mark.mqtt, pytest.mark.timeout(1800)]

OBJECTS = (
    Path(__file__).resolve().parent.parent / "cloudlet" / "scenarios" / "irrigation" / "objects"
)


@pytest.fixture(scope="module")
def images(engine: DockerEngine) -> tuple[str, str, str]:
    """The project's image, a second tag of it (a patch that works) and an image whose units
    exit at once (a patch that fails)."""
    client = engine.client()
    good = project_image(client, say=lambda _: None)
    client.images.get(good).tag("cloudlet-test", "v2")
    broken = f'FROM {good}\nENTRYPOINT ["python3", "-c", "import sys; sys.exit(3)"]\n'
    client.images.build(fileobj=io.BytesIO(broken.encode()), tag="cloudlet-test:broken", rm=True)
    return good, "cloudlet-test:v2", "cloudlet-test:broken"


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto, engine: DockerEngine,
    images: tuple[str, str, str],
) -> Iterator[Path]:  # fmt: skip
    work = tmp_path_factory.mktemp("docker-control")
    unit = {"name": "irrigation", "objects": [str(OBJECTS)], "mqtt": {"url": mosquitto.url},
            "checkpoint": {"every": "1s"}, "http": {"host": "127.0.0.1"},
            "derive": False}  # replicas sharing the messages: nothing keyed  # fmt: skip
    (work / "irrigation.yaml").write_text(yaml.safe_dump(unit))
    docker = {"docker": engine.url}
    topology = {
        "name": "farm-docker",
        "sites": {
            "field": {"location": {"lat": 41.6168, "lon": 0.6226}, "engine": docker},
            "town": {"location": {"lat": 41.6560, "lon": 0.5760}, "engine": docker},
        },
        "units": {"irrigation": {"config": "irrigation.yaml", "image": images[0], "replicas": 2,
                                 "resources": {"cpu": 0.5, "memory": "256Mi"}}},
    }  # fmt: skip
    (work / "topology.yaml").write_text(yaml.safe_dump(topology))
    yield work
    with contextlib.suppress(ControlError):  # a test that failed before deploying
        Controller(work / "state", say=lambda _: None).shutdown(timeout=10)


def _containers(engine: DockerEngine) -> dict[str, Any]:
    found = engine.client().containers.list(
        all=True, filters={"label": "io.cloudlet.topology=farm-docker"}
    )
    return {c.labels["io.cloudlet.replica"]: c for c in found}


def _versions(control: Controller) -> dict[str, str]:
    return {r.replica: r.version for r in control.actual(control.topology()).values()}


def test_deploy_runs_one_container_per_replica_with_limits_and_labels(
    site: Path, engine: DockerEngine, images: tuple[str, str, str]
) -> None:
    control = Controller(site / "state", say=lambda _: None)
    from cloudlet.topology import Topology

    topology = Topology.load(site / "topology.yaml")
    assert control.apply(topology, control.plan(topology), timeout=90)
    containers = _containers(engine)
    assert sorted(containers) == ["irrigation-0", "irrigation-1"]
    c = containers["irrigation-0"]
    assert c.name == "cloudlet-farm-docker-irrigation-0" and c.status == "running"
    assert c.labels["io.cloudlet.site"] == "field" and images[0] in c.image.tags
    host = c.attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 256 * 2**20
    assert host["NetworkMode"] == "host" and host["RestartPolicy"]["Name"] == "on-failure"
    _, rows = control.status()
    assert [(r.replica, r.site, r.state) for r in rows] == [
        ("irrigation-0", "field", "ready"), ("irrigation-1", "town", "ready"),
    ]  # fmt: skip


def test_a_killed_container_is_healed_by_the_reconcile_loop(
    site: Path, engine: DockerEngine
) -> None:
    control = Controller(site / "state", say=lambda _: None)
    _containers(engine)["irrigation-1"].kill()
    deadline = time.monotonic() + 30
    while _containers(engine)["irrigation-1"].status == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    steps = control.reconcile()
    assert [(s.action, s.replica, s.detail) for s in steps] == [
        ("restart", "irrigation-1", "it has exited (restart 1)")
    ]
    desired = control.desired(control.topology(), Plan.from_json(control.control.plan))
    assert control.wait_ready(desired["irrigation-1"], 60)
    assert _containers(engine)["irrigation-1"].status == "running"


def test_patches_roll_and_an_unhealthy_image_is_rolled_back(
    site: Path, engine: DockerEngine, images: tuple[str, str, str]
) -> None:
    lines: list[str] = []
    control = Controller(site / "state", say=lines.append)
    before = _versions(control)
    assert control.patch("irrigation", image=images[1], timeout=90)
    after = _versions(control)
    assert len(set(after.values())) == 1 and after != before
    assert all(images[1] in c.image.tags for c in _containers(engine).values())
    lines.clear()
    assert not control.patch("irrigation", image=images[2], timeout=30)
    assert any("rolling back" in line for line in lines)
    assert _versions(control) == after
    assert all(
        images[1] in c.image.tags and c.status == "running" for c in _containers(engine).values()
    )


def test_evacuation_moves_the_containers_and_shutdown_removes_them(
    site: Path, engine: DockerEngine
) -> None:
    control = Controller(site / "state", say=lambda _: None)
    assert control.evacuate("field", timeout=90)
    assert {r: c.labels["io.cloudlet.site"] for r, c in _containers(engine).items()} == {
        "irrigation-0": "town", "irrigation-1": "town",
    }  # fmt: skip
    _, rows = control.status()
    assert {r.state for r in rows} == {"ready"}
    assert len(control.shutdown(timeout=15)) == 2
    assert _containers(engine) == {}
