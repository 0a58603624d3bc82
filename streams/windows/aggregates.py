"""Window aggregates: initialize / add / merge / result, over plain-data state.

State is plain lists and numbers, so a window's accumulators snapshot to msgpack or JSON and
restore exactly. `merge` combines two accumulators of the same aggregate (session windows
merging, for one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streams.expressions import Type

SKETCH_CAPACITY = 512
"""Samples a percentile keeps exactly; beyond that it compacts (see `_compact`)."""


@dataclass(frozen=True)
class Aggregate:
    name: str
    needs_argument: bool
    numeric: bool  # argument must be a number
    initial: Callable[[], Any]
    add: Callable[[Any, Any, int], Any]  # (state, value, event time ms) -> state
    merge: Callable[[Any, Any], Any]
    result: Callable[[Any, int, int], Any]  # (state, window start, window end) -> value | None
    returns: Type | None = Type.NUMBER  # None: the argument's type


def _count_add(s: int, _v: Any, _t: int) -> int:
    return s + 1


def _sum_add(s: list[float], v: float, _t: int) -> list[float]:
    # Neumaier's compensated summation: long windows of small readings stay exact enough.
    total, c = s
    t = total + v
    c += (total - t) + v if abs(total) >= abs(v) else (v - t) + total
    return [t, c]


def _sum_merge(a: list[float], b: list[float]) -> list[float]:
    return _sum_add([a[0], a[1] + b[1]], b[0], 0)


def _avg_add(s: list[float], v: float, _t: int) -> list[float]:
    return [*_sum_add(s[:2], v, 0), s[2] + 1]


def _avg_merge(a: list[float], b: list[float]) -> list[float]:
    return [*_sum_merge(a[:2], b[:2]), a[2] + b[2]]


def _avg_result(s: list[float], _start: int, _end: int) -> float | None:
    return (s[0] + s[1]) / s[2] if s[2] else None


def _extreme(pick: Callable[[Any, Any], Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def add(s: Any, v: Any, _t: int) -> Any:
        return v if s is None else pick(s, v)

    def merge(a: Any, b: Any) -> Any:
        return b if a is None else a if b is None else pick(a, b)

    return add, merge


def _first_add(s: list[Any] | None, v: Any, t: int) -> list[Any]:
    return [t, v] if s is None or t < s[0] else s


def _last_add(s: list[Any] | None, v: Any, t: int) -> list[Any]:
    return [t, v] if s is None or t >= s[0] else s


def _first_merge(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else (a if a[0] <= b[0] else b)


def _last_merge(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else (b if b[0] >= a[0] else a)


def _value_of(s: list[Any] | None, _start: int, _end: int) -> Any:
    return None if s is None else s[1]


def _welford_add(s: list[float], v: float, _t: int) -> list[float]:
    n, mean, m2 = s
    n += 1
    delta = v - mean
    mean += delta / n
    return [n, mean, m2 + delta * (v - mean)]


def _welford_merge(a: list[float], b: list[float]) -> list[float]:
    # Chan et al.: combine two partial variances exactly.
    if a[0] == 0:
        return b
    if b[0] == 0:
        return a
    n = a[0] + b[0]
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n
    return [n, mean, a[2] + b[2] + delta * delta * a[0] * b[0] / n]


def _stddev(sample: bool) -> Callable[[list[float], int, int], float | None]:
    def result(s: list[float], _start: int, _end: int) -> float | None:
        n = s[0]
        if n < (2 if sample else 1):
            return None
        return math.sqrt(max(0.0, s[2]) / (n - 1 if sample else n))

    return result


def _sketch_add(s: list[list[float]], v: float, _t: int) -> list[list[float]]:
    s.append([v, 1.0])
    return _compact(s) if len(s) > SKETCH_CAPACITY else s


def _sketch_merge(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    merged = a + b
    return _compact(merged) if len(merged) > SKETCH_CAPACITY else merged


def _compact(s: list[list[float]]) -> list[list[float]]:
    """Halve the sample: sort, then merge neighbours into weighted points. Deterministic, and
    each compaction moves any rank by at most one point's weight."""
    s.sort(key=lambda p: p[0])
    out: list[list[float]] = []
    for i in range(0, len(s) - 1, 2):
        (v1, w1), (v2, w2) = s[i], s[i + 1]
        out.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2])
    if len(s) % 2:
        out.append(s[-1])
    return out


