"""Windows: boundaries, watermark, late data, and properties against a naive reference."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.engine.windows import WindowOperator
from streams.windows.aggregates import (
    AGGREGATES,
    SKETCH_CAPACITY,
    percentile_aggregate,
    percentile_of,
)
from streams.windows.model import LateUpdate, Windowing, WindowResult

COUNT_AVG = [("n", AGGREGATES["count"]), ("avg", AGGREGATES["avg"])]


def run(op: WindowOperator, events: list[tuple[str, int, float]]) -> list[Any]:
    out: list[Any] = []
    for key, t, v in events:
        fired, late = op.process(key, t, [True, v])
        out.extend(fired)
        out.extend(late)
    return out


def r(key: str, start: int, end: int, updated: bool = False, **values: Any) -> WindowResult:
    return WindowResult(key, start, end, values, updated)


def test_tumbling_boundaries_and_firing_on_the_watermark() -> None:
    op = WindowOperator(Windowing("tumbling", 10_000), COUNT_AVG)
    assert run(op, [("k", 0, 1), ("k", 9_999, 3)]) == []  # [0, 10000) holds 0 and 9999
    assert run(op, [("k", 10_000, 5)]) == [r("k", 0, 10_000, n=2, avg=2.0)]
    assert run(op, [("j", 12_000, 7)]) == []
    # each key has its own clock: k's moves only k's windows
    assert run(op, [("k", 25_000, 1)]) == [r("k", 10_000, 20_000, n=1, avg=5.0)]
    assert run(op, [("j", 20_000, 2)]) == [r("j", 10_000, 20_000, n=1, avg=7.0)]


def test_one_keys_clock_never_makes_another_keys_updates_late() -> None:
    op = WindowOperator(Windowing("tumbling", 60_000), COUNT_AVG)
    year_9999 = 253_402_300_000_000
    assert run(op, [("a", 1_000, 1), ("b", 2_000, 2)]) == []
    assert run(op, [("a", year_9999, 5)]) == [r("a", 0, 60_000, n=1, avg=1.0)]
    # b's window is still open, and b's updates are in time
    assert run(op, [("b", 30_000, 4)]) == []
    assert run(op, [("b", 60_000, 0)]) == [r("b", 0, 60_000, n=2, avg=3.0)]
    assert op.late_count == 0


def test_a_device_replaying_its_buffer_gets_its_own_windows() -> None:
    op = WindowOperator(Windowing("tumbling", 60_000), COUNT_AVG)
    run(op, [("live", t, 1) for t in range(0, 600_000, 10_000)])  # ten minutes of one device
    # another device was offline for those ten minutes and now replays them, in order
    replayed = run(op, [("offline", t, 2) for t in range(0, 600_000, 10_000)])
    assert replayed == [r("offline", m * 60_000, (m + 1) * 60_000, n=6, avg=2.0) for m in range(9)]
    assert op.late_count == 0


def test_a_silent_keys_windows_fire_after_idle_and_late_updates_stay_late() -> None:
    op = WindowOperator(Windowing("tumbling", 60_000, idle=300_000), COUNT_AVG)
    run(op, [("quiet", 1_000, 2), ("quiet", 20_000, 4), ("busy", 1_000, 1)])
    assert op.fire_idle(now=0) == []  # first look: the clocks are marked
    assert op.fire_idle(now=299_999) == []
    run(op, [("busy", 30_000, 3)])  # busy's clock moved: it is not idle
    assert op.fire_idle(now=300_000) == [r("quiet", 0, 60_000, n=2, avg=3.0)]
    assert "quiet" not in op.keys and op.clocks["quiet"] == 60_000  # state gone, clock kept
    # the device comes back: an update to the fired window is late, not a second result
    assert run(op, [("quiet", 30_000, 9)]) == [LateUpdate("quiet", 30_000, 60_000)]
    assert run(op, [("quiet", 61_000, 1), ("quiet", 120_000, 1)]) == [
        r("quiet", 60_000, 120_000, n=1, avg=1.0)
    ]
    assert op.fire_idle(now=900_000) == [r("busy", 0, 60_000, n=2, avg=2.0)]


def test_per_key_clocks_survive_a_snapshot_and_old_snapshots_load() -> None:
    op = WindowOperator(Windowing("tumbling", 10_000), COUNT_AVG)
    run(op, [("a", 1_000, 1), ("b", 25_000, 1)])
    again = WindowOperator(Windowing("tumbling", 10_000), COUNT_AVG)
    again.restore(op.snapshot())
    assert again.clocks == {"a": 1_000, "b": 25_000}
    assert run(again, [("a", 5_000, 3)]) == []  # in time for a, whatever b's clock
    old = op.snapshot()
    del old["clocks"]  # written before per-key clocks: every key had the operator's
    again.restore(old)
    assert again.clocks == {"a": 25_000, "b": 25_000}


def test_late_updates_go_to_the_side_output() -> None:
    op = WindowOperator(Windowing("tumbling", 10_000), COUNT_AVG)
    run(op, [("k", 1_000, 1), ("k", 12_000, 2)])
    assert run(op, [("k", 3_000, 9)]) == [LateUpdate("k", 3_000, 12_000)]
    assert op.late_count == 1


def test_watermark_delay_waits_for_stragglers() -> None:
    op = WindowOperator(Windowing("tumbling", 10_000, delay=5_000), COUNT_AVG)
    assert run(op, [("k", 1_000, 1), ("k", 12_000, 2)]) == []  # watermark 7000: [0,10000) open
    assert run(op, [("k", 3_000, 3)]) == []  # a straggler, still in time
    assert run(op, [("k", 15_000, 4)]) == [r("k", 0, 10_000, n=2, avg=2.0)]


def test_allowed_lateness_updates_a_fired_window_then_expires_it() -> None:
    op = WindowOperator(Windowing("tumbling", 10_000, allowed_lateness=10_000), COUNT_AVG)
    assert run(op, [("k", 1_000, 1), ("k", 12_000, 3)]) == [r("k", 0, 10_000, n=1, avg=1.0)]
    assert run(op, [("k", 2_000, 5)]) == [r("k", 0, 10_000, True, n=2, avg=3.0)]
    assert run(op, [("k", 21_000, 0)]) == [r("k", 10_000, 20_000, n=1, avg=3.0)]
    assert run(op, [("k", 4_000, 9)]) == [LateUpdate("k", 4_000, 21_000)]  # past 10000 + 10000


def test_hopping_windows_overlap() -> None:
    op = WindowOperator(Windowing("hopping", 10_000, hop=5_000), COUNT_AVG)
    assert run(op, [("k", 1_000, 1), ("k", 6_000, 3)]) == [r("k", -5_000, 5_000, n=1, avg=1.0)]
    assert run(op, [("k", 16_000, 5)]) == [
        r("k", 0, 10_000, n=2, avg=2.0),
        r("k", 5_000, 15_000, n=1, avg=3.0),
    ]


def test_sliding_window_fires_on_every_update_over_the_last_size() -> None:
    op = WindowOperator(Windowing("sliding", 10_000), COUNT_AVG)
    assert run(op, [("k", 1_000, 1), ("k", 5_000, 2), ("k", 11_000, 6), ("k", 11_001, 1)]) == [
        r("k", -9_000, 1_000, n=1, avg=1.0),
        r("k", -5_000, 5_000, n=2, avg=1.5),
        r("k", 1_000, 11_000, n=2, avg=4.0),  # (1000, 11000]: 1000 itself is out
        r("k", 1_001, 11_001, n=3, avg=3.0),
    ]


def test_session_windows_merge_and_close_after_the_gap() -> None:
    op = WindowOperator(Windowing("session", 0, gap=5_000, delay=10_000), COUNT_AVG)
    assert run(op, [("k", 1_000, 1), ("k", 4_000, 2), ("k", 20_000, 9)]) == [
        r("k", 1_000, 9_000, n=2, avg=1.5)  # watermark 10000 passed 4000 + gap
    ]
    assert run(op, [("k", 30_000, 1), ("k", 40_000, 3)]) == [r("k", 20_000, 25_000, n=1, avg=9.0)]
    # 30000 and 40000 are two sessions until 35000, within a gap of both, bridges them
    assert run(op, [("k", 35_000, 2)]) == []
    assert op.flush() == [r("k", 30_000, 45_000, n=3, avg=2.0)]


def test_count_windows_follow_arrival_order() -> None:
    op = WindowOperator(Windowing("count", 3, hop=2), COUNT_AVG)
    assert run(op, [("k", t * 1000, t) for t in range(1, 8)]) == [
        r("k", 1_000, 3_000, n=3, avg=2.0),
        r("k", 3_000, 5_000, n=3, avg=4.0),
        r("k", 5_000, 7_000, n=3, avg=6.0),
    ]


def test_empty_windows_are_emitted_only_when_asked() -> None:
    quiet = WindowOperator(Windowing("tumbling", 10_000), COUNT_AVG)
    loud = WindowOperator(Windowing("tumbling", 10_000, emit_empty=True), COUNT_AVG)
    events = [("k", 1_000, 1), ("k", 35_000, 2)]
    assert run(quiet, events) == [r("k", 0, 10_000, n=1, avg=1.0)]
    assert run(loud, events) == [
        r("k", 0, 10_000, n=1, avg=1.0),
        r("k", 10_000, 20_000, n=0),  # avg of nothing is left out, not 0
        r("k", 20_000, 30_000, n=0),
    ]


def test_processing_time_fires_on_the_injected_clock() -> None:
    op = WindowOperator(Windowing("tumbling", 10_000, processing_time=True), COUNT_AVG)
    op.process("k", 1_000, [True, 4])  # the caller passes the clock's time, not lastUpdate
    op.process("k", 2_000, [True, 6])
    assert op.advance(9_999) == []
    assert op.advance(10_000) == [r("k", 0, 10_000, n=2, avg=5.0)]


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("sum", [0.1] * 10, 1.0),
        ("min", [3, -1, 2], -1),
        ("max", [3, -1, 2], 3),
        ("stddev", [2, 4, 4, 4, 5, 5, 7, 9], statistics.stdev([2, 4, 4, 4, 5, 5, 7, 9])),
        ("stddevp", [2, 4, 4, 4, 5, 5, 7, 9], 2.0),
        ("stddev", [5], None),  # a sample of one has no deviation
    ],
)
def test_aggregates(name: str, values: list[float], expected: Any) -> None:
    agg = AGGREGATES[name]
    state = agg.initial()
    for i, v in enumerate(values):
        state = agg.add(state, v, i)
    result = agg.result(state, 0, 1)
    assert result == (pytest.approx(expected) if expected is not None else None)


def test_first_last_and_rate_follow_event_time_not_arrival() -> None:
    first, last, rate = AGGREGATES["first"], AGGREGATES["last"], AGGREGATES["rate"]
    s1, s2, s3 = first.initial(), last.initial(), rate.initial()
    for t, v in [(3_000, "c"), (1_000, "a"), (2_000, "b")]:
        s1, s2 = first.add(s1, v, t), last.add(s2, v, t)
    for t, v in [(3_000, 30.0), (1_000, 10.0), (2_000, 20.0)]:
        s3 = rate.add(s3, v, t)
    assert (first.result(s1, 0, 0), last.result(s2, 0, 0)) == ("a", "c")
    assert rate.result(s3, 0, 0) == 10.0  # +20 over 2 s
    count_rate = AGGREGATES["count_rate"]
    assert count_rate.result(5, 0, 10_000) == 0.5  # updates per second


def _naive_percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    pos = p / 100 * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=SKETCH_CAPACITY),
    p=st.sampled_from([0, 10, 50, 90, 99, 100]),
)
def test_percentile_is_exact_up_to_the_sketch_capacity(values: list[float], p: float) -> None:
    agg = percentile_aggregate(p)
    state = agg.initial()
    for v in values:
        state = agg.add(state, v, 0)
    assert agg.result(state, 0, 0) == pytest.approx(_naive_percentile(values, p), abs=1e-6)


def test_percentile_beyond_capacity_stays_close_in_rank() -> None:
    values = [(i * 7919) % 10_000 for i in range(10_000)]  # 0..9999, shuffled
    for p in (10, 50, 90, 99):
        agg = percentile_aggregate(p)
        state = agg.initial()
        for v in values:
            state = agg.add(state, float(v), 0)
        assert len(state) <= SKETCH_CAPACITY
        assert abs(agg.result(state, 0, 0) - _naive_percentile(values, p)) < 10_000 * 0.02
    assert percentile_of([], 50) is None


# Properties against a deliberately naive reference -------------------------------------------

_events = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 100_000), st.integers(-50, 50)),
    max_size=60,
)
_specs = st.one_of(
    st.builds(lambda s: Windowing("tumbling", s), st.sampled_from([1_000, 7_000, 10_000])),
    st.builds(
        lambda s, h: Windowing("hopping", s * h, hop=h),
        st.sampled_from([2, 3]),
        st.sampled_from([1_000, 5_000]),
    ),
    st.builds(lambda g: Windowing("session", 0, gap=g), st.sampled_from([500, 3_000, 20_000])),
)


def _naive(
    spec: Windowing, events: list[tuple[str, int, int]]
) -> dict[tuple[str, int, int], list[int]]:
    """Each window's values, computed the obvious way from the whole (sorted) input."""
    windows: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    if spec.kind == "session":
        by_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for key, t, v in events:
            by_key[key].append((t, v))
        for key, items in by_key.items():
            items.sort()
            session: list[tuple[int, int]] = []
            for t, v in items:
                if session and t - session[-1][0] > spec.gap:
                    windows[(key, session[0][0], session[-1][0] + spec.gap)] = [
                        x for _, x in session
                    ]
                    session = []
                session.append((t, v))
            windows[(key, session[0][0], session[-1][0] + spec.gap)] = [x for _, x in session]
        return windows
    step = spec.size if spec.kind == "tumbling" else spec.hop
    for key, t, v in events:
        for start in range(t - t % step - spec.size + step, t + 1, step):
            if start <= t < start + spec.size:
                windows[(key, start, start + spec.size)].append(v)
    return windows


