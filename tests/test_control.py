"""The control plane end to end on the local backend: unit processes on a real Mosquitto.

One deployment for the module, taken through deploy, status, healing, patches, evacuation,
rebalancing and shutdown in order, as an operator would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cloudlet.backends import healthy
from cloudlet.cli import app
from cloudlet.control import Controller
from cloudlet.control_model import ControlError
from cloudlet.placement import Plan
from cloudlet.rig import Mosquitto
from edge_objects.fleet import DeviceFleet
from streams import SensorUpdate, StreamKey
from streams.transport.mqtt import MqttSettings

pytestmark = [pytest.mark.mqtt, pytest.mark.infra]  # infra: the compiled pass only

OBJECTS = (
    Path(__file__).resolve().parent.parent / "cloudlet" / "scenarios" / "irrigation" / "objects"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _unit(path: Path, mosquitto: Mosquitto, **extra: object) -> Path:
    doc = {
        "name": "irrigation",
        "objects": [str(OBJECTS)],
        "mqtt": {"url": mosquitto.url},
        "checkpoint": {"every": "1s", "messages": 100},
        "http": {"host": "127.0.0.1"},
        "derive": False,  # replicas that share the devices' messages: nothing keyed to split
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Path]:
    """A two-site topology (field and town, both local) and its state folder."""
    work = tmp_path_factory.mktemp("control")
    _unit(work / "irrigation.yaml", mosquitto)
    topology = {
        "name": "farm",
        "sites": {
            "field": {"location": {"lat": 41.6168, "lon": 0.6226}, "arch": "arm64",
                      "capacity": {"cpu": 2, "memory": "2Gi"}},
            "town": {"location": {"lat": 41.6560, "lon": 0.5760},
                     "capacity": {"cpu": 8, "memory": "16Gi"}},
        },
        "units": {"irrigation": {"config": "irrigation.yaml", "replicas": 2}},
    }  # fmt: skip
    (work / "topology.yaml").write_text(yaml.safe_dump(topology))
    yield work
    with contextlib.suppress(ControlError):  # a test that failed before deploying
        Controller(work / "state", say=lambda _: None).shutdown(timeout=10)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_plan_prints_the_placement_without_starting_anything(site: Path) -> None:
    out = _cli("plan", str(site / "topology.yaml"), "--state", str(site / "state"))
    assert "irrigation-0 │ field" in out and "irrigation-1 │ town" in out
    assert not (site / "state" / "local").exists()


def test_deploy_starts_every_replica_and_status_shows_their_rates(
    site: Path, mosquitto: Mosquitto
) -> None:
    out = _cli("deploy", str(site / "topology.yaml"), "--state", str(site / "state"))
    assert "start   irrigation-0             field" in out
    assert "deployed: every replica is ready" in out
    control = Controller(site / "state", say=lambda _: None)
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-control").start()
    stop = threading.Event()

    def devices() -> None:
        t = int(time.time() * 1000)
        while not stop.wait(0.02):
            t += 1000
            fleet.publish(StreamKey("field-1-soil", "soil"),
                          SensorUpdate({"moisture": 30.0, "temperature": 18.0}, t))  # fmt: skip

    thread = threading.Thread(target=devices)
    thread.start()
    try:
        time.sleep(0.5)
        _, rows = control.status(sample=1.5)
    finally:
        stop.set()
        thread.join()
        fleet.stop()
    assert [(r.replica, r.site, r.state) for r in rows] == [
        ("irrigation-0", "field", "ready"), ("irrigation-1", "town", "ready"),
    ]  # fmt: skip
    assert sum(r.rates["messages"] for r in rows) > 5  # the shared subscription splits them
    out = _cli("status", "--state", str(site / "state"), "--sample", "0")
    assert "field" in out and "2/2 ready" not in out and "1/1 ready" in out


def test_a_killed_replica_is_healed_with_backoff(site: Path) -> None:
    clock = Clock()
    control = Controller(site / "state", clock=clock, say=lambda _: None)
    pid = int(next(r for r in control.actual(control.topology()).values()
                   if r.replica == "irrigation-0").ref)  # fmt: skip
    os.kill(pid, signal.SIGKILL)
    _gone(pid)
    steps = control.reconcile()
    assert [(s.action, s.replica, s.detail) for s in steps] == [
        ("restart", "irrigation-0", "it has exited (restart 1)")
    ]
    replica = control.desired(control.topology(), Plan.from_json(control.control.plan))
    assert control.wait_ready(replica["irrigation-0"], 30)
    # killed again at once: the next restart waits for the backoff (2 s after the first)
    pid = int(control.actual(control.topology())["irrigation-0"].ref)
    os.kill(pid, signal.SIGKILL)
    _gone(pid)
    assert control.reconcile() == []
    clock.now += 2.5
    assert [s.detail for s in control.reconcile()] == ["it has exited (restart 2)"]
    assert control.wait_ready(replica["irrigation-0"], 30)
    assert Controller(site / "state").control.restarts == {"irrigation-0": 2}


def _gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.05)


def test_a_patch_rolls_replica_by_replica_and_a_failing_one_rolls_back(
    site: Path, mosquitto: Mosquitto
) -> None:
    lines: list[str] = []
    control = Controller(site / "state", say=lines.append)
    before = {r.replica: r.version for r in control.actual(control.topology()).values()}
    good = _unit(site / "irrigation-v2.yaml", mosquitto, batch_size=200)
    assert control.patch("irrigation", config=good, timeout=30)
    after = {r.replica: r.version for r in control.actual(control.topology()).values()}
    assert set(after) == {"irrigation-0", "irrigation-1"}
    assert len(set(after.values())) == 1 and set(after.values()) != set(before.values())
    assert [line.split()[:2] for line in lines if line.strip().startswith("update")] == [
        ["update", "irrigation-0"], ["update", "irrigation-1"],
    ]  # fmt: skip
    # a version that cannot start: irrigation-0 fails, and goes back to the good version
    bad = _unit(site / "irrigation-v3.yaml", mosquitto, objects=[str(site / "no-such-folder")])
    lines.clear()
    assert not control.patch("irrigation", config=bad, timeout=20)
    assert any("irrigation-0: version" in line and "rolling back" in line for line in lines)
    assert any("no-such-folder" in line for line in lines)  # its log, shown
    assert not any(line.strip().startswith("update  irrigation-1") for line in lines)
    rolled = {r.replica: r.version for r in control.actual(control.topology()).values()}
    assert rolled == after
    _, rows = control.status()
    assert {r.state for r in rows} == {"ready"}
    assert Controller(site / "state").spec(control.topology(), "irrigation").config == good


def test_evacuate_moves_replicas_off_a_site_and_rebalance_spreads_them_again(site: Path) -> None:
    out = _cli("evacuate", "field", "--state", str(site / "state"))
    assert out.startswith("evacuating field:\n  move    irrigation-0             field -> town")
    control = Controller(site / "state", say=lambda _: None)
    topology = control.topology()
    assert {r.replica: r.site for r in control.actual(topology).values()} == {
        "irrigation-0": "town", "irrigation-1": "town",
    }  # fmt: skip
    assert control.control.evacuated == ["field"]
    assert (
        _cli("deploy", str(site / "topology.yaml"), "--state", str(site / "state")).count("move")
        == 0
    )  # a deploy leaves the site evacuated
    out = _cli("rebalance", "--state", str(site / "state"))
    assert "move    irrigation-0             town -> field" in out
    control = Controller(site / "state", say=lambda _: None)
    assert {r.replica: r.site for r in control.actual(topology).values()} == {
        "irrigation-0": "field", "irrigation-1": "town",
    }  # fmt: skip
    assert control.control.evacuated == []


def test_logs_and_a_clean_shutdown(site: Path) -> None:
    out = _cli("logs", "irrigation", "--tail", "3", "--state", str(site / "state"))
    assert "== irrigation-0 ==" in out and "== irrigation-1 ==" in out
    control = Controller(site / "state", say=lambda _: None)
    ports = [r.port for r in control.actual(control.topology()).values()]
    out = _cli("shutdown", "--state", str(site / "state"))
    assert "stopped 2 replicas" in out
    assert not any(healthy(port) for port in ports)
    for replica in ("irrigation-0", "irrigation-1"):  # each drained and snapshotted
        state = site / "state" / "replicas" / replica / "state"
        assert (state / f"irrigation-{replica[-1]}.state").exists()
        assert "stopped after" in (site / "state" / "local" / replica / "unit.log").read_text()
    assert Controller(site / "state").reconcile() == []  # shut down: nothing to heal


def test_a_running_reconcile_never_undoes_a_shutdown_or_an_evacuation(site: Path) -> None:
    """`cloudlet reconcile` runs (a process of its own, a pass every 0.2 s) while `deploy`,
    `evacuate` and `shutdown` come from other processes: each command holds the state's lock
    and works on what the one before left, so both stay in effect."""
    import json
    import subprocess

    from tests.test_cli import CLOUDLET

    state = str(site / "state")

    def cloudlet(*args: str) -> str:
        done = subprocess.run([CLOUDLET, *args, "--state", state], capture_output=True,
                              text=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def control_json() -> dict[str, object]:
        loaded: dict[str, object] = json.loads((site / "state" / "control.json").read_text())
        return loaded

    cloudlet("deploy", str(site / "topology.yaml"))
    loop = subprocess.Popen(
        [CLOUDLET, "reconcile", "--interval", "0.2", "--state", state],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # a few passes
        cloudlet("evacuate", "field")
        time.sleep(1.5)  # passes after it: each reads what evacuate left
        assert control_json()["evacuated"] == ["field"]
        control = Controller(site / "state", say=lambda _: None)
        assert {r.replica: r.site for r in control.actual(control.topology()).values()} == {
            "irrigation-0": "town", "irrigation-1": "town"}  # fmt: skip
        cloudlet("shutdown")
        time.sleep(1.5)
        assert control_json()["stopped"] is True
        assert control.actual(control.topology()) == {}  # nothing restarted
        assert loop.poll() is None  # the loop still runs, and leaves it all alone
    finally:
        loop.send_signal(signal.SIGTERM)
        output, _ = loop.communicate(timeout=30)
    assert "restart" not in output, output
