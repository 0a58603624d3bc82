"""Composite streams: ServIoTicy 0.1.0 semantics with exact expected outputs."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.engine.composite import CompositeEngine, Discarded, merge
from streams import (
    GeoPoint,
    Registry,
    RegistryError,
    RejectReason,
    SensorUpdate,
    ServiceObject,
    StreamKey,
)
from streams.catalog import Catalog
from streams.composite_plan import CompositePlan
from tests.conftest import SERVIOTICY

D1 = "1396461657731411aa73c28444ecf9a8c803e62312fd1"
D2 = "139879170177572ad72be6e67450c9d4d85176e02aeb1"
CSO = "1398788346015aa59fe5f854b4bda89647b969c51d8a4"
BCN = GeoPoint(41.38, 2.17)


def _engine(tmp_path: Path, text: str) -> CompositeEngine:
    (tmp_path / "so.yaml").write_text(textwrap.dedent(text))
    return CompositeEngine(Catalog.load([tmp_path]).plan)


def _problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "so.yaml").write_text(textwrap.dedent(text))
    return [str(p).split(": ", 1)[1] for p in Catalog.check([tmp_path])[1]]


def su(at: int, /, **channels: Any) -> SensorUpdate:
    return SensorUpdate(channels, at)


def test_servioticy_demo_chain() -> None:
    engine = CompositeEngine(Catalog.load([SERVIOTICY]).plan)
    fahrenheit, above = StreamKey(CSO, "fahrenheit"), StreamKey(CSO, "aboveSeventy")
    out = engine.process(
        [
            (StreamKey(D1, "data"), su(1000, temperature=15.0, location=BCN)),
            (StreamKey(D2, "data"), su(2000, temperature=25.0, location=GeoPoint(41.4, 2.2))),
            (StreamKey(D1, "data"), su(3000, temperature=20, location=BCN)),
        ]
    )
    assert out.derived == [
        (fahrenheit, su(1000, temperature=59.0, location=BCN)),  # 59 F: aboveSeventy filters it
        (fahrenheit, su(2000, temperature=77.0, location=GeoPoint(41.4, 2.2))),
        (above, su(2000, temperature=77.0, location=GeoPoint(41.4, 2.2))),
        (fahrenheit, su(3000, temperature=68.0, location=BCN)),
    ]
    assert out.rejected == [] and out.discarded == []
    assert engine.counts.as_dict() == {
        "derived": 4,
        "stale": 0,
        "filtered": 2,
        "not_available": 0,
        "failed": 0,
    }


def test_a_trigger_not_newer_than_the_last_output_is_discarded_and_reported() -> None:
    engine = CompositeEngine(Catalog.load([SERVIOTICY]).plan)
    engine.process([(StreamKey(D2, "data"), su(2000, temperature=25.0, location=BCN))])
    out = engine.process([(StreamKey(D1, "data"), su(1500, temperature=30.0, location=BCN))])
    assert out.derived == []
    assert out.discarded == [
        Discarded(StreamKey(CSO, "fahrenheit"), StreamKey(D1, "data"), 1500, 2000)
    ]
    assert out.discarded[0].message == (
        f"{CSO}/fahrenheit: trigger from {D1}/data at 1500 is not newer than the last output at"
        " 2000; discarded"
    )
    assert engine.counts.stale == 1


def test_pre_and_post_filters_and_newest_input_time(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        """\
        id: field
        streams:
          soil: {channels: {moisture: {type: number}}}
          weather: {channels: {rain: {type: number}, hot: {type: boolean}}}
          irrigate:
            channels:
              need: {type: number, current-value: "30 - soil.moisture"}
            pre-filter: "weather.rain < 1 and not weather.hot"
            post-filter: "result.need > 5"
        """,
    )
    soil, weather, irrigate = (StreamKey("field", s) for s in ("soil", "weather", "irrigate"))
    out = engine.process(
        [
            (soil, su(1000, moisture=20.0)),  # weather not yet seen: not available
            (weather, su(2000, rain=0, hot=False)),  # need 10 -> emitted at t=2000
            (soil, su(3000, moisture=28.0)),  # need 2: the post-filter drops it
            (weather, su(4000, rain=3, hot=False)),  # raining: the pre-filter drops it
            (soil, su(5000, moisture=10.0)),  # still raining
            (weather, su(6000, rain=0, hot=False)),  # need 20
        ]
    )
    assert out.derived == [(irrigate, su(2000, need=10.0)), (irrigate, su(6000, need=20.0))]
    assert engine.counts.as_dict() == {
        "derived": 2,
        "stale": 0,
        "filtered": 3,
        "not_available": 1,
        "failed": 0,
    }


def test_self_reference_keeps_state(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        """\
        id: gauge
        streams:
          rain: {channels: {mm: {type: number}}}
          total:
            channels:
              mm: {type: number, current-value: "coalesce(total.mm, 0) + rain.mm"}
          bare:
            channels:
              mm: {type: number, current-value: "{$bare.channels.mm.current-value} + rain.mm"}
        """,
    )
    rain, total = StreamKey("gauge", "rain"), StreamKey("gauge", "total")
    out = engine.process([(rain, su(t, mm=m)) for t, m in ((1000, 1.5), (2000, 0.5), (3000, 2))])
    assert out.derived == [
        (total, su(1000, mm=1.5)),
        (total, su(2000, mm=2.0)),
        (total, su(3000, mm=4.0)),
    ]
    # without coalesce, a stream reading itself never has a first value: not available, no error
    assert engine.counts.not_available == 3


def test_chains_fire_transitively_in_dependency_order_once_per_pass(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        """\
        id: chain
        streams:
          src: {channels: {x: {type: number}}}
          d: {channels: {x: {type: number, current-value: "b.x + c.x"}}}
          c: {channels: {x: {type: number, current-value: "a.x * 10"}}}
          b: {channels: {x: {type: number, current-value: "a.x + 1"}}}
          a: {channels: {x: {type: number, current-value: "src.x * 2"}}}
        """,
    )
    out = engine.process([(StreamKey("chain", "src"), su(5000, x=1))])
    assert [(k.stream, u.channels["x"], u.last_update) for k, u in out.derived] == [
        ("a", 2, 5000),
        ("b", 3, 5000),
        ("c", 20, 5000),
        ("d", 23, 5000),  # the diamond's join is evaluated once, after both branches
    ]
    assert out.discarded == []


def test_group_reads_the_latest_update_of_any_member(tmp_path: Path) -> None:
    (tmp_path / "members.yaml").write_text(
        "id: s1\nstreams: {data: {channels: {t: {type: number}}}}\n---\n"
        "id: s2\nstreams: {data: {channels: {t: {type: number}}}}\n"
    )
    engine = _engine(
        tmp_path,
        """\
        id: avg
        groups: {all: {soIds: [s1, s2], stream: data}}
        streams:
          last: {channels: {t: {type: number, current-value: "all.t"}}}
        """,
    )
    last = StreamKey("avg", "last")
    out = engine.process(
        [
            (StreamKey("s1", "data"), su(1000, t=1)),
            (StreamKey("s2", "data"), su(3000, t=2)),
            (StreamKey("s1", "data"), su(2000, t=3)),  # older than s2's: the group keeps s2's
            (StreamKey("s1", "data"), su(4000, t=4)),
        ]
    )
    assert out.derived == [
        (last, su(1000, t=1)),
        (last, su(3000, t=2)),
        (last, su(4000, t=4)),
    ]
    assert [d.last_update for d in out.discarded] == [2000]


def test_a_failed_evaluation_rejects_that_update_and_processing_goes_on(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        """\
        id: ratio
        streams:
          data: {channels: {a: {type: number}, b: {type: number}}}
          r: {channels: {x: {type: number, current-value: "data.a / data.b"}}}
        """,
    )
    data, r = StreamKey("ratio", "data"), StreamKey("ratio", "r")
    out = engine.process([(data, su(1000, a=1, b=0)), (data, su(2000, a=1, b=4))])
    assert out.derived == [(r, su(2000, x=0.25))]
    assert [(x.reason, x.message) for x in out.rejected] == [
        (RejectReason.EXPRESSION_FAILED, "ratio/r: division by zero (in 'data.a / data.b')")
    ]


def test_partial_updates_merge_into_the_latest_value() -> None:
    assert merge(su(1, a=1, b=2), su(2, b=3)) == su(2, a=1, b=3)
    assert merge(su(5, a=1), su(2, a=9, b=3)) == su(5, a=1, b=3)  # old values never win


def test_aliases_and_native_syntax(tmp_path: Path) -> None:
    engine = _engine(
        tmp_path,
        """\
        id: t
        aliases: [{"@f@": "data.c * 1.8 + 32"}]
        streams:
          data: {channels: {c: {type: number}}}
          f: {channels: {f: {type: number, current-value: "round(@f@, 1)"}}}
        """,
    )
    out = engine.process([(StreamKey("t", "data"), su(1000, c=21.5))])
    assert out.derived == [(StreamKey("t", "f"), su(1000, f=70.7))]


def test_snapshot_and_restore_give_the_same_results_as_an_uninterrupted_run() -> None:
    catalog = Catalog.load([SERVIOTICY])
    updates = [
        (StreamKey(D1 if i % 2 else D2, "data"), su(1000 * i, temperature=10.0 + i, location=BCN))
        for i in range(1, 20)
    ]
    whole = CompositeEngine(catalog.plan).process(updates)
    first = CompositeEngine(catalog.plan)
    before = first.process(updates[:7])
    second = CompositeEngine(catalog.plan)
    second.restore(first.snapshot())
    after = second.process(updates[7:])
    assert before.derived + after.derived == whole.derived
    assert before.discarded + after.discarded == whole.discarded


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        (
            """\
            id: loop
            streams:
              a: {channels: {x: {type: number, current-value: "b.x + 1"}}}
              b: {channels: {x: {type: number, current-value: "a.x + 1"}}}
            """,
            ["so 'loop': streams.a: derived streams form a cycle: loop/a -> loop/b -> loop/a"],
        ),
        (
            """\
            id: types
            streams:
              data: {channels: {t: {type: number}, name: {type: string}}}
              d: {channels: {x: {type: number, current-value: "data.name"}}}
              e:
                channels: {x: {type: number, current-value: "data.t"}}
                pre-filter: "data.t + 1"
            """,
            [
                "so 'types': streams.d.channels.x.current-value: current-value must give a"
                " number, but gives a string in 'data.name'",
                "so 'types': streams.e.pre-filter: pre-filter must give a boolean, but gives a"
                " number in 'data.t + 1'",
            ],
        ),
        (
            """\
            id: js
            version: "0.2.0"
            streams:
              A: {channels: {$: {type: number}}}
              B:
                channels:
                  $:
                    type: number
                    current-value: "function(A){return A.channels.$['current-value'] * 2}"
            """,
            [
                "so 'js': streams.B.channels.$.current-value: ServIoTicy 0.2.0 JavaScript"
                " functions are not executed (cloudlet runs no user JavaScript); the equivalent"
                " native expression is: A.$ * 2"
            ],
        ),
    ],
)
def test_bad_plans_are_rejected_when_loading(
    tmp_path: Path, text: str, problems: list[str]
) -> None:
    assert _problems(tmp_path, text) == problems
    with pytest.raises(RegistryError):
        Catalog.load([tmp_path])


_numeric_atoms = st.sampled_from(
    ["data.t", "other.t", "group1.t", "d.x", "0", "1", "-2.5", "data.lastUpdate", "len(data.name)"]
)


@st.composite
def _numeric(draw: st.DrawFn, depth: int = 0) -> str:
    """Well-typed numeric expressions, with the operations that can fail at run time."""
    if depth > 3 or draw(st.booleans()):
        return draw(_numeric_atoms)
    a, b = draw(_numeric(depth + 1)), draw(_numeric(depth + 1))
    form = draw(st.sampled_from(
        ["({a} + {b})", "({a} - {b})", "({a} * {b})", "({a} / {b})", "({a} % {b})", "({a} ** {b})",
         "sqrt({a})", "log({a})", "round({a}, 2)", "coalesce({a}, {b})", "max({a}, {b})",
         "({c} ? {a} : {b})", "exp({a})", "clamp({a}, {b}, 10)"]
    ))  # fmt: skip
    c = draw(_boolean(depth + 1)) if "{c}" in form else ""
    return form.format(a=a, b=b, c=c)


@st.composite
def _boolean(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 3 or draw(st.booleans()):
        return draw(st.sampled_from(["data.on", "true", "is_null(other.t)", "available(d.x)"]))
    a, b = draw(_numeric(depth + 1)), draw(_numeric(depth + 1))
    form = draw(
        st.sampled_from(
            ["{a} < {b}", "{a} == {b}", "not ({a} >= {b})", "({a} > {b} and {a} != 0)",
             "({a} > {b} or data.on)"]
        )
    )  # fmt: skip
    return form.format(a=a, b=b)


@settings(max_examples=300, deadline=None)
@given(
    value=_numeric(),
    condition=_boolean(),
    updates=st.lists(
        st.tuples(
            st.sampled_from(["data", "other"]),
            st.integers(1_000, 50_000),
            st.one_of(st.integers(-3, 3), st.floats(-1e3, 1e3), st.text(max_size=3)),
        ),
        max_size=12,
    ),
)
def test_fuzz_the_engine_never_crashes(
    value: str, condition: str, updates: list[tuple[str, int, Any]]
) -> None:
    """Whatever expressions a descriptor holds, loading either rejects them with problems or
    the engine runs: outputs, rejections with a reason, nothing else escapes."""
    so = ServiceObject.model_validate(
        {
            "id": "fz",
            "groups": {"group1": {"soIds": ["fz"], "stream": "data"}},
            "streams": {
                "data": {"channels": {"t": {"type": "number"}, "name": {"type": "string"},
                                      "on": {"type": "boolean"}, "where": {"type": "geo_point"}}},
                "other": {"channels": {"t": {"type": "number"}}},
                "d": {"channels": {"x": {"type": "number", "current-value": value}},
                      "pre-filter": condition},
            },
        }
    )  # fmt: skip
    plan, problems = CompositePlan.build(Registry({"fz": so}, {"fz": "<memory>"}))
    assert problems == []  # well-typed by construction
    engine = CompositeEngine(plan)
    for stream, at, v in updates:
        channel: dict[str, Any] = {"t": v} if type(v) is not str else {"name": v, "on": True}
        if stream == "other":
            channel = {"t": v if type(v) is not str else 0}
        out = engine.process([(StreamKey("fz", stream), SensorUpdate(channel, at))])
        assert all(type(u.channels["x"]) in (int, float) for _, u in out.derived)
        assert all(r.reason is RejectReason.EXPRESSION_FAILED for r in out.rejected)