@settings(max_examples=300, deadline=None)
@given(spec=_specs, events=_events)
def test_in_order_input_matches_the_naive_reference(
    spec: Windowing, events: list[tuple[str, int, int]]
) -> None:
    events = sorted(events, key=lambda e: e[1])
    op = WindowOperator(spec, COUNT_AVG)
    fired = [x for x in run(op, events) if isinstance(x, WindowResult)] + op.flush()
    assert not [x for x in run(op, []) if isinstance(x, LateUpdate)]
    got = {(w.key, w.start, w.end): (w.values["n"], w.values["avg"]) for w in fired}
    expected = {w: (len(vs), sum(vs) / len(vs)) for w, vs in _naive(spec, events).items()}
    assert got.keys() == expected.keys()
    for window, (n, avg) in expected.items():
        assert got[window][0] == n
        assert got[window][1] == pytest.approx(avg)
    assert len(fired) == len(got)  # each window fired once


@settings(max_examples=300, deadline=None)
@given(
    events=_events,
    delay=st.sampled_from([0, 2_000, 50_000]),
    lateness=st.sampled_from([0, 5_000]),
)
def test_out_of_order_input_loses_nothing(
    events: list[tuple[str, int, int]], delay: int, lateness: int
) -> None:
    """Every update is counted in the final result of exactly one window or reported late."""
    op = WindowOperator(
        Windowing("tumbling", 10_000, delay=delay, allowed_lateness=lateness), COUNT_AVG
    )
    out = run(op, events)
    final: dict[tuple[str, int], int] = {}
    for x in [*out, *op.flush()]:
        if isinstance(x, WindowResult):
            final[(x.key, x.start)] = x.values["n"]  # a re-firing replaces the earlier result
    late = [x for x in out if isinstance(x, LateUpdate)]
    assert sum(final.values()) + len(late) == len(events)
    if delay >= 100_000:
        assert late == []