def percentile_of(points: list[list[float]], p: float) -> float | None:
    """The p-th percentile (0..100) of weighted points, interpolating linearly between ranks
    (numpy's default method when every weight is 1)."""
    if not points:
        return None
    ordered = sorted(points, key=lambda q: q[0])
    total = sum(w for _, w in ordered)
    target = p / 100.0 * (total - 1)
    low = math.floor(target)

    def at(rank: float) -> float:
        seen = 0.0
        for v, w in ordered:
            seen += w
            if seen > rank:
                return v
        return ordered[-1][0]

    a, b = at(low), at(min(low + 1, total - 1))
    return a + (b - a) * (target - low)


def percentile_aggregate(p: float) -> Aggregate:
    """An approximate percentile: exact up to SKETCH_CAPACITY samples, compacted beyond."""
    return Aggregate(
        "percentile",
        True,
        True,
        list,
        _sketch_add,
        _sketch_merge,
        lambda s, _a, _b: percentile_of(s, p),
    )


def _rate_add(s: list[Any] | None, v: float, t: int) -> list[Any]:
    # [first time, first value, last time, last value]
    if s is None:
        return [t, v, t, v]
    first = [t, v] if t < s[0] else s[:2]
    last = [t, v] if t >= s[2] else s[2:]
    return first + last


def _rate_merge(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return b if a is None else a
    first = a[:2] if a[0] <= b[0] else b[:2]
    last = b[2:] if b[2] >= a[2] else a[2:]
    return first + last


def _rate_result(s: list[Any] | None, _start: int, _end: int) -> float | None:
    if s is None or s[2] == s[0]:
        return None
    rate: float = (s[3] - s[1]) / ((s[2] - s[0]) / 1000.0)
    return rate


def _count_rate(s: int, start: int, end: int) -> float:
    return s / ((end - start) / 1000.0) if end > start else 0.0


_max_add, _max_merge = _extreme(max)
_min_add, _min_merge = _extreme(min)

AGGREGATES: dict[str, Aggregate] = {
    a.name: a
    for a in [
        Aggregate("count", False, False, lambda: 0, _count_add, lambda a, b: a + b,
                  lambda s, _a, _b: s),
        Aggregate("sum", True, True, lambda: [0.0, 0.0], _sum_add, _sum_merge,
                  lambda s, _a, _b: s[0] + s[1]),
        Aggregate("avg", True, True, lambda: [0.0, 0.0, 0], _avg_add, _avg_merge, _avg_result),
        Aggregate("min", True, True, lambda: None, _min_add, _min_merge, lambda s, _a, _b: s),
        Aggregate("max", True, True, lambda: None, _max_add, _max_merge, lambda s, _a, _b: s),
        Aggregate("first", True, False, lambda: None, _first_add, _first_merge, _value_of,
                  returns=None),
        Aggregate("last", True, False, lambda: None, _last_add, _last_merge, _value_of,
                  returns=None),
        Aggregate("stddev", True, True, lambda: [0, 0.0, 0.0], _welford_add, _welford_merge,
                  _stddev(sample=True)),
        Aggregate("stddevp", True, True, lambda: [0, 0.0, 0.0], _welford_add, _welford_merge,
                  _stddev(sample=False)),
        Aggregate("rate", True, True, lambda: None, _rate_add, _rate_merge, _rate_result),
        Aggregate("count_rate", False, False, lambda: 0, _count_add, lambda a, b: a + b,
                  _count_rate),
    ]
}  # fmt: skip
