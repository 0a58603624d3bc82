"""`cloudlet demo` end to end over the real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from cloudlet.rig import Mosquitto
from tests.test_cli import run


@pytest.mark.mqtt
def test_demo_delivers_every_update_and_rejects_every_fault(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    summary_path = tmp_path / "summary.json"
    done = run(
        "demo", "--mqtt", mosquitto.url, "--steps", "30", "--rate", "20",
        "--faults", "3", "--seed", "7", "--summary", str(summary_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = orjson.loads(summary_path.read_bytes())
    faults = summary["sent"]["faults"]
    good = summary["sent"]["updates"]
    assert good == 10 * 30  # 10 devices, 30 steps
    assert sum(faults.values()) > 0
    expected_reasons = {
        "malformed": faults.get("truncated", 0),
        "unknown_object": faults.get("unknown_object", 0),
        "unknown_channel": faults.get("unknown_channel", 0),
        "wrong_type": faults.get("wrong_type", 0),
        "missing_last_update": faults.get("missing_last_update", 0),
    }
    expected_reasons = {k: v for k, v in expected_reasons.items() if v}
    unit = summary["unit"]
    assert (unit["messages"], unit["accepted"], unit["rejected"]) == (
        good + sum(faults.values()),
        good,
        expected_reasons,
    )
    assert unit["dead_letters"] == sum(faults.values())
    observed = summary["observed"]
    assert (observed["updates"], observed["dead_letters"]) == (good, expected_reasons)
    # 30 steps of 30 simulated seconds from 06:00: the 10-minute window [06:00, 06:10) of each
    # of the 4 fields fires, and one hourly rain window (ending 06:10); irrigate follows.
    derived = observed["derived"]
    assert (derived["moisture_10min"], derived["rain_1h"]) == (4, 1)
    assert derived["irrigate"] > 0
    assert sum(derived.values()) == unit["derived"]
    assert summary["lossless"] is True
    assert "every fault was rejected for the right" in done.stdout
