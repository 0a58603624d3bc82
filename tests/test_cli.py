"""The `cloudlet` command, run as a user runs it: the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import SERVIOTICY

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

COMPOSITE = "1398788346015aa59fe5f854b4bda89647b969c51d8a4"
CLOUDLET = shutil.which("cloudlet", path=str(Path(sys.executable).parent)) or "cloudlet"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLOUDLET, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_help_lists_the_commands() -> None:
    done = run("--help")
    assert done.returncode == 0
    assert "so" in done.stdout and "rig" in done.stdout


def test_version_and_what_a_newcomer_hits() -> None:
    """`--version`; `processor list` says a duration is one; `flow test` on the shipped
    example input gives the windows the README shows."""
    from importlib.metadata import version

    done = run("--version")
    assert (done.returncode, done.stdout) == (0, f"cloudlet {version('cloudlet')}\n")
    listed = run("processor", "list").stdout
    assert "min_interval?: duration" in listed and "every: duration" in listed
    scenario = Path(__file__).resolve().parent.parent / "cloudlet" / "scenarios" / "irrigation"
    done = run("flow", "test", str(scenario / "objects"), "--input",
               str(scenario / "updates.jsonl"))  # fmt: skip
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [(r["kind"], r["stream"]) for r in lines[:4]] == [
        ("derived", "moisture_10min"), ("late", "soil"), ("rejected", "soil"),
        ("derived", "moisture_10min")]  # fmt: skip
    assert lines[0]["update"]["channels"]["moisture"] == {"current-value": 19.0}


def test_validate_accepts_the_servioticy_demo_descriptors() -> None:
    done = run("so", "validate", str(SERVIOTICY))
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "ok: 3 service object(s), 4 stream(s) (2 derived), 1 group(s)\n",
        "",
    )


def test_validate_names_file_object_field_and_reason_for_every_error(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text(
        "id: broken-1\n"
        "streams:\n"
        "  data: {channels: {temp: {type: temperature}, loc: {type: geo_point}}}\n"
        "  avg:\n"
        "    channels:\n"
        "      t: {type: number, current-value: '{$data.channels.tmp.current-value}'}\n"
    )
    (tmp_path / "empty.json").write_text('{"streams": {}}')
    done = run("so", "validate", str(tmp_path), str(SERVIOTICY / "cso.json"))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: {tmp_path}/broken.yaml: so 'broken-1': streams.data.channels.temp.type: channel"
        " type 'temperature' is not one of: number, string, boolean, geo_point",
        f"error: {tmp_path}/empty.json: so 'empty': streams: a service object needs at least one"
        " stream",
        f"error: {SERVIOTICY}/cso.json: so '{COMPOSITE}': groups.group1.soIds[0]: unknown service"
        " object '1396461657731411aa73c28444ecf9a8c803e62312fd1'",
        f"error: {SERVIOTICY}/cso.json: so '{COMPOSITE}': groups.group1.soIds[1]: unknown service"
        " object '139879170177572ad72be6e67450c9d4d85176e02aeb1'",
        "4 problem(s) in 3 descriptor(s)",
    ]


def test_validate_a_missing_path() -> None:
    done = run("so", "validate", "/nonexistent/so.json")
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == "error: /nonexistent/so.json: no such file or directory"


def test_show_prints_streams_groups_and_derivations() -> None:
    done = run("so", "show", COMPOSITE, "--objects", str(SERVIOTICY))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].strip() == COMPOSITE
    assert "{$group1.channels.temperature.current-value} * 1.8 + 32" in done.stdout
    assert "(post-filter)" in done.stdout
    assert lines[-1] == (
        "  group group1: stream 'data' of 1396461657731411aa73c28444ecf9a8c803e62312fd1,"
        " 139879170177572ad72be6e67450c9d4d85176e02aeb1"
    )


def test_show_json_is_the_servioticy_descriptor() -> None:
    done = run("so", "show", COMPOSITE, "--objects", str(SERVIOTICY), "--json")
    assert done.returncode == 0, done.stderr
    shown = orjson.loads(done.stdout)
    original = orjson.loads((SERVIOTICY / "cso.json").read_bytes())
    assert shown["streams"] == original["streams"]
    assert shown["groups"] == original["groups"]
    assert shown["userId"] == original["userId"]


def test_show_an_unknown_object() -> None:
    done = run("so", "show", "nobody", "--objects", str(SERVIOTICY))
    assert done.returncode == 1
    assert done.stderr == (
        f"error: no service object 'nobody' in {SERVIOTICY} (known:"
        " 1396461657731411aa73c28444ecf9a8c803e62312fd1,"
        f" {COMPOSITE},"
        " 139879170177572ad72be6e67450c9d4d85176e02aeb1)\n"
    )


def test_show_an_object_fed_by_flows_and_validate_paths_named_twice() -> None:
    scenario = Path(__file__).resolve().parent.parent / "cloudlet/scenarios/irrigation/objects"
    done = run("so", "show", "field-1-soil", "--objects", str(scenario))
    assert done.returncode == 0, done.stderr
    assert "by flow soil-moisture-10min" in done.stdout
    done = run("so", "validate", str(scenario), str(scenario / "irrigation.flows.yaml"))
    assert (done.returncode, done.stdout) == (
        0,
        "ok: 10 service object(s), 19 stream(s) (4 derived, 5 by flows), 8 group(s), 2 flow(s)\n",
    )


def test_usage_errors_are_one_line_naming_the_help() -> None:
    """As the commands' own errors are: `error: ...`, exit status 2, no box."""
    cases = {
        ("demo", "--bogus"): "error: No such option: --bogus (see `cloudlet demo --help`)\n",
        ("nosuch",): "error: No such command 'nosuch'. (see `cloudlet --help`)\n",
        (
            "so",
            "validate",
        ): "error: Missing argument 'paths'. (see `cloudlet so validate --help`)\n",
    }
    for args, said in cases.items():
        done = run(*args)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", said), args
    done = run("demo", "--help")
    assert done.returncode == 0 and "--port" in done.stdout
