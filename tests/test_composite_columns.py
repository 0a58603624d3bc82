"""Composite streams on columns: a derived stream computed by the column-expression kernel
from a batch's runs must give exactly what the update-by-update path gives from the same
updates as rows: the same derived updates in the same order and attributions, the same
rejections, stale triggers and counts, the same state; and the streams read update by update
in the same batch (a derived stream of a derived stream, a boolean channel, a flow over the
results) must see the same values."""

from __future__ import annotations

import contextlib
import math
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.engine import engine_of
from processors.engine.composite_columns import run_columns
from streams import SensorUpdate, StreamKey, kernels
from streams.accepted import ColumnRun, MessageRun, Updates
from streams.catalog import Catalog
from streams.kernels import _vector_py
from tests.test_accepted import _nan_equal

T0 = 1_700_006_400_000
OBJECT = """\
id: %(so)s
streams:
  data: {channels: {t: {type: number}, h: {type: number}, zone: {type: string}}}
  fahrenheit:
    pre-filter: "data.t > -60"
    channels: {f: {type: number, current-value: "data.t * 1.8 + 32"}}
  pair:
    channels:
      a: {type: number, current-value: "abs(data.t - 10)"}
      b: {type: number, current-value: "max(data.t, data.h)"}
  ratio:
    channels: {r: {type: number, current-value: "100 / data.t"}}
  plus:
    channels: {p: {type: number, current-value: "fahrenheit.f + 1"}}
  flag:
    channels: {ok: {type: boolean, current-value: "data.t > 5"}}
"""
FLOWS = """\
flows:
  f-avg:
    from: "s*/fahrenheit"
    window: {tumbling: 10s}
    watermark: {delay: 2s, lateness: 10s}
    aggregates: {f: avg(f), n: count()}
    into: "{so}/f_10s"
"""
S1, S2 = StreamKey("s1", "data"), StreamKey("s2", "data")


def _catalog(tmp_path: Path) -> Catalog:
    (tmp_path / "objects.yaml").write_text("---\n".join(OBJECT % {"so": s} for s in ("s1", "s2")))
    (tmp_path / "test.flows.yaml").write_text(FLOWS)
    catalog, problems = Catalog.check([tmp_path])
    assert problems == []
    return catalog


Reading = tuple[int, float | None, float | None, str]  # time offset, t, h, zone


def _rows(key: StreamKey, readings: list[Reading]) -> list[tuple[StreamKey, SensorUpdate]]:
    out = []
    for dt, t, h, zone in readings:
        channels: dict[str, Any] = {}
        if t is not None:
            channels["t"] = t
        if h is not None:
            channels["h"] = h
        channels["zone"] = zone
        out.append((key, SensorUpdate(channels, T0 + dt)))
    return out


def _doubles(values: list[float | None]) -> array[float]:
    return array("d", [math.nan if v is None else v for v in values])


def _part(key: StreamKey, readings: list[Reading], form: str) -> Any:
    """The readings as the ingest kernel keeps them: single-update messages of both streams
    (a message run, typed), a columnar message (a column run, typed), or rows."""
    times = array("q", [T0 + dt for dt, *_ in readings])
    if form == "messages":
        keys = [key if i % 3 else (S2 if key == S1 else S1) for i in range(len(readings))]
        return MessageRun(keys, times, ["t", "h", "zone"],
                          [_doubles([r[1] for r in readings]), _doubles([r[2] for r in readings]),
                           [r[3] for r in readings]])  # fmt: skip
    if form == "columns" and all(r[1] is not None and r[2] is not None for r in readings):
        return ColumnRun(key, times, ["t", "h", "zone"],
                         [_doubles([r[1] for r in readings]), _doubles([r[2] for r in readings]),
                          [r[3] for r in readings]])  # fmt: skip
    return _rows(key, readings)


def _as_rows(part: Any) -> list[tuple[StreamKey, SensorUpdate]]:
    return part if isinstance(part, list) else part.rows()


@contextlib.contextmanager
def _twin(on: bool) -> Iterator[None]:
    saved = kernels.derive_columns
    if on:
        kernels.derive_columns = _vector_py.derive_columns
    try:
        yield
    finally:
        kernels.derive_columns = saved


