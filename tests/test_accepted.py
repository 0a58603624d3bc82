"""Columns through: a columnar message whose readings are all valid is kept as a column run,
no object per reading, and the flows read its columns. Everything must come out exactly as
when every reading is a row: the rows themselves, and what the flows compute from them."""

from __future__ import annotations

import contextlib
import math
from array import array
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.engine import engine_of
from processors.ingest import Ingest, RawMessage
from streams import SensorUpdate, StreamKey, kernels
from streams.accepted import ColumnRun, MessageRun, Updates
from streams.kernels import _columnar_py, _inputs_py, _vector_py, _windows_py
from tests.test_flows import FOLDED, T0, _catalog, numbers, su

S1, S2 = StreamKey("s1", "data"), StreamKey("s2", "data")
COLUMNS = """\
flows:
  avg-by-so:
    from: "s*/data"
    where: "t > -50"
    window: {tumbling: 10s}
    watermark: {delay: 3s, lateness: 15s}
    aggregates: {avg: avg(t), sum: sum(t), lo: min(t), hi: max(t), n: count()}
    into: "{so}/stats"
  all:
    from: "s*/data"
    key: none
    where: "10 >= t"
    window: {tumbling: 5s}
    aggregates: {n: count(), hi: max(t), last: last(zone)}
    into: "hub/all"
"""

# expressions over number channels: the column-expression kernel evaluates them over runs
DERIVED = """\
flows:
  fahrenheit:
    from: "s*/data"
    where: "t * 2 + 1 > -50 and not (t == 3) or available(t) and t < -90"
    window: {tumbling: 10s}
    watermark: {delay: 3s, lateness: 15s}
    aggregates:
      f: avg(t * 1.8 + 32)
      m: avg(max(min(t, 2.5, t / 2), -7.5))
      a: sum(abs(t - 10) % 7)
      c: "min(t > 0 ? t : -t)"
      n: count()
    into: "{so}/derived"
  failing:
    from: "s*/data"
    key: none
    where: "available(t) ? t != 1 : false"
    window: {tumbling: 5s}
    aggregates: {r: sum(100 / t), q: avg(sqrt(t)), z: avg(t / 1e300 * t), k: max(-t % 3)}
    into: "hub/failing"
"""


