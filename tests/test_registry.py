"""The registry: loading directories of descriptors and cross-checking every reference."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from streams import InvalidUpdate, Registry, RegistryError, RejectReason, ServiceObject
from streams.catalog import Catalog
from streams.references import expand_aliases
from tests.conftest import SERVIOTICY

DEVICE_1 = "1396461657731411aa73c28444ecf9a8c803e62312fd1"
DEVICE_2 = "139879170177572ad72be6e67450c9d4d85176e02aeb1"
COMPOSITE = "1398788346015aa59fe5f854b4bda89647b969c51d8a4"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _problems(*paths: Path) -> list[str]:
    return [str(p) for p in Catalog.check(paths)[1]]


def test_servioticy_demo_directory_loads() -> None:
    registry = Registry.load([SERVIOTICY])
    assert sorted(registry.objects) == sorted([DEVICE_1, DEVICE_2, COMPOSITE])
    assert registry.sources[COMPOSITE] == str(SERVIOTICY / "cso.json")


def test_yaml_multi_document_list_json_and_id_from_file_name(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "sites/field.yaml",
        """\
        streams:
          soil: {channels: {moisture: {type: number, unit: "%"}}}
        """,
    )
    _write(
        tmp_path,
        "valves.yml",
        """\
        id: valve-1
        streams: {state: {channels: {open: {type: boolean}}}}
        actions: [{name: open}, {name: close}]
        ---
        id: valve-2
        streams: {state: {channels: {open: {type: boolean}}}}
        """,
    )
    _write(
        tmp_path,
        "gauges.json",
        '[{"id": "rain-1", "streams": {"rain": {"channels": {"mm": {"type": "number"}}}}}]',
    )
    _write(tmp_path, "irrigation.flow.yaml", "flows: {not: [a service object]}\n")
    _write(tmp_path, "README.md", "# not a descriptor\n")
    registry = Registry.load([tmp_path])
    assert sorted(registry.objects) == ["field", "rain-1", "valve-1", "valve-2"]
    assert registry.sources["valve-2"] == f"{tmp_path / 'valves.yml'}[1]"
    assert registry.get("valve-1").action("open") is not None
    assert registry.get("valve-1").action("toggle") is None


def test_every_problem_is_reported_with_file_object_and_field(tmp_path: Path) -> None:
    broken = _write(
        tmp_path,
        "broken.yaml",
        """\
        id: broken-1
        groups:
          g: {soIds: [nobody, sensor-1], stream: data}
          h: {soIds: [sensor-1], stream: missing}
        streams:
          data:
            channels: {temp: {type: number}}
          avg:
            channels:
              t:
                type: number
                current-value: >-
                  {$dta.channels.temp.current-value} + {$data.channels.tmp.current-value}
            pre-filter: "{$result.channels.t.current-value} > 1"
          odd:
            channels:
              t: {type: number, current-value: "{$data.temp}"}
        """,
    )
    sensor = _write(
        tmp_path,
        "sensor-1.yaml",
        "streams: {data: {channels: {temp: {type: string}}}}\n",
    )
    twin = _write(
        tmp_path, "twin.yaml", "id: sensor-1\nstreams: {x: {channels: {a: {type: number}}}}\n"
    )
    bad_type = _write(
        tmp_path,
        "typo.json",
        '{"id": "typo", "streams": {"s": {"channels": {"a": {"type": "int"}, "b": {}}}}}',
    )
    torn = _write(tmp_path, "torn.json", '{"streams": ')
    assert _problems(broken, sensor, twin, bad_type, torn) == [
        f"{twin}: so 'sensor-1': id: is already defined in {sensor}",
        f"{bad_type}: so 'typo': streams.s.channels.a.type: channel type 'int' is not one of:"
        " number, string, boolean, geo_point",
        f"{bad_type}: so 'typo': streams.s.channels.b.type: Field required",
        f"{torn}: cannot be read as json: unexpected end of data: line 1 column 13 (char 12)",
        f"{broken}: so 'broken-1': groups.g.soIds[0]: unknown service object 'nobody'",
        f"{broken}: so 'broken-1': groups.h.stream: member 'sensor-1' has no stream 'missing'"
        " (it has: data)",
        f"{broken}: so 'broken-1': streams.avg.channels.t.current-value: unknown input 'dta'"
        " (inputs here: data, avg, odd, g, h) at column 1 in"
        " '{$dta.channels.temp.current-value} + {$data.channels.tmp.current-value}'",
        f"{broken}: so 'broken-1': streams.avg.pre-filter: unknown input 'result' (inputs here:"
        " data, avg, odd, g, h) at column 1 in '{$result.channels.t.current-value} > 1'",
        f"{broken}: so 'broken-1': streams.odd.channels.t.current-value: '{{$data.temp}}' is not a"
        " ServIoTicy reference (expected {$<input>.channels.<channel>.current-value} or"
        " {$<input>.lastUpdate}) at column 1 in '{$data.temp}'",
    ]
    with pytest.raises(RegistryError) as info:
        Catalog.load([broken, sensor, twin, bad_type, torn])
    assert len(info.value.problems) == 9
    assert str(info.value).startswith("9 problem(s) in the service object descriptors:\n  ")


def test_group_members_must_agree_on_channel_types(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "streams: {data: {channels: {t: {type: number}}}}\n")
    _write(tmp_path, "b.yaml", "streams: {data: {channels: {t: {type: string}}}}\n")
    group = _write(
        tmp_path,
        "g.yaml",
        """\
        groups: {both: {soIds: [a, b], stream: data}}
        streams:
          out: {channels: {t: {type: number, current-value: "{$both.channels.t.current-value}"}}}
        """,
    )
    assert _problems(tmp_path) == [
        f"{group}: so 'g': groups.both: channel 't' is a number on 'a' but a string on 'b';"
        " group members must agree",
        f"{group}: so 'g': streams.out.channels.t.current-value: current-value must give a"
        " number, but gives a string in '{$both.channels.t.current-value}'",
    ]


def test_aliases_are_expanded_before_references_are_checked(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "alias.yaml",
        """\
        aliases: [{"@t@": "{$data.channels.t.current-value}"}, {"@f@": "@t@ * 1.8 + 32"}]
        streams:
          data: {channels: {t: {type: number}}}
          f: {channels: {t: {type: number, current-value: "@f@"}}}
        """,
    )
    assert _problems(tmp_path) == []
    so = Registry.load([tmp_path]).get("alias")
    assert expand_aliases("@f@", so.aliases) == "{$data.channels.t.current-value} * 1.8 + 32"
    with pytest.raises(ValueError, match="do two aliases refer to each other"):
        expand_aliases("@a@", {"@a@": "@b@", "@b@": "@a@"})


def test_self_reference_is_allowed(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "counter.yaml",
        """\
        streams:
          data: {channels: {t: {type: number}}}
          total:
            channels:
              sum:
                type: number
                current-value: >-
                  {$total.channels.sum.current-value} + {$data.channels.t.current-value}
        """,
    )
    assert _problems(tmp_path) == []


def test_validator_lookup_rejects_unknown_objects_streams_and_derived_streams() -> None:
    registry = Registry.load([SERVIOTICY])
    with pytest.raises(InvalidUpdate) as info:
        registry.validator("nobody", "data")
    assert info.value.reason is RejectReason.UNKNOWN_OBJECT
    assert str(info.value) == "nobody/data: unknown service object 'nobody'"
    with pytest.raises(InvalidUpdate) as info:
        registry.validator(DEVICE_1, "dta")
    assert info.value.reason is RejectReason.UNKNOWN_STREAM
    assert (
        str(info.value)
        == f"{DEVICE_1}/dta: service object '{DEVICE_1}' has no stream 'dta' (it has: data)"
    )
    with pytest.raises(InvalidUpdate) as info:
        registry.validator(COMPOSITE, "fahrenheit")
    assert info.value.reason is RejectReason.DERIVED_STREAM
    assert str(info.value) == (
        f"{COMPOSITE}/fahrenheit: stream 'fahrenheit' is derived by the cloudlet;"
        " devices cannot post to it"
    )


def test_from_objects_checks_references() -> None:
    so = ServiceObject.model_validate(
        {
            "id": "c",
            "groups": {"g": {"soIds": ["x"], "stream": "s"}},
            "streams": {"s": {"channels": {"a": {"type": "number"}}}},
        }
    )
    with pytest.raises(
        RegistryError, match=r"<memory>: so 'c': groups.g.soIds\[0\]: unknown service object 'x'"
    ):
        Registry.from_objects([so])