@settings(max_examples=200, deadline=None)
@given(spec=_specs, events=_events, cut=st.integers(0, 60))
def test_snapshot_and_restore_mid_window_equal_an_uninterrupted_run(
    spec: Windowing, events: list[tuple[str, int, int]], cut: int
) -> None:
    whole = WindowOperator(spec, COUNT_AVG)
    expected = run(whole, events) + whole.flush()
    first = WindowOperator(spec, COUNT_AVG)
    head = run(first, events[:cut])
    second = WindowOperator(spec, COUNT_AVG)
    second.restore(first.snapshot())
    run(first, [("a", 999_999, 1)])  # the snapshot must not share state with the original
    assert head + run(second, events[cut:]) + second.flush() == expected


@settings(max_examples=300, deadline=None)
@given(
    events=_events,
    kind=st.sampled_from(["tumbling", "hopping"]),
    delay=st.sampled_from([0, 2_000, 50_000]),
    lateness=st.sampled_from([0, 5_000, 30_000]),
)
def test_firing_from_the_due_index_equals_scanning_every_key(
    events: list[tuple[str, int, int]], kind: str, delay: int, lateness: int
) -> None:
    """Tumbling and hopping windows fire from a heap of due windows; the full scan of every
    key (kept for sessions and empty windows) is the reference: same results, same order."""
    spec = Windowing(kind, 10_000, hop=5_000 if kind == "hopping" else 0,  # type: ignore[arg-type]
                     delay=delay, allowed_lateness=lateness)  # fmt: skip
    indexed, scanning = WindowOperator(spec, COUNT_AVG), WindowOperator(spec, COUNT_AVG)
    scanning.indexed = False
    assert run(indexed, events) + indexed.flush() == run(scanning, events) + scanning.flush()
