"""EdgeObject: the device-side SDK over paho-mqtt v2.

```python
device = EdgeObject("field-1-valve", MqttSettings(url="mqtt://cloudlet.local:1883"))

@device.action("open")
def open_valve(parameters):
    valve.open(minutes=parameters.get("minutes", 10))
    return "opened"                       # reported as done, with this message

device.start()
device.publish("state", {"open": True})   # lastUpdate defaults to now, in ms
```

- QoS 1, reconnect with exponential backoff (paho), TLS and username/password from the
  settings, subscriptions made in on_connect so they survive reconnects.
- Identity: on a cloudlet's broker a device logs in as itself (username = its id, the secret
  `cloudlet device add` printed, or a client certificate) and its client id is its id: the
  broker binds the two. `refused` says why the broker turned the device away.
- Offline buffer: while the broker is away, updates queue in order (paho's outgoing QoS 1
  queue, bounded by `buffer_limit`) and are sent in order after reconnecting. A full buffer
  raises `OfflineBufferFull` to the caller: the device decides, nothing is dropped silently.
- Batching: `publish_batch` sends many readings as one message (list or columnar form).
- Actions: a handler per action name; the SDK reports accepted, then done (with the handler's
  return value as message) or failed (with the exception's), each with the command's id.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import paho.mqtt.client as mqtt

from edge_objects.netloop import SharedLoop
from edge_objects.publisher import BufferFull, OrderedPublisher
from streams import Codec, SensorUpdate, TopicScheme, encode_batch, encode_update
from streams.actuation import Actuation, ActuationError, ActuationStatus, StatusReport
from streams.transport.mqtt import (
    MqttSettings,
    connect,
    content_type_properties,
    make_client,
    refused,
    refused_because,
)

ActionHandler = Callable[[dict[str, Any]], str | None]
log = logging.getLogger(__name__)


class OfflineBufferFull(RuntimeError):
    """The offline buffer holds `buffer_limit` unsent updates; this one was not queued."""


class EdgeObject:
    def __init__(
        self,
        so_id: str,
        settings: MqttSettings,
        *,
        client_id: str | None = None,
        topics: TopicScheme | None = None,
        buffer_limit: int = 10_000,
        codec: Codec = Codec.JSON,
        clock: Callable[[], float] = time.time,
        loop: SharedLoop | None = None,
    ) -> None:
        """`loop`: a network thread shared with other clients (many devices in one process)
        instead of one of its own."""
        self.so_id = so_id
        self._loop = loop
        self.topics = topics or TopicScheme()
        self.codec = codec
        self.clock = clock
        self.connected = threading.Event()
        self._handlers: dict[str, ActionHandler] = {}
        self.ignored = 0  # commands that could not be read or handled (each logged)
        self._settings = settings
        # A stable client id, its own id: the broker keeps the session, and the commands
        # queued for it, while the device is away, and binds it to the device's identity.
        self.client_id = client_id or so_id
        self.refused: str | None = None  # why the broker refused us, if it did
        self._client = make_client(settings, self.client_id)
        # in the order of the calls, even while connecting (paho alone may reorder then)
        self._publisher = OrderedPublisher(self._client, limit=buffer_limit)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = lambda _c, _u, mid, reason, _p: self._publisher.acknowledged(
            mid, reason
        )
        self._client.on_message = self._on_message
        self._properties = content_type_properties(codec.content_type)
        self._commands: queue.SimpleQueue[Actuation | None] = queue.SimpleQueue()
        self._starting = threading.Lock()
        self._worker = threading.Thread(
            target=self._run_actions, name=f"{so_id}-actions", daemon=True
        )

    # API ---------------------------------------------------------------------------------------

    def action(self, name: str) -> Callable[[ActionHandler], ActionHandler]:
        """Register the handler of an action (a decorator)."""

        def register(handler: ActionHandler) -> ActionHandler:
            self._handlers[name] = handler
            return handler

        return register

    def start(self) -> EdgeObject:
        connect(self._client, self._settings, persistent=True)
        if self._loop is not None:
            self._loop.add(self._client)
        else:
            self._client.loop_start()
        return self

    def stop(self) -> None:
        self._commands.put(None)
        self._client.disconnect()
        if self._loop is not None:
            self._loop.remove(self._client)
        else:
            self._client.loop_stop()

    def publish(
        self,
        stream: str,
        channels: Mapping[str, Any] | SensorUpdate,
        last_update: int | None = None,
    ) -> None:
        """Send one update; queued in order while offline; OfflineBufferFull when full."""
        update = (
            channels
            if isinstance(channels, SensorUpdate)
            else SensorUpdate(
                dict(channels), last_update if last_update is not None else self._now()
            )
        )
        self._send(self.topics.device_update(self.so_id, stream), encode_update(update, self.codec))

    def publish_batch(
        self, stream: str, updates: Sequence[SensorUpdate], *, columnar: bool = False
    ) -> None:
        """Send many readings as one message (fewer packets for high-rate devices)."""
        payload = encode_batch(updates, self.codec, columnar=columnar)
        self._send(self.topics.device_update(self.so_id, stream), payload)

    def report(
        self, actuation_id: str, status: ActuationStatus, message: str | None = None
    ) -> None:
        report = StatusReport(actuation_id, status, self._now(), message)
        self._send(self.topics.action_status(self.so_id, actuation_id), report.to_json())

    # internals ---------------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock() * 1000)

    def _send(self, topic: str, payload: bytes) -> None:
        try:
            self._publisher.publish(topic, payload, properties=self._properties)
        except BufferFull:
            raise OfflineBufferFull(
                f"{self.so_id}: the offline buffer is full; the update to {topic} was not queued"
                " (raise buffer_limit, or wait for the broker)"
            ) from None

    def _on_disconnect(self, *_: object) -> None:
        self.connected.clear()
        self._publisher.disconnected()

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, reason: object, _p: object
    ) -> None:
        if refused(reason):
            self.refused = refused_because(reason, self._settings, self.client_id)
            log.error("%s: %s", self.so_id, self.refused)
            return
        self.refused = None
        if self._handlers:
            client.subscribe(self.topics.actions(self.so_id), qos=1)
        self._publisher.connected()
        self.connected.set()

    @property
    def healthy(self) -> bool:
        """The action thread is running (or there is none yet): the device obeys commands."""
        return self._worker.is_alive() or not self._worker.ident

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        # paho's network thread: whatever the payload, it must not raise out of here.
        try:
            command = Actuation.from_json(self.so_id, bytes(msg.payload))
        except ActuationError as exc:
            self.ignored += 1
            log.warning("%s: ignoring a command that cannot be read: %s", self.so_id, exc)
            return
        except Exception:
            self.ignored += 1
            log.exception("%s: ignoring a command that cannot be read", self.so_id)
            return
        if not self._worker.ident:  # its first command: a thread only for devices that get one
            with self._starting:
                if not self._worker.ident:
                    self._worker.start()
        self._commands.put(command)  # handlers may be slow: never run them on this thread

    def _run_actions(self) -> None:
        while (command := self._commands.get()) is not None:
            try:
                self._obey(command)
            except Exception:  # a report that cannot be sent costs that command, not the thread
                self.ignored += 1
                log.exception("%s: command %s could not be handled", self.so_id, command.id)

    def _obey(self, command: Actuation) -> None:
        handler = self._handlers.get(command.action)
        if handler is None:
            known = ", ".join(self._handlers) or "none"
            reason = f"no handler for action {command.action!r} (handled: {known})"
            self.report(command.id, ActuationStatus.FAILED, reason)
            return
        self.report(command.id, ActuationStatus.ACCEPTED)
        try:
            message = handler(command.parameters)
        except Exception as exc:  # a device's handler failing is a status, not a crash
            self.report(command.id, ActuationStatus.FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self.report(command.id, ActuationStatus.DONE, message)
