"""A unit's metrics (Prometheus) and its /metrics, /healthz and /readyz endpoints.

The endpoints are served by the standard library's threading HTTP server: three fixed paths
do not need a web framework, and the unit stays small.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from processors.actuation import ActuationLog
from processors.chain import Chain
from processors.promtext import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    CounterMetricFamily,
    Gauge,
    Histogram,
    Metric,
)
from streams.transport.web import bearer


class UnitMetrics:
    """One registry per unit, so that several units can live in one process (tests)."""

    def __init__(self, unit: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, ["unit"], registry=r).labels(unit)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, ["unit"], registry=r).labels(unit)

        self.unit = unit
        self._processors: _ProcessorCollector | None = None
        self.received = counter("cloudlet_messages_received", "Device messages received")
        self.accepted = counter("cloudlet_updates_accepted", "Sensor updates accepted")
        self.rejected = Counter(
            "cloudlet_updates_rejected", "Input rejected, by reason", ["unit", "reason"],
            registry=r,
        )  # fmt: skip
        self.derived = counter("cloudlet_updates_derived", "Updates derived by flows")
        self.late = counter("cloudlet_updates_late", "Updates too late for their window")
        self.dead_letters = counter("cloudlet_dead_letters", "Dead letters published")
        self.checkpoints = counter("cloudlet_checkpoints", "State snapshots written")
        self.redelivered = counter(
            "cloudlet_redeliveries_skipped",
            "Redelivered messages the restored state already held (killed between a snapshot"
            " and its acknowledgements)",
        )
        self.unpublishable = counter(
            "cloudlet_unpublishable",
            "Outputs over MQTT's limits (topic over 65,535 bytes, packet over the broker's"
            " maximum): each replaced by a dead letter that fits, or dropped when none fits",
        )
        self.internal_errors = counter(
            "cloudlet_internal_errors",
            "Messages a bug of ours failed on (dead-lettered internal_error; logged once)",
        )
        self.disk_full = counter(
            "cloudlet_disk_full_waits",
            "Times the unit found its disk full and waited (not ready) for space",
        )
        self.malformed_packets = counter(
            "cloudlet_mqtt_malformed_packets",
            "Malformed MQTT packets from the broker (each drops the connection; the broker"
            " redelivers)",
        )
        self.publishes_refused = counter(
            "cloudlet_mqtt_publishes_refused",
            "Publishes the broker refused (a PUBACK with a failure reason) or that exceed its"
            " maximum packet size",
        )
        self.batch_seconds = Histogram(
            "cloudlet_batch_seconds",
            "Time to process a batch, from decoding to outputs acknowledged by the broker",
            ["unit"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        ).labels(unit)
        self.batch_messages = Histogram(
            "cloudlet_batch_messages",
            "Messages in a batch: what arrived while the last batch was processed (few when"
            " traffic is light, up to batch_size under load)",
            ["unit"],
            registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
        ).labels(unit)
        self.reloads = counter(
            "cloudlet_registry_reloads", "Changes of the registry taken without a restart"
        )
        self.reload_failures = counter(
            "cloudlet_registry_reload_failures",
            "Changes of the registry not taken (a problem in a file: the unit runs what it had)",
        )
        self.inbox = gauge("cloudlet_inbox_depth", "Messages received, not yet processed")
        self.spilled = counter(
            "cloudlet_inbox_spilled",
            "Messages received beyond what the unit holds in memory (inbox_bytes), kept in a"
            " temporary file until processed (a broker overrunning the receive maximum)",
        )
        self.spill_bytes = gauge(
            "cloudlet_inbox_spill_bytes", "Bytes of received messages waiting in that file"
        )
        self.unacknowledged = gauge(
            "cloudlet_unacknowledged", "Messages processed, waiting for a checkpoint"
        )
        self.overrun = counter(
            "cloudlet_receive_maximum_overrun",
            "Messages processed while this unit already held its receive maximum"
            " unacknowledged: the broker broke MQTT v5 flow control",
        )
        self.connected = gauge("cloudlet_mqtt_connected", "1 while connected to the broker")
        self.actuations = counter("cloudlet_actuations_sent", "Commands sent to devices")
        self.actuation_reports = Counter(
            "cloudlet_actuation_reports", "Status reports from devices, by status",
            ["unit", "status"], registry=r,
        )  # fmt: skip

    def watch(self, chain: Chain) -> None:
        """Export each processor's counts (read when scraped, so nothing is counted twice);
        called again with the chain a reload made, it exports that one's."""
        if self._processors is None:
            self._processors = _ProcessorCollector(self.unit, chain)
            self.registry.register(self._processors)
        self._processors.chain = chain

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected.labels(self.unit, reason).inc(count)

    def render(self) -> bytes:
        return self.registry.render()


class _ProcessorCollector:
    def __init__(self, unit: str, chain: Chain) -> None:
        self.unit = unit
        self.chain = chain

    def collect(self) -> Iterator[Metric]:
        updates = CounterMetricFamily(
            "cloudlet_processor_updates",
            "Updates through each processor: received, emitted, failed",
            labels=["unit", "processor", "outcome"],
        )
        seconds = CounterMetricFamily(
            "cloudlet_processor_seconds",
            "Time spent in each processor",
            labels=["unit", "processor"],
        )
        for stage in self.chain.stages:
            c = stage.counts
            for outcome, n in (("received", c.received), ("emitted", c.emitted),
                               ("failed", c.failed)):  # fmt: skip
                updates.add_metric([self.unit, stage.name, outcome], n)
            seconds.add_metric([self.unit, stage.name], c.seconds)
        yield updates
        yield seconds


class StatusServer:
    """GET /metrics (Prometheus text), /healthz (the unit's worker is alive) and /readyz
    (connected and subscribed: ready for traffic)."""

    def __init__(
        self,
        metrics: UnitMetrics,
        host: str,
        port: int,
        *,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        actuations: ActuationLog | None = None,
        token: bytes | None = None,
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if token is not None and self.path not in ("/healthz", "/readyz"):
                    given = bearer(self.headers.get("Authorization", ""))
                    if not hmac.compare_digest(given, token):
                        self._reply(401, b"send Authorization: Bearer <token>\n")
                        return
                if self.path == "/metrics":
                    self._reply(200, metrics.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok = healthy()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"worker stopped\n")
                elif self.path == "/readyz":
                    ok = ready()
                    text = b"ready\n" if ok else b"not ready: see /metrics and the log\n"
                    self._reply(200 if ok else 503, text)
                elif self.path == "/actuations" and actuations is not None:
                    self._reply(200, orjson.dumps(actuations.recent()), "application/json")
                elif self.path.startswith("/actuations/") and actuations is not None:
                    entry = actuations.get(self.path.removeprefix("/actuations/"))
                    if entry is None:
                        self._reply(404, b'{"error": "no such actuation"}', "application/json")
                    else:
                        self._reply(200, orjson.dumps(entry), "application/json")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz, /readyz or /actuations\n")

            def _reply(self, code: int, body: bytes, kind: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass  # scrapes every few seconds would flood the log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cloudlet-status", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