values = st.one_of(st.none(), st.floats(-100, 100), st.sampled_from([0.0, -0.0, 5.0, 1e300]))
step = st.one_of(st.integers(1, 3000), st.integers(-2000, 0))  # mostly rising, some not
readings = st.lists(st.tuples(step, values, st.one_of(st.none(), values), st.sampled_from("ab")),
                    min_size=1, max_size=8)  # fmt: skip


def _result(r: Any) -> Any:
    return (r.derived, r.derived_at, r.rejected, r.rejected_at, r.discarded,
            [(x.key, x.update, x.rejection) for x in r.late], r.late_at)  # fmt: skip


@pytest.mark.parametrize("twin", [False, True], ids=["compiled", "twin"])
@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.sampled_from([S1, S2]), readings,
                  st.sampled_from(["messages", "messages", "columns", "rows"])),
        max_size=10,
    ),
    cut=st.integers(1, 5),
)  # fmt: skip
def test_composite_streams_give_the_same_from_runs_as_from_rows(
    tmp_path_factory: pytest.TempPathFactory,
    twin: bool,
    messages: list[tuple[StreamKey, list[Reading], str]],
    cut: int,
) -> None:
    catalog = _catalog(tmp_path_factory.mktemp("composite"))
    as_runs, as_rows = engine_of(catalog, clock=lambda: 0.0), engine_of(catalog, clock=lambda: 0.0)
    with _twin(twin):
        for i in range(0, len(messages), cut):
            updates, rows = Updates(), []
            at = 0
            for key, items, form in messages[i : i + cut]:
                timed = []
                for dt, t, h, zone in items:  # offsets from the message's own start
                    at = max(at + dt, 0)
                    timed.append((at, t, h, zone))
                part = _part(key, timed, form)
                if isinstance(part, list):
                    updates.extend(part)
                else:
                    updates.add_part(part)
                rows += _as_rows(part)
            got, want = as_runs.process(updates), as_rows.process(rows)
            assert _result(got) == _result(want)
    assert _nan_equal(as_runs.snapshot()) == _nan_equal(as_rows.snapshot())
    assert as_runs.composite.counts == as_rows.composite.counts


def test_a_derived_stream_of_floats_is_computed_by_columns(tmp_path: Path) -> None:
    """Rising readings that carry every channel read: the arithmetic streams by columns, no
    row made of the batch; the rest (a boolean, a stream of a derived stream) as before."""
    catalog = _catalog(tmp_path)
    engine = engine_of(catalog, clock=lambda: 0.0)
    by_columns: list[str] = []

    def spy(node: Any, run: Any) -> bool:
        done = run_columns(node, run)
        if done:
            by_columns.append(node.derived.key.stream)
        return done

    batch = [(0, 20.0, 30.0, "a"), (1000, 25.0, 10.0, "b"), (2000, -70.0, 1.5, "a")]
    updates = Updates()
    updates.add_part(_part(S1, batch, "messages"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("processors.engine.composite_columns.run_columns", spy)
        result = engine.process(updates)
    assert sorted(set(by_columns)) == ["fahrenheit", "pair", "ratio"]
    derived = [(k.so, k.stream, u.channels, u.last_update - T0) for k, u in result.derived]
    # message 0 and 3 are s2's (the run interleaves the two objects)
    assert [d for d in derived if d[1] in ("fahrenheit", "pair", "ratio")] == [
        ("s2", "fahrenheit", {"f": 68.0}, 0),
        ("s2", "pair", {"a": 10.0, "b": 30.0}, 0),
        ("s2", "ratio", {"r": 5.0}, 0),
        ("s1", "fahrenheit", {"f": 77.0}, 1000),
        ("s1", "pair", {"a": 15.0, "b": 25.0}, 1000),
        ("s1", "ratio", {"r": 4.0}, 1000),
        ("s1", "pair", {"a": 80.0, "b": 1.5}, 2000),  # -70 fails the pre-filter of fahrenheit
        ("s1", "ratio", {"r": 100 / -70.0}, 2000),
    ]
    assert engine.composite.counts.filtered == 1
