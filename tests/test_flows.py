"""Flow files, the flow engine, the example scenarios, and `cloudlet flow test`."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlet.demo import scenario_dir
from edge_objects.irrigation import IrrigationModel, IrrigationSite
from processors.engine import engine_of
from processors.engine.columns import ColumnPlan
from processors.engine.offline import run_offline
from streams import InvalidUpdate, RejectReason, SensorUpdate, StreamKey
from streams.catalog import Catalog
from streams.codec import update_document
from streams.flows.model import duration_ms
from tests.test_cli import run

IRRIGATION = scenario_dir("irrigation") / "objects"
SMART_CITY = scenario_dir("smart-city") / "objects"
T0 = 1_700_006_400_000  # a midnight, UTC

SENSORS = """\
id: s1
streams: {data: {channels: {t: {type: number}, zone: {type: string}}}}
---
id: s2
streams: {data: {channels: {t: {type: number}, zone: {type: string}}}}
---
id: hub
streams: {status: {channels: {ok: {type: boolean}}}}
"""


def _catalog(tmp_path: Path, flows: str) -> tuple[Catalog, list[str]]:
    (tmp_path / "sensors.yaml").write_text(SENSORS)
    (tmp_path / "test.flows.yaml").write_text(textwrap.dedent(flows))
    catalog, problems = Catalog.check([tmp_path])
    return catalog, [str(p).split(": ", 1)[1] for p in problems]


def su(at: int, /, **channels: Any) -> SensorUpdate:
    return SensorUpdate(channels, at)


@pytest.mark.parametrize(
    ("text", "ms"), [("500ms", 500), ("30s", 30_000), ("10m", 600_000), ("1.5h", 5_400_000),
                     ("2d", 172_800_000), (250, 250)]
)  # fmt: skip
def test_durations(text: Any, ms: int) -> None:
    assert duration_ms(text) == ms


@pytest.mark.parametrize(
    ("flows", "problems"),
    [
        (
            "flows: {f: {from: s1/data, window: {tumbling: 10 minutes}, aggregates: {n: count()},"
            " into: '{so}/n'}}",
            ["flows.f.window.tumbling: '10 minutes' is not a duration (write e.g. 500ms, 30s,"
             " 10m, 1h or 2d)"],
        ),
        (
            "flows: {f: {from: s1/data, window: {tumbling: 1m, session: 1m},"
            " aggregates: {n: count()}, into: '{so}/n'}}",
            ["flows.f.window: a window is exactly one of tumbling, hopping, sliding, session or"
             " count (got tumbling, session)"],
        ),
        (
            "flows: {f: {from: s1/data, window: {hopping: 1h}, aggregates: {n: count()},"
            " into: '{so}/n'}}",
            ["flows.f.window: a hopping window needs every: how often a window starts (e.g. 10m)"],
        ),
        (
            "flows: {f: {from: nothing/here, window: {tumbling: 1m}, aggregates: {n: count()},"
            " into: '{so}/n'}}",
            ["flows.f.from: from nothing/here matches no stream"],
        ),
        (
            "flows: {f: {from: s1/data, window: {tumbling: 1m}, aggregates: {n: median(t)},"
            " into: '{so}/n'}}",
            ["flows.f.aggregates: an aggregate must be a call of one of: avg, count, first, last,"
             " max, min, percentile, rate, stddev, stddevp, sum at column 1 in 'median(t)'"],
        ),
        (
            "flows: {f: {from: s*/data, where: 'zone > 1', window: {tumbling: 1m},"
            " aggregates: {m: avg(zone)}, into: '{so}/m'}}",
            ["flows.f.where: on s1/data: '>' compares two numbers or two strings, not a string"
             " and a number at column 6 in 'zone > 1'",
             "flows.f.where: on s2/data: '>' compares two numbers or two strings, not a string"
             " and a number at column 6 in 'zone > 1'"],
        ),
        (
            "flows: {f: {from: s1/data, window: {tumbling: 1m}, aggregates: {m: avg(zone)},"
            " into: '{so}/m'}}",
            ["flows.f.aggregates.m: on s1/data: avg() must give a number, but gives a string in"
             " 'avg(zone)'"],
        ),
        (
            "flows: {f: {from: s1/data, key: zone, window: {tumbling: 1m},"
            " aggregates: {n: count()}, into: '{so}/n'}}",
            ["flows.f.into: into {so}/... needs key: so"],
        ),
        (
            "flows: {f: {from: s1/data, window: {tumbling: 1m}, aggregates: {n: count()},"
            " into: nobody/n}}",
            ["flows.f.into: into names unknown service object 'nobody'"],
        ),
        (
            "flows: {f: {from: s1/data, window: {tumbling: 1m}, aggregates: {n: count()},"
            " into: '{so}/data'}}",
            ["flows.f.into: into s1/data: the stream already exists; a flow adds its own output"
             " stream"],
        ),
        (
            "flows: {f: {from: s1/data, window: {tumbling: 1m}, aggregates: {n: count()},"
            " into: '{so}/n', colour: red}}",
            ["flows.f.colour: Extra inputs are not permitted"],
        ),
    ],
)  # fmt: skip
def test_flow_errors_name_file_flow_and_field(
    tmp_path: Path, flows: str, problems: list[str]
) -> None:
    assert _catalog(tmp_path, flows)[1] == problems


def test_the_example_scenarios_load() -> None:
    irrigation = Catalog.load([IRRIGATION])
    assert [f.name for f in irrigation.flows] == ["soil-moisture-10min", "rain-last-hour"]
    assert StreamKey("field-3-soil", "moisture_10min") in irrigation.registry.produced
    city = Catalog.load([SMART_CITY])
    assert [f.name for f in city.flows] == [
        "vehicles-per-minute", "free-parking-per-zone", "pm25-hourly",
    ]  # fmt: skip


def test_devices_cannot_post_to_a_flow_output() -> None:
    registry = Catalog.load([IRRIGATION]).registry
    with pytest.raises(InvalidUpdate) as info:
        registry.validator("field-1-soil", "moisture_10min")
    assert info.value.reason is RejectReason.DERIVED_STREAM


def test_irrigation_moisture_averages_match_a_naive_computation() -> None:
    site = IrrigationSite.load(scenario_dir("irrigation") / "site.yaml")
    model = IrrigationModel(site, seed=2, start_ms=T0)
    readings = [r for _ in range(6 * 60) for r in model.step(60)]  # six hours, every minute
    engine = engine_of(Catalog.load([IRRIGATION]), clock=lambda: 0.0)
    result = engine.process(readings)
    got = {
        (k.so, u.last_update): u.channels["moisture"]
        for k, u in result.derived
        if k.stream == "moisture_10min"
    }
    buckets: dict[tuple[str, int], list[float]] = defaultdict(list)
    for key, update in readings:
        if key.stream == "soil":
            end = update.last_update - update.last_update % 600_000 + 600_000
            buckets[(key.so, end - 1)].append(update.channels["moisture"])
    newest = max(u.last_update for _, u in readings)
    expected = {k: sum(v) / len(v) for k, v in buckets.items() if k[1] < newest}
    assert got.keys() == expected.keys()
    for key, avg in expected.items():
        assert got[key] == pytest.approx(avg)
    # and the irrigate decision of each field follows its window results
    decisions = [u for k, u in result.derived if k == StreamKey("field-1-soil", "irrigate")]
    assert decisions and all(set(u.channels) == {"now", "moisture"} for u in decisions)


def test_smart_city_parking_congestion_and_air_quality() -> None:
    engine = engine_of(Catalog.load([SMART_CITY]), clock=lambda: 0.0)
    minute = 60_000
    batch: list[tuple[StreamKey, SensorUpdate]] = []
    occupied_by_minute = [0, 2, 4]  # zone A has 4 bays: full in the third minute
    for m, taken in enumerate(occupied_by_minute):
        for bay in range(1, 5):
            batch.append(
                (
                    StreamKey(f"bay-a-{bay}", "occupancy"),
                    su(T0 + m * minute + bay, occupied=bay <= taken, zone="A"),
                )
            )
        for vehicles in ([10, 15], [25, 20], [20, 15])[m]:
            batch.append(
                (
                    StreamKey("junction-1", "traffic"),
                    su(T0 + m * minute + 500, vehicles=vehicles, speed=30),
                )
            )
    batch.append(
        (StreamKey("bay-a-1", "occupancy"), su(T0 + 3 * minute + 1, occupied=True, zone="A"))
    )
    batch.append(
        (StreamKey("junction-1", "traffic"), su(T0 + 3 * minute + 600, vehicles=1, speed=50))
    )
    for h in range(2):
        for pm in ([10, 12], [30, 40])[h]:
            batch.append(
                (StreamKey("air-centre", "air"), su(T0 + h * 3_600_000 + pm, pm25=pm, noise=60))
            )
    batch.append((StreamKey("air-centre", "air"), su(T0 + 2 * 3_600_000, pm25=5, noise=50)))
    result = engine.process(batch)
    derived = defaultdict(list)
    for k, u in result.derived:
        derived[(k.so, k.stream)].append(u.channels)
    assert derived[("parking-zones", "free_1m")] == [
        {"free": 4, "reports": 4, "key": "A"},
        {"free": 2, "reports": 4, "key": "A"},
        {"free": 0, "reports": 4, "key": "A"},
    ]
    assert derived[("parking-zones", "full")] == [{"zone": "A", "free": 0}]
    assert [c["vehicles"] for c in derived[("junction-1", "vehicles_1m")]] == [25, 45, 35]
    # on above 40, stays on down to 30 (hysteresis through the stream's own last value)
    assert [c["congested"] for c in derived[("junction-1", "congestion")]] == [False, True, True]
    assert derived[("air-centre", "pm25_alert")] == [{"pm25": 35.0, "alert": True}]


def test_late_updates_come_out_of_the_flow_engine_with_a_reason(tmp_path: Path) -> None:
    catalog, problems = _catalog(
        tmp_path,
        "flows: {f: {from: s1/data, window: {tumbling: 10s}, aggregates: {n: count()},"
        " into: '{so}/n'}}",
    )
    assert problems == []
    engine = engine_of(catalog, clock=lambda: 0.0)
    s1 = StreamKey("s1", "data")
    result = engine.process([(s1, su(1_000, t=1)), (s1, su(12_000, t=2)), (s1, su(3_000, t=3))])
    assert result.derived == [(StreamKey("s1", "n"), su(9_999, n=1))]
    assert [(x.key, x.update, x.rejection.reason, x.rejection.message) for x in result.late] == [
        (
            s1,
            su(3_000, t=3),
            RejectReason.LATE,
            "s1/data: flow 'f': update at 3000 is too late for its window (watermark 12000,"
            " allowed lateness 0 ms)",
        )
    ]


@pytest.mark.parametrize("window", ["{tumbling: 10s}", "{count: 2}"])  # folded; one by one
def test_a_key_expression_opens_windows_for_at_most_max_keys(tmp_path: Path, window: str) -> None:
    """Keys from a key expression are the devices' to choose: past `max_keys` with open
    windows, an update for one more is dead-lettered `too_many_keys` (memory bounded whatever
    they send); the keys already open go on."""
    catalog, problems = _catalog(
        tmp_path,
        f"flows: {{f: {{from: 's*/data', key: zone, max_keys: 2, window: {window},"
        " aggregates: {n: count()}, into: hub/zones}}",
    )
    assert problems == []
    engine = engine_of(catalog, clock=lambda: 0.0)
    s1, s2 = StreamKey("s1", "data"), StreamKey("s2", "data")
    zones = ["a", "b", "c", "a", "d", "b"]
    result = engine.process([((s1, s2)[i % 2], su(1_000 + i, t=1, zone=z))
                             for i, z in enumerate(zones)])  # fmt: skip
    assert [(r.reason, r.message) for r in result.rejected] == [
        (RejectReason.TOO_MANY_KEYS, "s1/data: flow 'f': key 'c' would be one more than its"
         " max_keys (2) with open windows"),
        (RejectReason.TOO_MANY_KEYS, "s1/data: flow 'f': key 'd' would be one more than its"
         " max_keys (2) with open windows"),
    ]  # fmt: skip
    assert result.rejected_at == [2, 4]
    if window == "{count: 2}":  # a's and b's windows of two updates fired; they stay open
        assert [u.channels["key"] for _, u in result.derived] == ["a", "b"]
        again = engine.process([(s1, su(2_000, t=1, zone="e")), (s2, su(2_001, t=1, zone="a")),
                                (s1, su(2_002, t=1, zone="a"))])  # fmt: skip
        assert [(u.channels["key"], u.channels["n"]) for _, u in again.derived] == [("a", 2)]
        assert [r.message.split(": ")[2] for r in again.rejected] == [
            "key 'e' would be one more than its max_keys (2) with open windows"
        ]
    else:  # a and b are open until their clocks pass 10 s: c still waits, a goes on
        again = engine.process([(s1, su(12_000, t=1, zone="a")), (s2, su(12_001, t=1, zone="c"))])
        assert [(u.channels["key"], u.channels["n"]) for _, u in again.derived] == [("a", 2)]
        assert [r.reason for r in again.rejected] == [RejectReason.TOO_MANY_KEYS]


def test_flow_engine_snapshot_restore_mid_window_equals_an_uninterrupted_run() -> None:
    site = IrrigationSite.load(scenario_dir("irrigation") / "site.yaml")
    model = IrrigationModel(site, seed=5, start_ms=T0)
    readings = [r for _ in range(200) for r in model.step(97)]  # windows cut mid-way
    catalog = Catalog.load([IRRIGATION])
    whole = engine_of(catalog, clock=lambda: 0.0).process(readings)
    first = engine_of(catalog, clock=lambda: 0.0)
    head = first.process(readings[:1234])
    state = orjson.loads(orjson.dumps(first.snapshot()))  # survives serialisation
    second = engine_of(catalog, clock=lambda: 0.0)
    second.restore(state)
    tail = second.process(readings[1234:])
    assert head.derived + tail.derived == whole.derived
    assert head.discarded + tail.discarded == whole.discarded


def _line(so: str, stream: str, at: int, **channels: Any) -> str:
    return orjson.dumps(
        {"so": so, "stream": stream, "update": update_document(su(at, **channels))}
    ).decode()


def test_offline_run_prints_derived_late_and_rejected(tmp_path: Path) -> None:
    catalog, _ = _catalog(
        tmp_path,
        "flows: {f: {from: s1/data, window: {tumbling: 10s}, aggregates: {m: max(t)},"
        " into: '{so}/m'}}",
    )
    lines = [
        _line("s1", "data", T0 + 1_000, t=5),
        _line("s1", "data", T0 + 11_000, t=7),
        _line("s1", "data", T0 + 2_000, t=9),
        _line("s1", "m", T0 + 3_000, m=1),
        "[]",
        _line("s1", "data", T0 + 12_000, t="x"),
    ]
    records = list(run_offline(catalog, lines))
    assert [(r["kind"], r.get("reason")) for r in records] == [
        ("derived", None),
        ("late", "late"),
        ("rejected", "derived_stream"),
        ("rejected", "malformed"),
        ("rejected", "wrong_type"),
        ("derived", None),  # the flush at the end closes [10000, 20000)
    ]
    assert records[0] == {
        "kind": "derived", "so": "s1", "stream": "m",
        "update": {"channels": {"m": {"current-value": 5}}, "lastUpdate": T0 + 9_999},
    }  # fmt: skip
    assert records[4]["line"] == 6
    assert records[5]["update"] == {
        "channels": {"m": {"current-value": 7}},
        "lastUpdate": T0 + 19_999,
    }


def test_flow_test_command(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        "\n".join(
            [
                _line("field-1-soil", "soil", T0 + 60_000, moisture=20.0, temperature=15.0),
                _line("field-1-soil", "soil", T0 + 300_000, moisture=18.0, temperature=15.0),
            ]
        )
    )
    done = run("flow", "test", str(IRRIGATION), "--input", str(tmp_path / "in.jsonl"))
    assert done.returncode == 0, done.stderr
    records = [orjson.loads(line) for line in done.stdout.splitlines()]
    # irrigate also reads the weather, never seen here: not available, so not emitted
    assert [(r["kind"], r["so"], r["stream"]) for r in records] == [
        ("derived", "field-1-soil", "moisture_10min"),
    ]
    assert records[0]["update"] == {
        "channels": {"moisture": {"current-value": 19.0}, "samples": {"current-value": 2}},
        "lastUpdate": T0 + 599_999,
    }


def test_a_flow_reads_the_results_of_an_earlier_flow(tmp_path: Path) -> None:
    catalog, problems = _catalog(
        tmp_path,
        """\
        flows:
          ten:
            from: s1/data
            window: {tumbling: 10s}
            aggregates: {m: max(t)}
            into: "{so}/max_10s"
          thirty:
            from: s1/max_10s
            window: {tumbling: 30s}
            aggregates: {m: avg(m)}
            into: "{so}/avg_30s"
        """,
    )
    assert problems == []
    engine = engine_of(catalog, clock=lambda: 0.0)
    s1 = StreamKey("s1", "data")
    events = [(s1, su(T0 + t * 1000, t=t)) for t in (1, 12, 25, 31, 45)]
    result = engine.process(events)
    assert [(k.stream, u.last_update - T0, u.channels["m"]) for k, u in result.derived] == [
        ("max_10s", 9_999, 1),
        ("max_10s", 19_999, 12),
        ("max_10s", 29_999, 25),
        ("max_10s", 39_999, 31),  # its time, 39999, closes the 30-second window [0, 30s):
        ("avg_30s", 29_999, 38 / 3),  # (1 + 12 + 25) / 3
    ]


def test_a_flow_reading_its_own_results_through_a_composite_stream_is_rejected(
    tmp_path: Path,
) -> None:
    (tmp_path / "loop.yaml").write_text(
        "id: loop\nstreams:\n  back: {channels: {t: {type: number, current-value: 'n_1s.n'}}}\n"
    )
    _, problems = _catalog(
        tmp_path,
        "flows: {f: {from: loop/back, window: {count: 1}, aggregates: {n: count()},"
        " into: '{so}/n_1s'}}",
    )
    assert problems == ["flows.f: the flow reads its own results again through loop/back"]


FOLDED = """\
flows:
  avg-by-so:
    from: "s*/data"
    where: "t > -50"
    window: {tumbling: 10s}
    watermark: {delay: %(delay)s, lateness: %(lateness)s}
    aggregates: {avg: avg(t), sum: sum(t), lo: min(t), hi: max(t), n: count()}
    into: "{so}/stats"
  by-zone:
    from: "s*/data"
    key: zone
    window: {hopping: 20s, every: 5s}
    watermark: {delay: %(delay)s, lateness: %(lateness)s}
    aggregates: {n: count(), first: first(t), sd: stddev(t)}
    into: "hub/zones"
  all:
    from: "s*/data"
    key: none
    where: "10 >= t"
    window: {tumbling: 5s}
    watermark: {delay: %(delay)s, lateness: %(lateness)s}
    aggregates: {n: count(), hi: max(t), last: last(zone)}
    into: "hub/all"