def _nan_equal(state: Any) -> Any:
    """A snapshot with each NaN made a string: a sum that overflowed to inf leaves a NaN
    compensation term, the same either way, which == alone would call different."""
    if isinstance(state, dict):
        return {k: _nan_equal(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_nan_equal(v) for v in state]
    return "nan" if isinstance(state, float) and math.isnan(state) else state


def _run(key: StreamKey, readings: list[tuple[int, Any, str]]) -> ColumnRun:
    return ColumnRun(key, [T0 + t for t, _, _ in readings], ["t", "zone"],
                     [[v for _, v, _ in readings], [z for *_, z in readings]])  # fmt: skip


def test_updates_read_as_the_rows_they_hold() -> None:
    run = _run(S2, [(1, 1.5, "a"), (2, 7, "b")])
    rows = [(S1, su(T0, t=0, zone="x")), (S2, su(T0 + 1, t=1.5, zone="a")),
            (S2, su(T0 + 2, t=7, zone="b")), (S1, su(T0 + 3, zone="y"))]  # fmt: skip
    updates = Updates([rows[0]])
    updates += Updates.of_run(run)
    updates.append(rows[3])
    assert len(updates) == 4 and updates.has_runs and updates.keys() == {S1, S2}
    assert updates[2] == rows[2] and updates[-1] == rows[3]  # one row, the others not made
    assert updates._rows is None
    assert updates == rows and list(updates) == rows and updates[1:3] == rows[1:3]
    with pytest.raises(IndexError):
        updates[4]
    copy = Updates()
    copy.extend(updates)
    copy.extend([rows[0]])
    assert copy == [*rows, rows[0]] and updates == rows  # extending did not change the first
    assert Updates() == [] and not Updates() and Updates(rows[:1]) == rows[:1]


def test_a_message_run_reads_as_its_messages() -> None:
    run = MessageRun([S1, S2, S1], [T0, T0 + 1, T0 + 2], ["t", "zone"],
                     [[1.5, None, 7], ["a", "b", None]])  # fmt: skip
    rows = [(S1, su(T0, t=1.5, zone="a")), (S2, su(T0 + 1, zone="b")), (S1, su(T0 + 2, t=7))]
    updates = Updates([(S2, su(T0 - 1, t=0.5))])
    updates.add_part(run)
    updates.append(rows[0])
    assert len(updates) == 5 and updates.keys() == {S1, S2}
    assert updates[2] == rows[1] and updates._rows is None
    assert updates[1:4] == rows and run.rows() == rows and [run.row(i) for i in range(3)] == rows
    assert list(updates[2][1].channels) == ["zone"]  # an absent channel is not a value


@contextlib.contextmanager
def _twins(on: bool) -> Iterator[None]:
    names = ["fold_windows", "column_inputs", "take_inputs", "fold_parts", "derive_columns"]
    saved = {n: getattr(kernels, n) for n in names}
    if on:
        for n in names:
            twin = {"fold_windows": _windows_py, "derive_columns": _vector_py}.get(n, _inputs_py)
            setattr(kernels, n, getattr(twin, n))
        kernels.columnar_fits = _columnar_py.columnar_fits
    try:
        yield
    finally:
        for n, kernel in saved.items():
            setattr(kernels, n, kernel)
        kernels.columnar_fits = kernels.columnar.columnar_fits


_message = st.tuples(
    st.sampled_from([S1, S2]),
    st.lists(
        st.tuples(st.integers(0, 60_000), numbers, st.sampled_from(["a", "b"])),
        min_size=1,
        max_size=8,
    ),
    # a column run (lists, or typed columns as the ingest kernel makes them: times int64, t
    # doubles), single-update messages (a message run: t may be absent), or rows (idem)
    st.sampled_from(["columns", "typed", "messages", "typed messages", "rows"]),
)


def _typed_run(key: StreamKey, readings: list[tuple[int, Any, str]]) -> ColumnRun:
    return ColumnRun(key, array("q", [T0 + t for t, _, _ in readings]), ["t", "zone"],
                     [array("d", [float(v) for _, v, _ in readings]),
                      [z for *_, z in readings]])  # fmt: skip


def _message_run(
    key: StreamKey, readings: list[tuple[int, Any, str]], typed: bool = False
) -> MessageRun:
    """Single-update messages of `key` or the other stream (t decides), as the ingest kernel
    keeps them: typed (int64 times, t as doubles, NaN where absent) or in lists."""
    keys = [key if (t // 7) % 2 else (S2 if key == S1 else S1) for t, _, _ in readings]
    if typed:
        return MessageRun(keys, array("q", [T0 + t for t, _, _ in readings]), ["t", "zone"],
                          [array("d", [float(v) if v != 0 else math.nan for _, v, _ in readings]),
                           [z for *_, z in readings]])  # fmt: skip
    return MessageRun(keys, [T0 + t for t, _, _ in readings], ["t", "zone"],
                      [[v if v != 0 else None for _, v, _ in readings],
                       [z for *_, z in readings]])  # fmt: skip


@pytest.mark.parametrize("flows", ["columns", "mixed", "derived"])
@pytest.mark.parametrize("twins", [False, True], ids=["compiled", "twins"])
@settings(max_examples=150, deadline=None)
@given(messages=st.lists(_message, max_size=12), cut=st.integers(1, 6))
def test_the_flows_give_the_same_from_column_runs_as_from_rows(
    tmp_path_factory: pytest.TempPathFactory, flows: str, twins: bool,
    messages: list[tuple[StreamKey, list[tuple[int, Any, str]], str]], cut: int,
) -> None:  # fmt: skip
    text = {"columns": COLUMNS, "derived": DERIVED}.get(flows) or FOLDED % {
        "delay": "3s", "lateness": "15s"}  # fmt: skip
    catalog, problems = _catalog(tmp_path_factory.mktemp("columns"), text)
    assert problems == []
    as_runs, as_rows = engine_of(catalog, clock=lambda: 0.0), engine_of(catalog, clock=lambda: 0.0)
    with _twins(twins):
        for i in range(0, len(messages), cut):
            updates, rows = Updates(), []
            for key, readings, form in messages[i : i + cut]:
                if form == "columns":
                    updates += Updates.of_run(_run(key, readings))
                    rows += _run(key, readings).rows()
                    continue
                if form == "typed":
                    updates += Updates.of_run(_typed_run(key, readings))
                    rows += _typed_run(key, readings).rows()
                    continue
                if form.endswith("messages"):
                    typed = form == "typed messages"
                    updates.add_part(_message_run(key, readings, typed))
                    rows += _message_run(key, readings, typed).rows()
                    continue
                for t, v, z in readings:
                    row = (key, su(T0 + t, **({"t": v} if v != 0 else {}), zone=z))
                    updates.append(row)
                    rows.append(row)
            got, want = as_runs.process(updates), as_rows.process(rows)
            assert (got.derived, got.derived_at, got.rejected, got.rejected_at) == (
                want.derived, want.derived_at, want.rejected, want.rejected_at)  # fmt: skip
            assert [(x.key, x.update, x.rejection) for x in got.late] == [
                (x.key, x.update, x.rejection) for x in want.late]  # fmt: skip
            assert got.late_at == want.late_at
            if flows == "columns" and updates.has_runs:
                assert updates._rows is None  # the runs were read as columns, never as rows
    assert _nan_equal(as_runs.snapshot()) == _nan_equal(as_rows.snapshot())


@pytest.mark.parametrize("twins", [False, True], ids=["compiled", "twins"])
def test_a_derived_flow_folds_runs_by_column_and_rejects_by_row(tmp_path: Any, twins: bool) -> None:
    catalog, problems = _catalog(tmp_path, DERIVED)
    assert problems == []
    as_runs, as_rows = engine_of(catalog, clock=lambda: 0.0), engine_of(catalog, clock=lambda: 0.0)
    with _twins(twins):
        for batch in ([(0, 4.0, "a"), (1, 9.5, "a"), (14, 1e6, "b")],  # all by column
                      [(15_000, 2.0, "a"), (16_000, -4.0, "b")]):  # fmt: skip
            updates = Updates()
            updates.add_part(_message_run(S1, batch, typed=True))
            got = as_runs.process(updates)
            want = as_rows.process(_message_run(S1, batch, typed=True).rows())
            assert (got.derived, got.rejected) == (want.derived, want.rejected)
            # the first batch never became rows; the second did (sqrt(-4) is rejected)
            assert (updates._rows is None) == (batch[0][0] == 0)
    assert [r.message for r in got.rejected] == [
        "s1/data: flow 'failing': sqrt() of a negative number (-4.0) (in 'avg(sqrt(t))')"
    ]
    assert _nan_equal(as_runs.snapshot()) == _nan_equal(as_rows.snapshot())


def _messages(docs: list[tuple[StreamKey, Any]]) -> list[RawMessage]:
    return [RawMessage(f"{k.so}/streams/{k.stream}", orjson.dumps(d)) for k, d in docs]


def test_ingest_keeps_a_good_columnar_message_as_columns(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    catalog, _ = _catalog(tmp_path_factory.mktemp("ingest"), COLUMNS)
    docs = [
        (S1, {"lastUpdate": [T0, T0 + 1], "channels": {"t": [1, 2.5], "zone": ["a", "b"]}}),
        (S2, {"lastUpdate": T0, "channels": {"t": {"current-value": 3}}}),
        # a bad cell, times in seconds: the validator's way, reading by reading
        (S1, {"lastUpdate": [T0, T0 + 1], "channels": {"t": [1, "x"], "zone": ["a", "b"]}}),
        (S1, {"lastUpdate": [1_700_006_400, 1_700_006_401], "channels": {"t": [1, 2]}}),
        (S2, {"lastUpdate": [T0 + 2], "channels": {"zone": ["c"]}}),  # only some channels
        (S2, {"lastUpdate": [], "channels": {"t": []}}),
    ]
    result = Ingest(catalog.registry).batch(_messages(docs))
    accepted = result.accepted
    assert [type(p).__name__ for p in accepted.parts] == [
        "ColumnRun", "list", "list", "list", "ColumnRun"]  # fmt: skip
    assert accepted == [
        (S1, SensorUpdate({"t": 1, "zone": "a"}, T0)),
        (S1, SensorUpdate({"t": 2.5, "zone": "b"}, T0 + 1)),
        (S2, SensorUpdate({"t": 3}, T0)),
        (S1, SensorUpdate({"t": 1, "zone": "a"}, T0)),
        (S1, SensorUpdate({"t": 1}, T0)),
        (S1, SensorUpdate({"t": 2}, T0 + 1_000)),
        (S2, SensorUpdate({"zone": "c"}, T0 + 2)),
    ]
    assert [m.payload for m in result.origins] == [m.payload for m in _messages(
        [docs[0], docs[0], docs[1], docs[2], docs[3], docs[3], docs[4]])]  # fmt: skip
    # the rejections, worded by the validator as before
    validator = catalog.registry.validator(S1.so, S1.stream)
    assert [d.rejection for d in result.dead_letters] == [
        validator.document(docs[2][1])[1][0],
        Ingest(catalog.registry).batch(_messages([docs[5]])).dead_letters[0].rejection,
    ]
    assert [d.rejection.reason.value for d in result.dead_letters] == [
        "wrong_type", "no_updates"]  # fmt: skip


def test_a_columnar_message_from_the_future_is_read_row_by_row() -> None:
    import tempfile
    from pathlib import Path

    catalog, _ = _catalog(Path(tempfile.mkdtemp()), COLUMNS)
    ingest = Ingest(catalog.registry, clock=lambda: T0 / 1000, max_future_ms=1_000)
    doc = {"lastUpdate": [T0, T0 + 5_000], "channels": {"t": [1, 2], "zone": ["a", "b"]}}
    result = ingest.batch(_messages([(S1, doc)]))
    assert [type(p).__name__ for p in result.accepted.parts] == ["list"]
    assert result.accepted == [(S1, SensorUpdate({"t": 1, "zone": "a"}, T0))]
    assert [d.rejection.reason.value for d in result.dead_letters] == ["future_timestamp"]
