"""A unit's Prometheus metrics: the subset of `prometheus_client`'s API a unit uses (labelled
counters, gauges and histograms, collectors read when scraped) and the text exposition format
(version 0.0.4) its /metrics serves.

Ours rather than the library's for one reason: memory. `prometheus_client` imports `ssl`
unconditionally (and `urllib.request`, `wsgiref`, `http.client` through its exposition
module), so a unit using it maps OpenSSL whether or not anything in it speaks TLS (see
`cloudlet.unit_run.OpenSSLWithheld`): together 5.4 MB of the 44 a unit at rest took with the
library, 38 without. The services (gateway, cloud API) keep the library; for the same metrics
this writes byte for byte the text it writes (`tests/test_promtext.py`), less its `_created`
series.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


def number(value: float) -> str:
    """A sample's value as Prometheus (Go) writes it: 1.0, 2.5, +Inf, NaN, 1e+06."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python does
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Metric:
    """One metric family as scraped: its name, help, type and samples (name, labels, value)."""

    __slots__ = ("documentation", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, kind: str) -> None:
        self.name = name
        self.documentation = documentation
        self.type = kind
        self.samples: list[tuple[str, dict[str, str], float]] = []


class _Family(Metric):
    __slots__ = ("_labels", "_suffix")

    def __init__(
        self, name: str, documentation: str, kind: str, suffix: str,
        value: float | None, labels: Sequence[str] | None,
    ) -> None:  # fmt: skip
        super().__init__(name, documentation, kind)
        self._labels = tuple(labels or ())
        self._suffix = suffix
        if value is not None:
            if self._labels:
                raise ValueError("a family with labels takes its values through add_metric")
            self.add_metric((), value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        if len(labels) != len(self._labels):
            raise ValueError(f"{self.name}: {len(self._labels)} label values, got {len(labels)}")
        self.samples.append(
            (self.name + self._suffix, dict(zip(self._labels, labels, strict=True)), value)
        )


class CounterMetricFamily(_Family):
    """A counter read when scraped (a collector's); its samples are NAME_total."""

    def __init__(
        self, name: str, documentation: str, value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(name.removesuffix("_total"), documentation, "counter", "_total",
                         value, labels)  # fmt: skip


class GaugeMetricFamily(_Family):
    """A gauge read when scraped (a collector's)."""

    def __init__(
        self, name: str, documentation: str, value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(name, documentation, "gauge", "", value, labels)


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class CollectorRegistry:
    """The collectors a unit exports, in the order registered; `render` is its /metrics."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def register(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.append(collector)

    def claim(self, name: str) -> None:
        """A metric's name, taken once: two metrics of one name would scrape as one."""
        with self._lock:
            if name in self._names:
                raise ValueError(f"a metric named {name!r} is registered already")
            self._names.add(name)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of the sample NAME{LABELS} (exactly those labels), None if none."""
        wanted = labels or {}
        for metric in self.collect():
            for sample, got, value in metric.samples:
                if sample == name and got == wanted:
                    return value
        return None

    def render(self) -> bytes:
        """Every metric in the text exposition format 0.0.4, as `prometheus_client` writes it."""
        out: list[str] = []
        for metric in self.collect():
            name = metric.name + "_total" if metric.type == "counter" else metric.name
            out.append(f"# HELP {name} {_help(metric.documentation)}\n")
            out.append(f"# TYPE {name} {metric.type}\n")
            for sample, labels, value in metric.samples:
                if labels:
                    pairs = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
                    out.append(f"{sample}{{{pairs}}} {number(value)}\n")
                else:
                    out.append(f"{sample} {number(value)}\n")
        return "".join(out).encode()


# instruments: values a unit's threads update, read when scraped ------------------------------


class _Value:
    """One labelled series' number; a lock, since a unit's threads update it concurrently
    (`+=` on an attribute is not atomic in Python)."""

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._lock = threading.Lock()

    @property
    def value(self) -> float:
        return self._value

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount


class CounterChild(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up (inc by {amount})")
        with self._lock:
            self._value += amount


class GaugeChild(_Value):
    __slots__ = ()

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * len(bounds)  # per bucket, not cumulative: one add per observation
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)  # the first bucket whose bound is >= value
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def state(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


C = TypeVar("C")


class _Instrument(Generic[C]):
    """A metric with label names and a child per combination of label values (`labels`)."""

    kind = ""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self.name = name.removesuffix("_total") if self.kind == "counter" else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        self._lock = threading.Lock()
        registry.claim(self.name)
        registry.register(self)

    def _child(self) -> C:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._child())
        return child

    def _series(self) -> list[tuple[dict[str, str], C]]:
        with self._lock:
            items = list(self._children.items())
        return [(dict(zip(self.labelnames, key, strict=True)), child) for key, child in items]


S = TypeVar("S", bound=_Value)


class _Scalar(_Instrument[S]):
    """A metric whose series are one number each (a counter's samples are NAME_total)."""

    suffix = ""

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        sample = self.name + self.suffix
        for labels, child in self._series():
            metric.samples.append((sample, labels, child.value))
        yield metric


class Counter(_Scalar[CounterChild]):
    kind, suffix = "counter", "_total"

    def _child(self) -> CounterChild:
        return CounterChild()


class Gauge(_Scalar[GaugeChild]):
    kind = "gauge"

    def _child(self) -> GaugeChild:
        return GaugeChild()


class Histogram(_Instrument[HistogramChild]):
    kind = "histogram"

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
        registry: CollectorRegistry, buckets: Sequence[float],
    ) -> None:  # fmt: skip
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self.name, self.documentation, "histogram")
        for labels, child in self._series():
            counts, total = child.state()
            running = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                le = {**labels, "le": number(bound)}
                metric.samples.append((self.name + "_bucket", le, float(running)))
            metric.samples.append((self.name + "_count", labels, float(running)))
            metric.samples.append((self.name + "_sum", labels, total))
        yield metric
