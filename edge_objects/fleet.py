"""Many simulated devices sharing one MQTT connection: what the simulators publish through."""

from __future__ import annotations

import logging
import threading
from collections import Counter

from streams import Codec, SensorUpdate, StreamKey, TopicScheme, encode_update
from streams.mqtt import MqttSettings, connect, content_type_properties, make_client, refused

log = logging.getLogger(__name__)


class DeviceFleet:
    """Publishes device updates with QoS 1; paho queues them while the broker is away."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str = "cloudlet-simulator",
        topics: TopicScheme | None = None,
    ) -> None:
        self.topics = topics or TopicScheme()
        self.sent: Counter[str] = Counter()  # by kind: "update" or a fault's name
        self.connected = threading.Event()
        self._client = make_client(settings, client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *_: self.connected.clear()
        self._settings = settings
        self._json = content_type_properties(Codec.JSON.content_type)
        self._unacked = 0
        self._acked = threading.Condition()
        self._client.on_publish = self._on_publish

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        if refused(reason):
            log.warning("broker refused the device fleet: %s", reason)
        else:
            self.connected.set()

    def _on_publish(self, *_args: object) -> None:
        with self._acked:
            self._unacked -= 1
            self._acked.notify_all()

    def start(self) -> DeviceFleet:
        connect(self._client, self._settings, persistent=False)
        self._client.loop_start()
        return self

    def publish(self, key: StreamKey, update: SensorUpdate) -> None:
        self.publish_raw(
            self.topics.device_update(key.so, key.stream), encode_update(update), "update"
        )

    def publish_raw(self, topic: str, payload: bytes, kind: str) -> None:
        with self._acked:
            self._unacked += 1
        self._client.publish(topic, payload, qos=1, properties=self._json)
        self.sent[kind] += 1

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged everything published; False on timeout."""
        with self._acked:
            return self._acked.wait_for(lambda: self._unacked <= 0, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect once the broker has acknowledged what was published (waiting at most
        `timeout` s while connected): a publish still in paho's queue would otherwise reach
        the broker only after we are gone, or not at all."""
        if self.connected.is_set():
            self.flush(timeout)
        self._client.disconnect()
        self._client.loop_stop()
