"""A unit's own Prometheus metrics (`processors.promtext`) against `prometheus_client`: the
same metrics, updated the same way, render byte for byte the same /metrics text (the library
without its `_created` series, which a unit does not serve); what the library's parser reads
back is what was counted; `UnitMetrics` serves what a Prometheus scrape and our tests read."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import prometheus_client
import pytest
from prometheus_client.core import CounterMetricFamily as TheirCounterFamily
from prometheus_client.core import GaugeMetricFamily as TheirGaugeFamily
from prometheus_client.parser import text_string_to_metric_families

from processors import promtext
from processors.metrics import UnitMetrics

ODD = 'a "quoted"\\ back\nslash'  # every character the format escapes
BUCKETS = (0.001, 0.5, 1, 2.5, 1_000_000, 25_000_000)


@pytest.fixture
def no_created() -> Iterator[None]:
    prometheus_client.disable_created_metrics()
    try:
        yield
    finally:
        prometheus_client.enable_created_metrics()


def _exercise(lib: Any, registry: Any, counter_family: Any, gauge_family: Any) -> None:
    """The same metrics and updates through either library's API."""
    counter = lib.Counter("c_things", "Things\ncounted \\ here", ["unit", "reason"],
                          registry=registry).labels("u1", ODD)  # fmt: skip
    counter.inc()
    counter.inc(2.5)
    other = lib.Counter("c_more_total", "More", ["unit"], registry=registry)
    other.labels("b").inc(1e21)
    other.labels("a").inc(0)
    gauge = lib.Gauge("g_depth", "Depth", ["unit"], registry=registry).labels("u1")
    gauge.set(7)
    gauge.inc(3)
    gauge.dec(0.25)
    lib.Gauge("g_unset", "Never set", ["unit"], registry=registry)
    hist = lib.Histogram("h_seconds", "Time", ["unit"], registry=registry,
                         buckets=BUCKETS).labels("u1")  # fmt: skip
    for value in (0.0005, 0.001, 0.7, 3, 3, 2_000_000, 1e9, math.inf):
        hist.observe(value)

    class Collected:
        def collect(self) -> Iterator[Any]:
            depth = gauge_family("q_depth", "Queued, by priority", labels=["unit", "priority"])
            depth.add_metric(["u1", "0"], 12)
            depth.add_metric(["u1", "1"], -1.5)
            yield depth
            yield counter_family("q_sent", "Sent", value=1_234_567)
            yield gauge_family("q_nan", "Unknown", value=math.nan)

    registry.register(Collected())


def test_the_text_is_what_prometheus_client_writes(no_created: None) -> None:
    theirs = prometheus_client.CollectorRegistry()
    _exercise(prometheus_client, theirs, TheirCounterFamily, TheirGaugeFamily)
    ours = promtext.CollectorRegistry()
    _exercise(promtext, ours, promtext.CounterMetricFamily, promtext.GaugeMetricFamily)
    expected = prometheus_client.generate_latest(theirs).decode()
    assert ours.render().decode() == expected
    assert 'c_things_total{reason="a \\"quoted\\"\\\\ back\\nslash",unit="u1"} 3.5' in expected
    assert 'h_seconds_bucket{le="2.5e+07",unit="u1"} 6.0' in expected  # Go's exponents


def test_what_the_parser_reads_back_is_what_was_counted() -> None:
    ours = promtext.CollectorRegistry()
    _exercise(promtext, ours, promtext.CounterMetricFamily, promtext.GaugeMetricFamily)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(ours.render().decode())
               for s in family.samples}  # fmt: skip
    assert samples[("c_things_total", (("reason", ODD), ("unit", "u1")))] == 3.5
    assert samples[("c_more_total", (("unit", "b"),))] == 1e21
    assert samples[("g_depth", (("unit", "u1"),))] == 9.75
    assert [samples[("h_seconds_bucket", (("le", le), ("unit", "u1")))]
            for le in ("0.001", "0.5", "1.0", "2.5", "1e+06", "2.5e+07", "+Inf")
            ] == [2, 2, 3, 3, 5, 6, 8]  # fmt: skip
    assert samples[("h_seconds_count", (("unit", "u1"),))] == 8
    assert samples[("q_depth", (("priority", "1"), ("unit", "u1")))] == -1.5
    assert math.isnan(samples[("q_nan", ())])
    assert ours.get_sample_value("c_things_total", {"unit": "u1", "reason": ODD}) == 3.5
    assert ours.get_sample_value("c_things_total", {"unit": "u1"}) is None  # exact labels
    assert ours.get_sample_value("h_seconds_sum", {"unit": "u1"}) == math.inf


def test_misuse_is_refused_with_the_reason() -> None:
    registry = promtext.CollectorRegistry()
    counter = promtext.Counter("dup", "One", ["unit"], registry=registry)
    with pytest.raises(ValueError, match="registered already"):
        promtext.Gauge("dup", "Two", registry=registry)
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("u").inc(-1)
    with pytest.raises(ValueError, match="labels"):
        counter.labels("u", "extra")
    family = promtext.GaugeMetricFamily("f", "F", labels=["a", "b"])
    with pytest.raises(ValueError, match="2 label values, got 1"):
        family.add_metric(["x"], 1)


def test_threads_counting_at_once_lose_nothing() -> None:
    registry = promtext.CollectorRegistry()
    counter = promtext.Counter("n", "N", ["unit"], registry=registry)
    hist = promtext.Histogram("h", "H", ["unit"], registry=registry, buckets=(1,))

    def work() -> None:
        for _ in range(20_000):
            counter.labels("u").inc()
            hist.labels("u").observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.get_sample_value("n_total", {"unit": "u"}) == 80_000
    assert registry.get_sample_value("h_count", {"unit": "u"}) == 80_000
    assert registry.get_sample_value("h_sum", {"unit": "u"}) == 40_000


def test_a_units_metrics_render_as_the_library_would(no_created: None) -> None:
    metrics = UnitMetrics("u-text")
    metrics.received.inc(3)
    metrics.reject("bad_json", 2)
    metrics.batch_messages.observe(7)
    text = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["cloudlet_messages_received"].type == "counter"
    assert 'cloudlet_updates_rejected_total{reason="bad_json",unit="u-text"} 2.0' in text
    assert 'cloudlet_batch_messages_bucket{le="10.0",unit="u-text"} 1.0' in text
    assert metrics.received.value == 3