"""
numbers = st.one_of(st.integers(-100, 100), st.floats(-1e6, 1e6), st.integers(2**53, 2**60),
                    st.sampled_from([0.1, -0.0, 1e300, -1e300]))  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2"]),
            st.integers(0, 120_000),
            st.one_of(numbers, st.none()),
            st.sampled_from(["a", "b"]),
        ),
        max_size=60,
    ),
    delay=st.sampled_from(["0s", "3s"]),
    lateness=st.sampled_from(["0s", "15s"]),
    cut=st.integers(1, 20),
)
def test_folding_a_batch_equals_passing_updates_one_by_one(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[tuple[str, int, Any, str]], delay: str, lateness: str, cut: int,
) -> None:  # fmt: skip
    """The batch path (kernels.fold_windows, compiled or twin) gives exactly what the update
    by update path gives: the same results, late updates and rejections, from the same inputs."""
    from streams import kernels
    from streams.kernels import _inputs_py, _windows_py

    catalog, problems = _catalog(tmp_path_factory.mktemp("fold"),
                                 FOLDED % {"delay": delay, "lateness": lateness})  # fmt: skip
    assert problems == []
    batch = [(StreamKey(so, "data"), su(T0 + t, **({"t": v} if v is not None else {}), zone=z))
             for so, t, v, z in events]  # fmt: skip
    runs = []
    for mode in ("one by one", "folded", "folded by the twin"):
        engine = engine_of(catalog, clock=lambda: 0.0)
        if mode == "one by one":
            for node in engine.windows.values():
                node.fold = False
        else:
            assert {n for n, node in engine.windows.items() if node.fold} == {
                "avg-by-so", "by-zone", "all"}  # fmt: skip
        compiled = kernels.fold_windows
        reader, taker = kernels.column_inputs, kernels.take_inputs
        if mode == "folded by the twin":
            kernels.fold_windows = _windows_py.fold_windows
            kernels.column_inputs = _inputs_py.column_inputs
            kernels.take_inputs = _inputs_py.take_inputs
        try:
            results = [engine.process(batch[i : i + cut]) for i in range(0, len(batch), cut)]
        finally:
            kernels.fold_windows, kernels.column_inputs = compiled, reader
            kernels.take_inputs = taker
        if mode != "one by one" and events:  # "avg-by-so" and "all" read columns, "by-zone" not
            plans = [p for node in engine.windows.values() for p in node.plans.values()]
            assert {p.where[1] for p in plans if isinstance(p, ColumnPlan)} == {1, 2}
        runs.append(
            [
                (
                    r.derived,
                    r.derived_at,
                    [(x.key, x.update, x.rejection) for x in r.late],
                    r.late_at,
                    r.rejected,
                    r.rejected_at,
                )
                for r in results
            ]
            + [engine.snapshot()]
        )
    assert runs[0] == runs[1] == runs[2]


CASCADE_OBJECTS = """\
id: s1
streams: {data: {channels: {t: {type: number}}}}
---
id: s2
streams: {data: {channels: {t: {type: number}}}}
---
id: v
streams: {state: {channels: {open: {type: boolean}}}}
actions: [{name: open}]
---
id: hub
groups: {all: {soIds: [s1, s2], stream: data}}
streams:
  status: {channels: {ok: {type: boolean}}}
  both: {channels: {x: {type: number, current-value: "all.t + avg10.avg"}}}
  twice: {channels: {x: {type: number, current-value: "both.x * 2"}}}
