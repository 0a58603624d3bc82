"""The ingest stage of a processing unit, run over MQTT.

Device messages arrive with QoS 1 on a persistent session. Each is acknowledged to the broker
only after what it produced (accepted updates on `.../updates`, dead letters) has itself been
acknowledged by the broker, so a unit that dies loses nothing: the broker redelivers. Flow
control is MQTT v5's receive maximum: the broker never has more than that many unacknowledged
messages in flight to us, so memory stays bounded without blocking the network thread and
without dropping anything.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from processors.ingest import DeadLetter, Ingest, IngestBatch, RawMessage
from streams import Codec, SensorUpdate, StreamKey, encode_update
from streams.flows.engine import FlowEngine, FlowResult
from streams.mqtt import MqttSettings, connect, content_type_properties, make_client

Clock = Callable[[], float]


@dataclass(slots=True)
class PublishCounts:
    messages: int = 0  # device messages fully handled: outputs published, input acknowledged
    updates: int = 0  # accepted device updates
    derived: int = 0  # from composite streams and windows
    dead_letters: int = 0


@dataclass(slots=True)
class Outputs:
    """What one batch produced, ready to publish."""

    updates: list[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    derived: list[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


class IngestRuntime:
    """Subscribes to device topics, runs `Ingest` and the flow engine in batches, publishes
    accepted and derived updates, and dead letters for everything refused."""

    def __init__(
        self,
        ingest: Ingest,
        mqtt_settings: MqttSettings,
        *,
        engine: FlowEngine | None = None,
        client_id: str = "cloudlet-ingest",
        batch_size: int = 500,
        clock: Clock = time.time,
    ) -> None:
        self.ingest = ingest
        self.engine = engine
        self.settings = mqtt_settings
        self.batch_size = batch_size
        self.clock = clock
        self.published = PublishCounts()
        self.connected = threading.Event()
        self._inbox: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self._stopping = threading.Event()
        # mids the broker has acknowledged (PUBACK), consumed by the worker that published them
        self._acked: set[int] = set()
        self._acked_changed = threading.Condition()
        self._client = make_client(mqtt_settings, client_id)
        self._client.manual_ack_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._worker = threading.Thread(target=self._run, name="cloudlet-ingest", daemon=True)

    # paho callbacks (network thread): never block here -------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _properties: object,
    ) -> None:
        if getattr(reason, "is_failure", False):
            return
        # Subscribing on every connect keeps the subscription across reconnects.
        client.subscribe(self.ingest.topics.device_updates_filter, qos=1)
        self.connected.set()

    def _on_disconnect(self, *_args: object) -> None:
        self.connected.clear()

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(msg)

    def _on_publish(
        self, _client: mqtt.Client, _userdata: object, mid: int, *_rest: object
    ) -> None:
        with self._acked_changed:
            self._acked.add(mid)
            self._acked_changed.notify_all()

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> IngestRuntime:
        connect(self._client, self.settings, persistent=True)
        self._client.loop_start()
        self._worker.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the messages already received, then disconnect."""
        self._stopping.set()
        self._worker.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    # worker ----------------------------------------------------------------------------------

    def _take_batch(self) -> list[mqtt.MQTTMessage]:
        try:
            first = self._inbox.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        last_tick = 0.0
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stopping.is_set():
                    return
                if self.engine is not None and self.clock() - last_tick >= 1.0:
                    last_tick = self.clock()  # processing-time windows fire without input
                    self._publish(self._outputs(IngestBatch(), self.engine.tick()))
                continue
            received_at = int(self.clock() * 1000)
            result = self.ingest.batch(
                [
                    RawMessage(
                        m.topic,
                        m.payload,
                        getattr(m.properties, "ContentType", None),
                        received_at,
                    )
                    for m in batch
                ]
            )
            self._publish(self._run_flows(result))
            for m in batch:
                if m.qos > 0:
                    self._client.ack(m.mid, m.qos)
            self.published.messages += len(batch)

    def _run_flows(self, result: IngestBatch) -> Outputs:
        if self.engine is None:
            return self._outputs(result, FlowResult())
        combined = FlowResult()
        # One update at a time, so that a late update or a failed expression is traced back
        # to the message that caused it, whose payload its dead letter carries.
        for update, origin in zip(result.accepted, result.origins, strict=True):
            flows = self.engine.process([update])
            combined.derived.extend(flows.derived)
            for late in flows.late:
                result.dead_letters.append(self.ingest.dead_letter(origin, late.rejection))
            for rejection in flows.rejected:
                result.dead_letters.append(self.ingest.dead_letter(origin, rejection))
        return self._outputs(result, combined)

    @staticmethod
    def _outputs(result: IngestBatch, flows: FlowResult) -> Outputs:
        return Outputs(result.accepted, flows.derived, result.dead_letters)

    def _publish(self, result: Outputs) -> None:
        json = content_type_properties(Codec.JSON.content_type)
        mids: set[int] = set()
        topics = self.ingest.topics
        # A publish made while disconnected is queued by paho and sent after reconnecting.
        for key, update in [*result.updates, *result.derived]:
            mids.add(
                self._client.publish(
                    topics.updates(key.so, key.stream),
                    encode_update(update),
                    qos=1,
                    properties=json,
                ).mid
            )
        for letter in result.dead_letters:
            mids.add(self._client.publish(letter.topic, letter.body, qos=1, properties=json).mid)
        # Inputs are acknowledged only once the broker has everything they produced.
        with self._acked_changed:
            self._acked_changed.wait_for(lambda: mids <= self._acked)
            self._acked -= mids
        self.published.updates += len(result.updates)
        self.published.derived += len(result.derived)
        self.published.dead_letters += len(result.dead_letters)
