"""A processing unit's data plane over MQTT: ingest, flows, outputs, checkpoints.

Device messages arrive with QoS 1 on a persistent session (optionally an MQTT v5 shared
subscription, so replicas split the load). For each batch the unit validates, runs the flow
engine, publishes accepted and derived updates and dead letters, and hands results to its sink.
A message is acknowledged to the broker only when all of that is done and, with a state store,
when a snapshot covering it is on disk ("checkpoint, then acknowledge"). A unit killed at any
point therefore loses nothing: the broker redelivers what was not acknowledged, and the state
restored from the snapshot has not seen it yet. Flow control is MQTT v5's receive maximum, so
memory stays bounded without blocking the network thread and without dropping anything.

The MQTT side is `processors.wire.WireClient`: packets are cut from the socket's bytes by the
compiled frame kernel and reach the worker as lists, not one callback per message. What happens
to a batch between the broker and the outputs is `processors.pipeline.Pipeline`; its echo,
`processors.echo.Echo`.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processors.actuation import ActuationLog
from processors.chain import Chain
from processors.config import RepublishSettings
from processors.echo import Echo
from processors.engine.flows import FlowEngine
from processors.inbox import Inbox
from processors.ingest import DeadLetter, Ingest, IngestBatch, internal_error
from processors.metrics import UnitMetrics
from processors.pipeline import Outputs, Pipeline
from processors.reload import Rebuilt
from processors.sink import ResultSink
from processors.state import BrokerState, StateStore
from processors.wire import WireClient
from streams import (
    Codec,
    Rejection,
    RejectReason,
    encode_update,
)
from streams.actuation import ActuationError, StatusReport
from streams.rejections import dead_letter_record
from streams.transport.mqtt import MqttSettings

Clock = Callable[[], float]
log = logging.getLogger(__name__)
# What a device message adds to its body on the wire at most: topic (65,535), header, properties.
MAX_TOPIC_OVERHEAD = 70_000
# The site broker's max_packet_size as shipped (compose/mosquitto.conf, `cloudlet export`). A
# unit takes packets at least this large: a message the broker acknowledged to its device but
# which is over the Maximum Packet Size a unit announced is dropped by the broker for that unit,
# unseen by it (1.07 MiB, with the default max_payload, was a silent loss of every message
# between that and the broker's 4 MiB). Bodies over max_payload become dead letters with an
# excerpt, their size and their SHA-256; the broker refuses larger packets at the device.
SITE_MAX_PACKET = 4 * 1024 * 1024
PUBLISH_WINDOW = 2000  # unacknowledged publishes before the worker waits for the broker
# and bytes of their payloads: batched echoes of 100-reading messages are hundreds of kB each,
# and 75 of them (22 MB) were measured waiting for the broker at a unit's peak. At 8 MiB the
# batched echo ran 25-35% slower (the worker waiting, the broker's PUBACKs behind its flood)
PUBLISH_WINDOW_BYTES = 16 << 20
FLUSH_PATIENCE = 30.0  # seconds waiting for the broker's acknowledgements before saying so
UNPUBLISHABLE_EXCERPT = 1024  # bytes of an output too large to publish kept in its dead letter
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, not imported: only a SQLite sink loads SQLite
Message = Any  # a `streams.kernels.Publish`: compiled or its twin, the same attributes


@dataclass(slots=True)
class PublishCounts:
    messages: int = 0  # device messages fully handled: outputs out, input acknowledged
    updates: int = 0  # accepted device updates
    derived: int = 0  # from composite streams and windows
    dead_letters: int = 0

    def add(self, other: PublishCounts) -> None:
        self.messages += other.messages
        self.updates += other.updates
        self.derived += other.derived
        self.dead_letters += other.dead_letters


@dataclass(frozen=True)
class CheckpointPolicy:
    every_ms: int = 5_000
    messages: int = 500


class UnitRuntime:
    """Subscribes to device topics and runs `Ingest` and the flow engine in batches."""

    def __init__(
        self,
        ingest: Ingest,
        mqtt_settings: MqttSettings,
        *,
        engine: FlowEngine | None = None,
        chain: Chain | None = None,
        client_id: str = "cloudlet-unit",
        subscription: str | None = None,
        batch_size: int = 500,
        batch_bytes: int = 256 * 1024,
        linger: float = 0.0,
        state: StateStore | BrokerState | None = None,
        checkpoint: CheckpointPolicy = CheckpointPolicy(),
        sink: ResultSink | None = None,
        metrics: UnitMetrics | None = None,
        clock: Clock = time.time,
        republish: RepublishSettings | None = None,
        subscriptions: list[tuple[str, int]] | None = None,
        actuations: ActuationLog | None = None,
        still_ours: Callable[[], bool] = lambda: True,
        inbox_bytes: int = 8 << 20,
        spill_dir: Path | None = None,
    ) -> None:
        """`subscriptions` (a partition's objects' topics) take the place of the device and
        status-report filters; `actuations` is the log of commands and reports, when several
        runtimes share one (a replica's partitions); `still_ours`, asked before reconnecting,
        whether the session is still this runtime's (a partition another replica took is not);
        `inbox_bytes`, what received messages may take in memory before the rest waits in a
        temporary file in `spill_dir` (`processors.inbox`); `linger` (seconds), how long a
        batch smaller than `batch_size` waits for more after its first message."""
        self.ingest = ingest
        self.republish = republish or RepublishSettings()
        self.engine = engine
        self.chain = chain  # the processors, in the engine's graph: for their state, teardown
        assert chain is None or engine is not None, "the processors run in an engine's graph"
        self.pipeline = Pipeline(ingest, engine, clock)
        self.settings = mqtt_settings
        self.subscription = subscription or ingest.topics.device_updates_filter
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.state = state
        self.checkpoint = checkpoint
        self.sink = sink
        self.metrics = metrics or UnitMetrics(client_id)
        self.clock = clock
        self.published = PublishCounts()
        self.actuations = actuations or ActuationLog()
        self._inbox = Inbox(inbox_bytes, spill_dir, self.metrics.spilled.inc)
        self._carry: list[Message] = []  # the rest of a list larger than a batch
        self._stopping = threading.Event()
        # Another replica took this runtime's session (a partition moved): stop at once, commit
        # nothing; the new owner has the session and its unacknowledged messages.
        self._fenced = threading.Event()
        # processed, waiting for a checkpoint: what acknowledging them needs, not the messages
        # (their payloads would be held for as long, megabytes while a backlog drains)
        self._unacked: list[Held] = []
        self._overrun_said = -60.0  # when an overrun of our receive maximum was last logged
        # Without a state store, inputs are acknowledged once the broker has everything they
        # produced, while the next batches go on: (how many of `_unacked` a batch ends at, the
        # number of its last output, in the client's count).
        self._marks: deque[tuple[int, int]] = deque()
        self._covered: set[tuple[object, ...]] = set()  # from the restored snapshot
        # Redeliveries after a reconnect (flagged DUP): of a message processed and not yet
        # acknowledged (its packet id is held), or acknowledged just before the connection
        # dropped (its PUBACK may be lost).
        self._held: set[int] = set()
        # packet id -> (topic, payload checksum) of the last message acknowledged under it:
        # bounded by the 65,535 packet ids
        self._acked: dict[int, tuple[str, int]] = {}
        self._letters: list[DeadLetter] = []  # from status reports, published with the batch
        self._rebuilt: queue.SimpleQueue[Rebuilt] = queue.SimpleQueue()  # changes, to swap in
        self.disk_full = False  # waiting for space: not acknowledging, not ready
        self._commits = 0
        self._last_checkpoint = clock()
        # Status reports are not shared between replicas: each keeps its own log of them.
        self._client = WireClient(
            mqtt_settings,
            client_id,
            subscriptions=subscriptions
            or [(self.subscription, 1), (ingest.topics.action_status_filter, 1)],
            on_messages=self._on_messages,
            on_connection=self._on_connection,
            on_confirmed=self._inbox.wake,  # wake the worker: inputs to acknowledge
            clock=clock,
            max_packet=max(ingest.max_payload, SITE_MAX_PACKET) + MAX_TOPIC_OVERHEAD,
            on_taken_over=self._on_taken_over,
            may_reconnect=still_ours,
        )
        self.connected = self._client.connected
        self.echo = Echo(self.republish, ingest.topics, self._echo_limit, PUBLISH_WINDOW)
        self._seen = (0, 0)  # the client's malformed and refused counts, as last exported
        self._worker = threading.Thread(target=self._run, name="cloudlet-unit", daemon=True)
        if isinstance(self.state, BrokerState):  # loaded once connected, by the worker
            self.state.client = self._client
            self._client.subscriptions += self.state.subscriptions
        elif self.state is not None:
            saved = self.state.load()
            if saved is not None:
                self._restore(saved)
                log.info("restored state from %s", self.state.path)

    def _snapshot(self) -> dict[str, object]:
        return {
            "flows": self.engine.snapshot() if self.engine is not None else None,
            "processors": self.chain.snapshot() if self.chain is not None else None,
            # The messages this snapshot covers, acknowledged only after it is on disk: if
            # the unit dies in between, the broker redelivers them, and they must not count
            # twice (see _skip_redelivered).
            "covered": [h[1:] for h in self._unacked if h[0] > 0],
            # what the session is subscribed to: whoever resumes it with other objects (a
            # partition after a registry change) leaves the rest
            "subscriptions": [topic for topic, _ in self._client.subscriptions],
        }

    def _restore(self, saved: dict[str, object]) -> None:
        flows, processors = saved.get("flows"), saved.get("processors")
        if self.engine is not None and isinstance(flows, dict):
            self.engine.restore(flows)
        if self.chain is not None and isinstance(processors, dict):
            self.chain.restore(processors)
        covered = saved.get("covered")
        if isinstance(covered, list):
            self._covered = {tuple(c) for c in covered}

    def _skip_redelivered(self, batch: list[Message]) -> list[Message]:
        """Leave out redeliveries (flagged DUP) of messages already processed: after a
        reconnect, those held for a checkpoint (their acknowledgement covers the redelivery
        too) and those acknowledged just before the connection dropped (acknowledged again);
        after a restart, those the restored snapshot covers (killed after the snapshot, before
        the acknowledgements). A redelivery keeps its packet id; the payload's checksum guards
        against a packet id reused since."""
        if not any(m.dup for m in batch):
            return batch
        fresh = []
        seen: set[int] = set()
        for m in batch:
            if not m.dup or m.qos == 0:
                fresh.append(m)
                seen.add(m.packet_id)
                continue
            if m.packet_id in self._held or m.packet_id in seen:
                self.metrics.redelivered.inc()  # the original's PUBACK will answer it
                continue
            identity = _identity(m)
            if self._acked.get(m.packet_id) == identity[1:] or identity in self._covered:
                self._covered.discard(identity)
                self._unacked.append((m.qos, *identity))  # acknowledged again at the next commit
                self.metrics.redelivered.inc()
            else:
                fresh.append(m)
                seen.add(m.packet_id)
        return fresh

    # network thread: never block here -----------------------------------------------------

    def _on_messages(self, messages: list[Message]) -> None:
        if isinstance(self.state, BrokerState):
            messages = self.state.take(messages)
        self._inbox.put(messages)
        self.metrics.inbox.inc(len(messages))

    def _on_connection(self, up: bool) -> None:
        self.metrics.connected.set(1 if up else 0)

    def _on_taken_over(self) -> None:
        self._fenced.set()
        self._inbox.wake()

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> UnitRuntime:
        self._client.start()
        self._worker.start()
        return self

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    @property
    def ready(self) -> bool:
        """Connected, subscribed, and able to make progress (not waiting for disk space)."""
        return self.connected.is_set() and not self.disk_full and self.alive

    @property
    def fenced(self) -> bool:
        return self._fenced.is_set()

    @property
    def stopping(self) -> bool:
        """Told to stop (its worker ends once it has drained): not a dead worker."""
        return self._stopping.is_set()

    def stop(self, timeout: float = 10.0, farewell: list[tuple[str, bytes]] | None = None) -> None:
        """Finish the messages already received, checkpoint, acknowledge, publish `farewell`
        (retained: a partition's owner cleared), disconnect."""
        self._stopping.set()
        self._worker.join(timeout)
        if farewell and not self.fenced:
            self._client.publish(farewell, 1, retain=True)
            self._client.flush(5.0)
        self._client.stop()
        self._inbox.close()
        if self.sink is not None:
            self.sink.close()
        if self.chain is not None:
            self.chain.teardown()

    # worker ----------------------------------------------------------------------------------

    def _take_batch(self) -> list[Message]:
        """What has arrived, up to `batch_size` messages and `batch_bytes` of payload, without
        waiting for more (unless `linger` says to): the batching adapts to the traffic. When
        it is light, a batch is the message that just came (no latency added to fill a
        batch); under load, the messages that arrived while the last batch was processed, so
        the fixed cost of a batch is shared by more of them. With a `linger`, a batch not full
        waits that long after its first message for more (the wait is in real time, as the
        inbox's own)."""
        batch, self._carry = self._carry, []
        if not batch:
            try:
                batch = self._inbox.get(timeout=0.05)
            except queue.Empty:
                return []
        # taken from the inbox up to the batch's bounds only: what is taken is in memory, and
        # the inbox's bound on memory holds only for what it keeps (taking up to `batch_size`
        # messages of 1 MB each pulled 100+ MB back from its spill file into the carry)
        size = sum(len(m.payload) for m in batch)
        while len(batch) < self.batch_size and size < self.batch_bytes:
            try:
                more = self._inbox.get_nowait()
            except queue.Empty:
                break
            size += sum(len(m.payload) for m in more)
            batch = batch + more
        if self.linger and len(batch) < self.batch_size:
            deadline = time.monotonic() + self.linger
            while len(batch) < self.batch_size and size < self.batch_bytes:  # not full yet
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    more = self._inbox.get(timeout=left)
                except queue.Empty:
                    break
                size += sum(len(m.payload) for m in more)
                batch = batch + more
        size, end, limit = 0, min(len(batch), self.batch_size), self.batch_bytes
        for i in range(end):  # and at most batch_bytes of payload (one message at least)
            size += len(batch[i].payload)
            if size > limit and i:
                end = i
                break
        if len(batch) > end:
            batch, self._carry = batch[:end], batch[end:]
        self.metrics.inbox.dec(len(batch))
        self.metrics.spill_bytes.set(self._inbox.spill_bytes)
        return batch

    def replace(self, rebuilt: Rebuilt) -> None:
        """Swap in what a change of the registry gave (`processors.reload`), between two
        batches: any thread may call it; the worker does it."""
        self._rebuilt.put(rebuilt)
        self._inbox.wake()

    def _swap(self) -> None:
        r = self._rebuilt.get_nowait()
        while not self._rebuilt.empty():  # the latest change is what the files say now
            r = self._rebuilt.get_nowait()
        r.adopt(self.engine, self.chain)
        self.ingest, self.engine = r.ingest, r.engine
        self.chain = r.chain if len(r.chain) else None
        self.pipeline = Pipeline(r.ingest, r.engine, self.clock)
        self.metrics.watch(r.chain)
        self.metrics.reloads.inc()
        log.info("registry reloaded: %d objects, %d flows", len(r.catalog.registry),
                 len(r.catalog.flows))  # fmt: skip

    def _run(self) -> None:
        try:
            if isinstance(self.state, BrokerState):
                saved = self.state.load(self._stopping, self._fenced.is_set)
                if saved is not None:
                    self._restore(saved)
                    log.info("restored state from %s", self.state.path)
                    now = {topic for topic, _ in self._client.subscriptions}
                    stale = [
                        t
                        for t in saved.get("subscriptions") or []
                        if isinstance(t, str) and t not in now
                    ]
                    self._client.unsubscribe(stale)  # the session's, of objects not ours now
            self._loop()
        except _Fenced:
            log.info("%s: taken over by another replica; stopped", self._client.client_id)

    def _loop(self) -> None:
        last_tick = 0.0
        while True:
            if self._fenced.is_set():
                raise _Fenced
            if not self._rebuilt.empty():
                self._swap()
            batch = self._take_batch()
            if not batch:
                if self._stopping.is_set():
                    self._commit()
                    return
                self._ack_confirmed()
                if self.engine is not None and self.clock() - last_tick >= 1.0:
                    last_tick = self.clock()  # processing-time windows fire without input
                    self._publish(self._tick())
                if self._unacked and self._checkpoint_due():
                    self._commit()
                continue
            started = time.perf_counter()
            self.metrics.batch_messages.observe(len(batch))
            batch = self._take_status_reports(self._skip_redelivered(batch))
            result, outputs = self._process(batch)
            self._publish(outputs)
            if self.sink is not None:
                self._durably(self.sink.write, [*outputs.updates, *outputs.derived])
            self._unacked.extend(_held(batch))
            self._hold(batch)
            self._count(batch, result, outputs)
            if self.state is None:
                self._marks.append((len(self._unacked), self._client.published))
                self._ack_confirmed()
            elif self._checkpoint_due():
                self._commit()
            self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _hold(self, batch: list[Message]) -> None:
        """Processed, held until acknowledged; and what the broker sent beyond our receive
        maximum counted (and said, once a minute): Mosquitto 2.0.11 does while it drains a
        backlog and our acknowledgements come in bulk (the inbox keeps memory bounded)."""
        held = self._held
        before = len(held)
        held.update(m.packet_id for m in batch if m.qos > 0)
        limit = self.settings.receive_maximum
        beyond = len(held) - max(before, limit)
        if beyond > 0:
            self.metrics.overrun.inc(beyond)
            now = time.monotonic()
            if now - self._overrun_said >= 60.0:
                self._overrun_said = now
                log.warning("the broker sent messages beyond this unit's receive maximum (%d):"
                            " %d held unacknowledged (a broker bug: Mosquitto 2.0.11 does"
                            " while draining a backlog; past inbox_bytes they wait on disk)",
                            limit, len(held))  # fmt: skip

    def _process(self, batch: list[Message]) -> tuple[IngestBatch, Outputs]:
        letters, self._letters = self._letters, []
        result, outputs = self.pipeline.process(batch)
        result.dead_letters[:0] = letters  # the status reports' own
        return result, outputs

    def _tick(self) -> Outputs:
        try:
            return self.pipeline.tick()
        except Exception as exc:  # a bug firing a window: logged, counted, tried again later
            self.metrics.internal_errors.inc()
            internal_error(exc, None)
            return Outputs()

    def _durably(self, write: Callable[[Any], None], what: Any) -> None:
        """`write(what)`; while the disk is full, wait and retry (not ready, acknowledging
        nothing), and go on by itself once there is space again."""
        delay = 0.25
        while True:
            try:
                write(what)
                break
            except Exception as exc:  # OSError, or a SQLite sink's OperationalError
                if not _disk_full(exc):
                    raise
                if not self.disk_full:
                    log.error("disk full (%s): not acknowledging, not ready, retrying", exc)
                    self.metrics.disk_full.inc()
                    self.disk_full = True
            if self._stopping.wait(delay):  # unacknowledged: the broker keeps it all
                raise OSError(errno.ENOSPC, "disk still full while stopping")
            delay = min(delay * 2, 5.0)
        if self.disk_full:
            log.warning("disk space is back: going on")
            self.disk_full = False

    def _take_status_reports(self, batch: list[Message]) -> list[Message]:
        """Record the devices' status reports; the rest of the batch is device data. A report
        that cannot be read is dead-lettered `bad_status_report`."""
        data = []
        parse = self.ingest.topics.parse_action_status
        for m in batch:
            topic = m.topic
            # a status report's topic ends so (<so>/actions/<id>/status): parse only those
            about = parse(topic) if topic.endswith("/status") else None
            if about is None:
                data.append(m)
                continue
            self._unacked.extend(_held([m]))
            if m.qos > 0:
                self._held.add(m.packet_id)
            try:
                report = StatusReport.from_json(m.payload)
                self.actuations.reported(about[0], report)
                self.metrics.actuation_reports.labels(self.metrics.unit, report.status).inc()
            except ActuationError as exc:
                rejection = Rejection(
                    RejectReason.BAD_STATUS_REPORT, f"{about[0]}: {exc}", about[0], None
                )
                self._letters.append(self.ingest.dead_letter(m, rejection))
                self.metrics.reject(rejection.reason.value)
            except Exception as exc:  # counted with the dead letters
                self._letters.append(self.ingest.dead_letter(m, internal_error(exc, None)))
        return data

    def _checkpoint_due(self) -> bool:
        return (
            len(self._unacked) >= self.checkpoint.messages
            or (self.clock() - self._last_checkpoint) * 1000 >= self.checkpoint.every_ms
        )

    def _commit(self) -> None:
        """Wait until the broker has every output so far, snapshot the state (when there is
        a store), then acknowledge the inputs that covers."""
        while not self._client.flush(FLUSH_PATIENCE):  # said, so that a wedged unit shows
            if self._fenced.is_set():
                raise _Fenced
            log.warning("the broker has not acknowledged %d publishes in %.0f s (%s)",
                        self._client.outstanding, FLUSH_PATIENCE,
                        "connected" if self.connected.is_set() else "not connected")  # fmt: skip
        if self.state is not None:
            self._durably(self.state.save, self._snapshot())
            self.metrics.checkpoints.inc()
        self._last_checkpoint = self.clock()
        self._acknowledge(len(self._unacked))

    def _ack_confirmed(self) -> None:
        """Without a state store: acknowledge the inputs of the batches whose outputs the
        broker has all acknowledged, without waiting for the others (they wake us)."""
        marks, confirmed, upto = self._marks, self._client.confirmed, 0
        while marks and marks[0][1] <= confirmed:
            upto = marks.popleft()[0]
        if upto:
            self._acknowledge(upto)
        if marks:
            self._client.wake_when_confirmed(marks[0][1])

    def _acknowledge(self, count: int) -> None:
        """PUBACK the first `count` processed inputs."""
        done, self._unacked = self._unacked[:count], self._unacked[count:]
        acked = [h for h in done if h[0] > 0]
        self._client.ack([h[1] for h in acked])
        for _, packet_id, topic, checksum in acked:
            self._acked[packet_id] = (topic, checksum)
            self._held.discard(packet_id)
        if not self._unacked:
            self._held.clear()
        self._marks = deque((end - count, mark) for end, mark in self._marks if end > count)
        self.published.messages += len(done)
        self.metrics.unacknowledged.set(len(self._unacked))
        self._commits += 1
        if self._commits == 2:
            # Redeliveries come first when the session resumes; by now they are all in.
            self._covered.clear()

    def _count(self, batch: list[Message], result: IngestBatch, out: Outputs) -> None:
        m = self.metrics
        m.received.inc(len(batch))
        m.accepted.inc(len(result.accepted))
        m.derived.inc(len(out.derived))
        m.dead_letters.inc(len(out.dead_letters))
        for letter in out.dead_letters:
            if letter.rejection.reason is RejectReason.BAD_STATUS_REPORT:
                continue  # counted when it was read
            m.reject(letter.rejection.reason.value, letter.count)
            if letter.rejection.reason is RejectReason.INTERNAL_ERROR:
                m.internal_errors.inc(letter.count)
            if letter.rejection.reason is RejectReason.LATE:
                m.late.inc(letter.count)
        m.unacknowledged.set(len(self._unacked))
        client = self._client
        m.malformed_packets.inc(client.metrics_malformed - self._seen[0])
        m.publishes_refused.inc(client.refused_publishes - self._seen[1])
        self._seen = (client.metrics_malformed, client.refused_publishes)

    def _echo_limit(self) -> int:
        """The most bytes an echo list holds: within the broker's packet size and the unit's
        own payload limit."""
        return min(self.ingest.max_payload, self._client.max_packet // 2)

    def _unpublishable(self, topic: str, body: bytes) -> tuple[str, bytes]:
        """The `unpublishable` dead letter (with an excerpt) of an output the client refused:
        over MQTT's limits (a topic over 65,535 bytes, a packet over the broker's maximum),
        it would have broken the session."""
        self.metrics.unpublishable.inc()
        self.metrics.dead_letters.inc()
        size = len(topic.encode("utf-8", "replace")) + len(body)
        rejection = Rejection(
            RejectReason.UNPUBLISHABLE,
            f"an output of {size} bytes to {topic[:200]!r} cannot be published: it is over"
            f" MQTT's limits (topics up to 65,535 bytes, packets up to {self._client.max_packet})",
        )
        self.metrics.reject(rejection.reason.value)
        log.error("%s", rejection.message)
        letter = dead_letter_record(rejection, topic=topic, payload=body,
                                    received_at=int(self.clock() * 1000),
                                    max_payload=UNPUBLISHABLE_EXCERPT)  # fmt: skip
        return self.ingest.topics.dead_letter(None, None), letter

    def _send(self, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
        """Publish in slices of at most PUBLISH_WINDOW messages and half PUBLISH_WINDOW_BYTES
        of payload, waiting for the broker between them while either window is full: a
        message may carry thousands of readings, and what waits for the broker is held in
        memory."""
        content_type = Codec.JSON.content_type
        client = self._client
        for part in _slices(messages, PUBLISH_WINDOW, PUBLISH_WINDOW_BYTES // 2):
            while client.outstanding >= PUBLISH_WINDOW or (
                client.outstanding_bytes >= PUBLISH_WINDOW_BYTES
            ):  # bounded windows in flight
                if client.wait_below(PUBLISH_WINDOW // 2, 1.0, PUBLISH_WINDOW_BYTES // 2):
                    break
                if self._fenced.is_set():
                    raise _Fenced
            refused = client.publish(part, qos, content_type)
            if refused:  # over MQTT's limits: a dead letter that fits instead
                letters = [self._unpublishable(t, b) for t, b in refused]
                client.publish(letters, 1, content_type)

    def _publish(self, result: Outputs) -> None:
        topics = self.ingest.topics
        # A publish made while disconnected is queued and sent after reconnecting.
        for echoes in self.echo.messages(result):
            self._send(echoes, self.republish.qos)
        for i in range(0, len(result.derived), PUBLISH_WINDOW):
            derived = result.derived[i : i + PUBLISH_WINDOW]
            self._send([(topics.updates(k.so, k.stream), encode_update(u)) for k, u in derived])
        self._send([(letter.topic, letter.body) for letter in result.dead_letters])
        for command in result.actuations:
            self.actuations.sent(command)
            self.metrics.actuations.inc()
            log.info("actuation %s: %s %s %s", command.id, command.so, command.action,
                     command.parameters)  # fmt: skip
        self._send([(topics.actions(c.so), c.to_json()) for c in result.actuations])
        # Not waiting for the broker here: inputs are acknowledged only once it has everything
        # they produced (`_ack_confirmed`, `_commit`), and the next batch goes on meanwhile.
        self.published.updates += len(result.updates)
        self.published.derived += len(result.derived)
        self.published.dead_letters += len(result.dead_letters)


class _Fenced(Exception):
    """This runtime's session was taken over: it stops where it is."""


def _disk_full(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL


def _identity(message: Message) -> tuple[int, str, int]:
    return (message.packet_id, message.topic, zlib.crc32(message.payload))


def _slices(
    messages: list[tuple[str, bytes]], count: int, nbytes: int
) -> Iterator[list[tuple[str, bytes]]]:
    """`messages` in order, in lists of at most `count` messages and `nbytes` of payload (one
    message at least)."""
    start, size = 0, 0
    for i, (_, payload) in enumerate(messages):
        if i > start and (i - start >= count or size + len(payload) > nbytes):
            yield messages[start:i]
            start, size = i, 0
        size += len(payload)
    if start < len(messages):
        yield messages[start:]


# a processed message waiting for its acknowledgement: (qos, packet id, topic, checksum)
Held = tuple[int, int, str, int]


def _held(batch: list[Message]) -> list[Held]:
    crc = zlib.crc32
    return [(m.qos, m.packet_id, m.topic, crc(m.payload) if m.qos else 0) for m in batch]
