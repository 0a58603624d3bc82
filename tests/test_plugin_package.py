"""A plug-in written by someone else: `cloudlet processor new`, built and installed as its own
package, found by name through its entry point, tested offline and run by a unit over the
real Mosquitto."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from cloudlet.rig import Mosquitto
from edge_objects.fleet import DeviceFleet
from processors.chain import foreign
from processors.config import UnitConfig
from processors.unit import Unit
from streams import SensorUpdate, StreamKey
from streams.transport.mqtt import MqttSettings
from tests.test_cli import CLOUDLET
from tests.test_unit import Collector

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only


def _run(*args: str, cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "COLUMNS": "200"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The scaffolded package `peak-detector`, installed into a directory of its own."""
    root = tmp_path_factory.mktemp("plugin")
    site = root / "site"
    done = _run(CLOUDLET, "processor", "new", "peak-detector", "--dir", str(root), cwd=root,
                site=site)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "created" in done.stdout
    package = root / "peak-detector"
    done = _run(sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
                "--no-deps", "--target", str(site), str(package), cwd=root, site=site)  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield package, site


def test_the_scaffold_passes_its_own_tests(installed: tuple[Path, Path]) -> None:
    package, site = installed
    done = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package,
                site=site)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout


def test_the_installed_plugin_is_listed_and_runs_offline(installed: tuple[Path, Path]) -> None:
    package, site = installed
    listed = _run(CLOUDLET, "processor", "list", cwd=package, site=site)
    assert listed.returncode == 0, listed.stderr
    assert "peak-detector" in listed.stdout and "channel: string" in listed.stdout
    done = _run(CLOUDLET, "flow", "test", "--unit", "example/unit.yaml", "-i",
                "example/input.jsonl", cwd=package, site=site)  # fmt: skip
    assert done.returncode == 0, done.stderr
    smoothed = [orjson.loads(line)["update"]["channels"]["smoothed"]["current-value"]
                for line in done.stdout.splitlines()]  # fmt: skip
    assert smoothed == [10.0, 15.0, 17.5]


def test_a_name_clash_with_an_existing_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "smoothing").mkdir()
    done = _run(CLOUDLET, "processor", "new", "smoothing", "--dir", str(tmp_path), cwd=tmp_path,
                site=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert f"{tmp_path / 'smoothing'} already exists" in done.stderr
    done = _run(CLOUDLET, "processor", "new", "Bad Name", cwd=tmp_path, site=tmp_path)
    assert done.returncode == 1 and "is not a usable name" in done.stderr


@pytest.mark.mqtt
def test_a_unit_runs_the_installed_plugin_by_name(
    installed: tuple[Path, Path], mosquitto: Mosquitto, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    package, site = installed
    monkeypatch.syspath_prepend(str(site))  # what an install into the unit's environment does
    path = tmp_path / "unit.yaml"
    path.write_text(
        (package / "example" / "unit.yaml").read_text()
        .replace("objects/", str(package / "example" / "objects"))
        .replace("mqtt://127.0.0.1:1883", mosquitto.url)
    )  # fmt: skip
    config = UnitConfig.load(path)
    uses = [p.use for p in config.processors]
    # another distribution's processor: `cloudlet unit run` lets OpenSSL in for its code
    assert uses and foreign([*uses, "window"]) == uses
    unit = Unit(config).start()
    collector = Collector(mosquitto, "collector-plugin-package")
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-plugin-package").start()
    try:
        assert unit.runtime.connected.wait(10)
        for i, x in enumerate([10.0, 20.0, 20.0]):
            fleet.publish(StreamKey("sensor-1", "temperature"), SensorUpdate({"celsius": x}, i))
        got = collector.take(lambda g: len([t for t, _ in g if "/smoothed/" in t]) >= 3)
    finally:
        fleet.stop()
        collector.close()
        unit.stop()
    assert [b["channels"]["smoothed"]["current-value"] for t, b in got
            if t == "sensor-1/streams/smoothed/updates"] == [10.0, 15.0, 17.5]  # fmt: skip
