"""Many simulated devices: what the simulators publish through.

On a broker with identities each device logs in as itself (`credentials`: id -> secret), over
a connection of its own whose client id is its id; the broker then lets it post only its own
streams, and a device that posts for another object (the `unknown_object` fault) is refused
(counted in `refused`). Without credentials the devices share one connection, for brokers
that allow it (a full-access test account, or an open broker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

from edge_objects.netloop import SharedLoop
from edge_objects.publisher import OrderedPublisher
from streams import Codec, SensorUpdate, StreamKey, TopicScheme, encode_update
from streams.transport.mqtt import (
    MqttSettings,
    connect,
    content_type_properties,
    make_client,
    refused,
    refused_because,
)

log = logging.getLogger(__name__)


class _Link:
    """One MQTT connection, counting what the broker acknowledged and what it refused."""

    def __init__(
        self, fleet: DeviceFleet, settings: MqttSettings, client_id: str,
        loop: SharedLoop | None = None,
    ) -> None:  # fmt: skip
        self.fleet = fleet
        self.loop = loop
        self.settings = settings
        self.client_id = client_id
        self.connected = threading.Event()
        self.refusal: str | None = None
        self.client = make_client(settings, client_id)
        # in the order of the calls, even while connecting (paho alone may reorder then)
        self.publisher = OrderedPublisher(self.client, on_done=fleet._acknowledged)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.publisher.acknowledged(
            mid, reason
        )

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        if refused(reason):
            self.refusal = refused_because(reason, self.settings, self.client_id)
            log.error("simulated device: %s", self.refusal)
        else:
            self.refusal = None
            self.publisher.connected()
            self.connected.set()

    def _on_disconnect(self, *_: object) -> None:
        self.connected.clear()
        self.publisher.disconnected()

    def publish(self, topic: str, payload: bytes, kind: str, props: Any) -> None:
        self.publisher.publish(topic, payload, properties=props, tag=kind)

    def start(self) -> None:
        connect(self.client, self.settings, persistent=False)
        if self.loop is not None:
            self.loop.add(self.client)
        else:
            self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        if self.loop is not None:
            self.loop.remove(self.client)
        else:
            self.client.loop_stop()


class DeviceFleet:
    """Publishes device updates with QoS 1; paho queues them while the broker is away."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str = "cloudlet-simulator",
        topics: TopicScheme | None = None,
        credentials: Mapping[str, str] | None = None,
        loop: SharedLoop | None = None,
    ) -> None:
        """`credentials`: each device logs in as itself (a connection each, all served by
        `loop`, one network thread, when given)."""
        self.topics = topics or TopicScheme()
        self.sent: Counter[str] = Counter()  # by kind: "update" or a fault's name
        self.refused: Counter[str] = Counter()  # by kind: publishes the broker refused
        self._json = content_type_properties(Codec.JSON.content_type)
        self._unacked = 0
        self._acked = threading.Condition()
        if credentials:
            self._links = {
                so: _Link(self, settings.model_copy(update={"username": so,
                                                            "password": SecretStr(secret)}), so,
                          loop)
                for so, secret in sorted(credentials.items())
            }  # fmt: skip
        else:
            self._links = {"": _Link(self, settings, client_id, loop)}
        self._any = next(iter(self._links.values()))

    @property
    def connected(self) -> _AllSet:
        return _AllSet([link.connected for link in self._links.values()])

    @property
    def refusals(self) -> list[str]:
        return [link.refusal for link in self._links.values() if link.refusal]

    def _acknowledged(self, kind: str, failed: bool) -> None:
        with self._acked:
            self._unacked -= 1
            if failed:
                self.refused[kind] += 1
            self._acked.notify_all()

    def start(self) -> DeviceFleet:
        for link in self._links.values():
            link.start()
        return self

    def publish(self, key: StreamKey, update: SensorUpdate) -> None:
        self.publish_raw(
            self.topics.device_update(key.so, key.stream), encode_update(update), "update"
        )

    def publish_raw(self, topic: str, payload: bytes, kind: str) -> None:
        with self._acked:
            self._unacked += 1
        key = self.topics.parse_device_update(topic)
        so = key.so if key is not None else ""
        # A device posting for an object that is not its own goes out under some device's
        # identity, as such a device would; the broker refuses it.
        link = self._links.get(so) or self._links.get("") or self._any
        link.publish(topic, payload, kind, self._json)
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
        for link in self._links.values():
            link.stop()


class _AllSet:
    """Events that count as one: set when all are."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def is_set(self) -> bool:
        return all(e.is_set() for e in self.events)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for e in self.events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not e.wait(left):
                return False
        return True