"""
CASCADE_FLOWS = """\
flows:
  avg10:
    from: "s*/data"
    key: none
    window: {tumbling: 10s}
    watermark: {lateness: 5s}
    aggregates: {avg: avg(t), n: count()}
    into: hub/avg10
  hi5:
    from: "s*/data"
    window: {tumbling: 5s}
    aggregates: {hi: max(t)}
    into: "{so}/hi5"
  m30:
    from: hub/avg10
    key: none
    window: {tumbling: 30s}
    aggregates: {m: max(avg), n: count()}
    into: hub/m30
  tw30:
    from: hub/twice
    key: none
    window: {hopping: 30s, every: 10s}
    aggregates: {x: max(x), n: count()}
    into: hub/tw30
  slide:
    from: "hub/avg10"
    key: none
    window: {sliding: 20s}
    aggregates: {n: count()}
    into: hub/slide
rules:
  hot: {when: hub/avg10, if: "avg > 5", act: {so: v, action: open}, min_interval: 15s}
"""


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["s1", "s2"]), st.integers(0, 90_000), st.integers(-20, 20)),
        max_size=50,
    ),
    cuts=st.lists(st.integers(1, 12), min_size=1, max_size=8),
)
def test_the_graph_gives_the_same_whatever_the_batches(
    tmp_path_factory: pytest.TempPathFactory, events: list[tuple[str, int, int]], cuts: list[int]
) -> None:
    """One graph, one path: composite streams reading a group and a flow's results, a flow
    over another's results and a composite's, a sliding window (update by update) and a rule
    on a flow's results give exactly the same results, attributions, late updates, commands
    and state whether the updates come one by one or in batches of any size, and with the
    window kernel folding or not."""
    path = tmp_path_factory.mktemp("cascade")
    (path / "objects.yaml").write_text(CASCADE_OBJECTS)
    (path / "c.flows.yaml").write_text(CASCADE_FLOWS)
    catalog, problems = Catalog.check([path])
    assert problems == []
    updates = [(StreamKey(so, "data"), su(T0 + t, t=v)) for so, t, v in events]

    def run(sizes: list[int], fold: bool) -> tuple[Any, ...]:
        engine = engine_of(catalog, clock=lambda: 0.0)
        for node in engine.windows.values():
            node.fold = node.fold and fold
        out: list[Any] = []
        at, i = 0, 0
        while at < len(updates):
            size = sizes[i % len(sizes)]
            r = engine.process(updates[at : at + size])
            out.append((
                [(k, u, at + j if j >= 0 else -1) for (k, u), j in zip(r.derived, r.derived_at,
                                                                       strict=True)],
                [(x.key, x.update, x.rejection, at + j) for x, j in zip(r.late, r.late_at,
                                                                        strict=True)],
                [(a.so, a.action, a.parameters, a.issued_at) for a in r.actuations],  # not ids
                r.rejected, r.discarded,
            ))  # fmt: skip
            at, i = at + size, i + 1
        flat = tuple([x for batch in out for x in batch[n]] for n in range(5))
        return (*flat, engine.snapshot(), engine.composite.counts)

    one_by_one = run([1], fold=False)
    assert run(cuts, fold=True) == one_by_one
    assert run(cuts, fold=False) == one_by_one
    assert run([len(updates) or 1], fold=True) == one_by_one
